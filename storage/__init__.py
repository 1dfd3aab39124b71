"""storage: the DuckDB schema and the one writer all data goes through."""

from skyfill.protocol.columns import RecordColumns

from .base import Reader, failure_kind
from .batch import Batch, Change, CoverageSpan, Publish, RecordChange, RecordPut, RepoChange, RepoRow, thread_emitter
from .queue import RetryPolicy
from .repo_reads import did_fingerprint
from .reconcile import ReconcileCounts
from .states import TERMINAL_BACKFILL, AccountStatus, BackfillStatus, CoverageEnd, QueueState, SyncState
from .store import Store, open_store, schema_version_of
from .views import TYPED_VIEWS

__all__ = [
    "Batch",
    "CoverageSpan",
    "RecordPut",
    "RepoRow",
    "Change",
    "RecordChange",
    "RepoChange",
    "Publish",
    "thread_emitter",
    "Store",
    "Reader",
    "open_store",
    "did_fingerprint",
    "schema_version_of",
    "failure_kind",
    "ReconcileCounts",
    "RecordColumns",
    "RetryPolicy",
    "SyncState",
    "AccountStatus",
    "BackfillStatus",
    "QueueState",
    "CoverageEnd",
    "TERMINAL_BACKFILL",
    "TYPED_VIEWS",
]
