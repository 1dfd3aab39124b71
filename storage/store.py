"""`Store`: the DuckDB file and the only code that writes to it.

One class, assembled from one module per reason to change:
    base.py       the connection: opening, memory limit, transactions, reconnect, reads, errors
    firehose.py   `apply(batch)` (records, repo rows, cursor, coverage atomically) and start-up reads
    reconcile.py  `reconcile` a DID to a fetched repo, and the reads that prepare one
    queue.py      the backfill queue's state machine (enqueue, claim, done, failed, deferred, recover)
    caches.py     the identity cache and the Kafka sink's dedup marks
    plc.py        the PLC export in bulk (`identities sync`), the identity cache's fallback
    discovery.py  listed repos, enumeration cursors, the collections filter of each backfill
    repo_reads.py point reads of per-DID state (the daemon's tracker cache)
    compaction.py folding the version logs into the bases, beside the writers (records.py and
                  repos.py: the tables, their appends and their compaction)
    migrate.py    bringing an older file to the current schema on open
Callers never get the connection: they write through these named methods and read through
`fetchall` or `read()`; every DuckDB failure leaves as skyfill.errors.StorageError.
"""

from __future__ import annotations

from pathlib import Path

from .caches import Caches
from .discovery import Discovery
from .migrate import SCHEMA_VERSION
from .plc import PlcBulk
from .queue import BackfillQueue
from .reconcile import Reconciling
from .repo_reads import RepoReads

__all__ = ["Store", "open_store", "schema_version_of"]


class Store(Reconciling, BackfillQueue, PlcBulk, Caches, Discovery, RepoReads):
    """The DuckDB file and the only code that writes to it."""

    def __enter__(self) -> Store:
        return self


def open_store(path: str | Path, *, read_only: bool = False) -> Store:
    return Store(path, read_only=read_only)


def schema_version_of(store: Store) -> int:
    """The schema version of an open store (always the current one: opening migrates)."""
    rows = store.fetchall("SELECT value FROM meta WHERE key = 'schema_version'")
    return int(rows[0][0]) if rows else SCHEMA_VERSION
