"""storage: the DuckDB schema and the one writer all data goes through."""

from .batch import Batch, Change, CoverageSpan, RecordChange, RecordPut, RepoChange, RepoRow
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
