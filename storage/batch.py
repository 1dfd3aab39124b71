"""A batch of effects that the writer applies in one DuckDB transaction.

Reduction rule: a batch holds at most one write per record key, the LAST one. DuckDB keeps
the first row when one upsert statement holds a key twice, so duplicates must never reach it.
Worked example, events in order within one batch:
    create a/1 (cid X)  ->  {a/1: put X}
    update a/1 (cid Y)  ->  {a/1: put Y}
    delete a/1          ->  {a/1: delete}
    purge DID           ->  every pending write of that DID dropped, DID marked purged
    create a/2 (cid Z)  ->  {a/2: put Z}        (applied after the purge)
The writer applies purges first, then deletes, then upserts, which reproduces the event order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

__all__ = ["Batch", "RecordPut", "RepoRow", "CoverageSpan", "RecordChange", "RepoChange", "Change", "Publish", "thread_emitter"]


@dataclass(slots=True)
class RecordPut:
    cid: str
    rev: str | None
    record: str | None          # JSON text in the atproto JSON form
    created_at: str | None      # the record's createdAt when it is a valid atproto datetime
    event_at: str | None = None  # the firehose event's `time` (ISO); None: the TID time of rkey/rev


@dataclass(slots=True)
class RepoRow:
    """The firehose-owned columns of a `repos` row (backfill bookkeeping is not touched)."""

    did: str
    rev: str | None = None
    data_cid: str | None = None
    commit_cid: str | None = None
    last_seq: int | None = None
    last_event_at: str | None = None   # the event's `time`, as sent (ISO 8601)
    handle: str | None = None
    active: bool = True
    status: str = "active"
    sync_state: str = "unknown"
    desync_reason: str | None = None
    desynced_at: datetime | None = None
    first_seen_at: datetime | None = None


@dataclass(slots=True)
class CoverageSpan:
    id: int
    first_seq: int | None = None
    last_seq: int | None = None
    first_event_at: str | None = None
    last_event_at: str | None = None


@dataclass(frozen=True, slots=True)
class RecordChange:
    """One record create/update/delete as it happened (unreduced), for publishing downstream."""

    did: str
    collection: str
    rkey: str
    op: str                     # "create" | "update" | "delete"
    cid: str | None
    rev: str | None
    seq: int | None             # firehose seq (None for backfill)
    time: str | None            # event time (ISO) or the reconcile time for backfill
    record: str | None          # record JSON text; None for delete
    source: str                 # "firehose" | "backfill"


@dataclass(frozen=True, slots=True)
class RepoChange:
    """A change of a repo's state: account status, handle, sync state, head (rev/data)."""

    did: str
    kind: str                   # "account" | "identity" | "sync" | "desynchronized" | "backfill" | "commit"
    rev: str | None
    data_cid: str | None
    active: bool
    status: str
    handle: str | None
    sync_state: str
    desync_reason: str | None
    seq: int | None
    time: str | None
    source: str                 # "firehose" | "backfill"
    # kind "backfill" only: the record messages at `rev` are the WHOLE repo, so every record of
    # the DID older than `rev` that they do not rewrite is gone.
    snapshot: bool = False
    # kind "backfill" only: the backfill run that completed this DID (repos.backfill_run)
    run: str | None = None


Change = RecordChange | RepoChange

# Where every change goes after it is stored (the Kafka publisher, or nothing): returns once the
# changes are acknowledged. The daemon and the backfill both take one.
Publish = Callable[[list[Change]], Awaitable[None]]


def thread_emitter(publish: Publish, loop: asyncio.AbstractEventLoop) -> Callable[[list[Change]], None]:
    """`Store.reconcile(emit=...)` runs in a worker thread: publish on `loop` and block until acked."""

    def emit(changes: list[Change]) -> None:
        asyncio.run_coroutine_threadsafe(publish(changes), loop).result()

    return emit

RecordKey = tuple[str, str, str]  # (did, collection, rkey)


@dataclass(slots=True)
class Batch:
    records: dict[RecordKey, RecordPut | None] = field(default_factory=dict)  # None = delete
    purged_dids: set[str] = field(default_factory=set)
    repos: dict[str, RepoRow] = field(default_factory=dict)
    cursor: tuple[str, int] | None = None        # (source, seq) stored with the effects
    coverage: CoverageSpan | None = None
    events: int = 0                              # events folded into this batch
    # Unreduced change log in event order, kept only when something publishes it (Kafka).
    changes: list[Change] | None = None
    # The rev of each delete in `records` (the commit that removed the key): on a lake, where two
    # writers of one DID may commit in either order, the newest rev of a key wins (storage/records.py).
    delete_revs: dict[RecordKey, str] = field(default_factory=dict)

    def put_record(self, did: str, collection: str, rkey: str, put: RecordPut) -> None:
        self.records[(did, collection, rkey)] = put

    def delete_record(self, did: str, collection: str, rkey: str, rev: str | None = None) -> None:
        key = (did, collection, rkey)
        self.records[key] = None
        if rev is not None:
            self.delete_revs[key] = rev
        else:
            self.delete_revs.pop(key, None)

    def purge_did(self, did: str) -> None:
        for key in [k for k in self.records if k[0] == did]:
            del self.records[key]
        self.purged_dids.add(did)

    def put_repo(self, row: RepoRow) -> None:
        self.repos[row.did] = row

    def __len__(self) -> int:
        return len(self.records) + len(self.purged_dids) + len(self.repos)

    def is_empty(self) -> bool:
        return not self.records and not self.purged_dids and not self.repos and self.cursor is None
