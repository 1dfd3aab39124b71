"""storage: the DuckDB schema and the one writer all data goes through."""

from .batch import Batch, Change, CoverageSpan, Publish, RecordChange, RecordPut, RepoChange, RepoRow, thread_emitter
from .states import TERMINAL_BACKFILL, AccountStatus, BackfillStatus, CoverageEnd, QueueState, SyncState
from .writer import ReconcileCounts, RecordColumns, Store, open_store

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
    "open_store",
    "ReconcileCounts",
    "RecordColumns",
    "SyncState",
    "AccountStatus",
    "BackfillStatus",
    "QueueState",
    "CoverageEnd",
    "TERMINAL_BACKFILL",
]
