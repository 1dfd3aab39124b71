"""`skyfill sink`: build a DuckDB mirror from the topics alone (the reference subscriber).

Delivery is at-least-once: offsets are committed only after the DuckDB transaction that
applied the messages has committed, so a crash replays a suffix of each partition. Applying
is idempotent by (did, collection, rkey, rev):
- a record message whose rev is older than the stored record's rev (or than the rev of the
  delete that removed it, kept in `sink_tombstones`) is skipped, so a replayed or duplicated
  older message never rolls a record back;
- a record message of a deleted account with a rev at or before the deletion is skipped. The
  two topics are not ordered against each other, so a create read after the account deletion
  that purged it must not bring the record back;
- a repo message older than the stored row, by (rev, seq), is skipped;
- a snapshot (repo message `kind: "backfill"`, `snapshot: true`, rev R; sent by backfill
  workers, whose record messages at R are the whole repo) deletes every stored record of the
  DID whose rev is older than R, and from then on record messages of that DID older than R are
  skipped (`sink_snapshots`). The snapshot's own records at R, and anything newer, stay. The
  two topics are not ordered, so the repo message may be applied before or after its records:
  either way the result is the repo at R plus newer changes.
- a repo message `kind: "backfill"` (a backfill completed elsewhere, at its `time`, in its `run`)
  records the DID as backfilled in the mirror's repo row, unless the row already holds a later
  backfill: so `skyfill gaps` on a sink's mirror knows what the workers did.
Worked example, one DID, records topic read as  c1(rev 1) u2(rev 2) d3(rev 3) u2(rev 2, a replay):
    c1 -> put rev 1;  u2 -> put rev 2;  d3 -> delete, tombstone rev 3;  u2 -> 2 < 3, skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import pyarrow as pa

from skyfill import metrics
from skyfill.errors import InputError, StorageError
from skyfill.protocol.records import is_valid_datetime
from skyfill.storage import Batch, RecordPut, RepoRow, Store

from .consume_loop import ConsumeLoop, Polled
from .messages import Topics, decode_value

__all__ = ["Sink", "SinkStats"]

log = logging.getLogger(__name__)

_KEYS = pa.schema([("did", pa.string()), ("collection", pa.string()), ("rkey", pa.string())])

RecordKey = tuple[str, str, str]


@dataclass(slots=True)
class SinkStats:
    applied: int = 0
    skipped: int = 0      # older than what is stored: replays and duplicates
    invalid: int = 0      # not a v1 skyfill message


def _older(rev: str | None, than: str | None) -> bool:
    # TIDs sort as strings; an unknown rev on either side cannot be ordered, so it applies.
    return rev is not None and than is not None and rev < than


@dataclass(slots=True)
class _RepoSeen:
    rev: str | None
    seq: int | None
    event_at: str | None
    status: str


@dataclass(slots=True)
class _Fold:
    """Folds decoded messages into one Batch, against the stored state loaded beforehand."""

    live: dict[RecordKey, str | None]          # stored/pending record rev
    tombs: dict[RecordKey, str | None]         # rev of the delete that removed the key
    repos: dict[str, _RepoSeen]
    snapshots: dict[str, str]                  # did -> rev of the newest snapshot applied
    backfilled_at: dict[str, datetime]         # did -> the stored (or this poll's) backfilled_at
    batch: Batch = field(default_factory=Batch)
    new_backfills: dict[str, tuple[str | None, datetime, str | None]] = field(default_factory=dict)
    new_snapshots: dict[str, str] = field(default_factory=dict)
    new_tombs: dict[RecordKey, str | None] = field(default_factory=dict)
    stats: SinkStats = field(default_factory=SinkStats)

    def record(self, m: dict[str, Any]) -> None:
        did, key, rev = m["did"], (m["did"], m["collection"], m["rkey"]), m.get("rev")
        seen = self.repos.get(did)
        if seen is not None and seen.status == "deleted" and (rev is None or not _older(seen.rev, rev)):
            self.stats.skipped += 1
            return
        if (
            _older(rev, self.live.get(key))
            or _older(rev, self.tombs.get(key))
            or (rev is None and did in self.snapshots)
            or _older(rev, self.snapshots.get(did))
        ):
            self.stats.skipped += 1
            return
        if m["op"] == "delete":
            self.batch.delete_record(*key, rev=rev)
            self.live.pop(key, None)
            self.tombs[key] = self.new_tombs[key] = rev
        else:
            record = m["record"]
            created = record.get("createdAt") if isinstance(record, dict) else None
            self.batch.put_record(
                *key,
                RecordPut(
                    cid=m["cid"], rev=rev, record=_dumps(record),
                    created_at=created if is_valid_datetime(created) else None,
                    # a firehose message's time is the event's; a backfill message's is the
                    # reconcile's wall clock, so the store derives it from the TID instead
                    event_at=m.get("time") if m.get("source") == "firehose" else None,
                ),
            )
            self.live[key] = rev
        self.stats.applied += 1

    def repo(self, m: dict[str, Any]) -> None:
        did, rev, seq = m["did"], m.get("rev"), m.get("seq")
        if m.get("kind") == "backfill":
            self._backfilled(did, rev, m.get("time"), m.get("run"))
        if m.get("snapshot") and m.get("kind") == "backfill" and rev is not None:
            self._snapshot(did, rev)
        seen = self.repos.get(did)
        if seen is not None and (
            _older(rev, seen.rev)
            or ((rev is None or rev == seen.rev) and seq is not None and seen.seq is not None and seq < seen.seq)
        ):
            self.stats.skipped += 1
            return
        # A backfill snapshot has no seq/time: keep the firehose position already stored.
        keep_seq = seq if seq is not None else (seen.seq if seen else None)
        keep_at = m.get("time") if seq is not None else (seen.event_at if seen else None)
        self.batch.put_repo(
            RepoRow(
                did=did, rev=rev, data_cid=m.get("data_cid"), last_seq=keep_seq, last_event_at=keep_at,
                handle=m.get("handle"), active=bool(m["active"]), status=m["status"],
                sync_state=m["sync_state"], desync_reason=m.get("desync_reason"),
            )
        )
        if m["status"] == "deleted":
            self.batch.purge_did(did)
            for key in [k for k in self.live if k[0] == did]:
                del self.live[key]
        self.repos[did] = _RepoSeen(rev, keep_seq, keep_at, m["status"])
        self.stats.applied += 1


    def _backfilled(self, did: str, rev: str | None, time: Any, run: Any) -> None:
        """Record the backfill that ended at `time`, unless a later one is recorded (a replay of an
        older message never moves backfilled_at back)."""
        try:
            at = datetime.fromisoformat(time)
        except (TypeError, ValueError):
            return  # no usable time: the backfill cannot be ordered against the stored one
        if at.tzinfo is None or not (did not in self.backfilled_at or self.backfilled_at[did] < at):
            return
        self.backfilled_at[did] = at
        self.new_backfills[did] = (rev, at, run if isinstance(run, str) else None)

    def _snapshot(self, did: str, rev: str) -> None:
        """The repo at `rev` is exactly the snapshot's records: drop what is older and not in it."""
        if not _older(self.snapshots.get(did), rev) and did in self.snapshots:
            return
        self.snapshots[did] = self.new_snapshots[did] = rev
        # `live` holds every stored record of this DID (loaded for snapshot DIDs) and this
        # poll's puts; the snapshot's records at `rev` that come later in the poll put back
        # what they rewrite.
        for key in [k for k, r in self.live.items() if k[0] == did and (r is None or r < rev)]:
            self.batch.delete_record(*key, rev=rev)
            del self.live[key]


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


class Sink:
    """Consumes the records and repos topics with a consumer group and applies them to `store`."""

    def __init__(
        self,
        store: Store,
        bootstrap: str,
        *,
        group_id: str = "skyfill-sink",
        topics: Topics = Topics(),
        max_poll_records: int = 5000,
        session_timeout_ms: int = 10_000,
        client_id: str = "skyfill-sink",
    ) -> None:
        self.store = store
        self.bootstrap = bootstrap
        self.group_id = group_id
        self.topics = topics
        self._loop = ConsumeLoop(
            (topics.records, topics.repos), self._handle,
            who="sink", bootstrap=bootstrap, group_id=group_id, max_records=max_poll_records,
            client_id=client_id, max_poll_records=max_poll_records, session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(100, session_timeout_ms // 3),
        )
        self.stats = SinkStats()

    async def start(self) -> None:
        self.store.create_sink_tables()
        await self._loop.start()

    async def aclose(self) -> None:
        await self._loop.stop()

    async def __aenter__(self) -> Sink:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def step(self, *, timeout_ms: int = 1000) -> int:
        """Poll once, apply what came in one DuckDB transaction, then commit the offsets."""
        return await self._loop.step(timeout_ms=timeout_ms)

    async def run(self, *, stop: asyncio.Event | None = None, exit_when_idle: bool = False) -> SinkStats:
        await self._loop.run(stop=stop, exit_when_idle=exit_when_idle)
        return self.stats

    # -- applying ---------------------------------------------------------------------------

    async def _handle(self, polled: Polled) -> None:
        await asyncio.to_thread(self._apply, polled)

    def _apply(self, polled: Polled) -> None:
        records: list[dict[str, Any]] = []
        repos: list[dict[str, Any]] = []
        invalid = 0
        for tp, msgs in polled.items():
            target = records if tp.topic == self.topics.records else repos
            for msg in msgs:
                try:
                    target.append(decode_value(msg.value))
                except InputError as exc:
                    invalid += 1
                    log.warning("skipping a message that is not a skyfill v1 message",
                                extra={"ctx": {"topic": tp.topic, "partition": tp.partition,
                                               "offset": msg.offset, "error": str(exc)}})
        try:
            fold = self._load(records, repos)
        except StorageError as exc:
            raise StorageError(f"sink cannot read the stored revs: {exc}") from exc.__cause__
        # Repo messages first: an account deletion must be known before the records it purged.
        for m in repos:
            try:
                fold.repo(m)
            except (KeyError, TypeError) as exc:
                invalid += 1
                log.warning("skipping a malformed repo message", extra={"ctx": {"error": repr(exc)}})
        for m in records:
            try:
                fold.record(m)
            except (KeyError, TypeError, AttributeError) as exc:
                invalid += 1
                log.warning("skipping a malformed record message", extra={"ctx": {"error": repr(exc)}})
        # Committed before the batch: a tombstone without its delete only skips messages older
        # than that delete, and the delete itself is replayed (offsets not committed). Snapshot
        # marks likewise only ever make older messages skip.
        self.store.write_sink_marks(fold.new_tombs, fold.new_snapshots)
        self.store.apply(fold.batch)
        self.store.record_backfills(fold.new_backfills)  # after the rows they describe
        fold.stats.invalid = invalid
        self.stats.applied += fold.stats.applied
        self.stats.skipped += fold.stats.skipped
        self.stats.invalid += invalid
        metrics.KAFKA_SINK_MESSAGES.labels("applied").inc(fold.stats.applied)
        metrics.KAFKA_SINK_MESSAGES.labels("skipped").inc(fold.stats.skipped)
        metrics.KAFKA_SINK_MESSAGES.labels("invalid").inc(invalid)

    def _load(self, records: Iterable[dict[str, Any]], repos: Iterable[dict[str, Any]]) -> _Fold:
        """Read the stored revs of every key and DID this poll touches."""
        keys = {(m["did"], m["collection"], m["rkey"]) for m in records if _has_key(m)}
        dids = sorted({m["did"] for m in records if "did" in m} | {m["did"] for m in repos if "did" in m})
        snapshot_dids = sorted({m["did"] for m in repos if m.get("snapshot") and "did" in m})
        live: dict[RecordKey, str | None] = {}
        tombs: dict[RecordKey, str | None] = {}
        seen: dict[str, _RepoSeen] = {}
        backfilled_at: dict[str, datetime] = {}
        snapshots: dict[str, str] = {}
        with self.store.read() as reader:
            if snapshot_dids:
                with reader.registered("_sd", pa.table({"did": snapshot_dids})):
                    for did, col, rkey, rev in reader.fetchall(
                        "SELECT did, collection, rkey, rev FROM records WHERE did IN (SELECT did FROM _sd)"
                    ):
                        live[(did, col, rkey)] = rev
            if dids:
                with reader.registered("_sn", pa.table({"did": dids})):
                    snapshots.update(reader.fetchall(
                        "SELECT did, max(rev) FROM sink_snapshots WHERE did IN (SELECT did FROM _sn) GROUP BY did"))
            if keys:
                ks = list(keys)
                with reader.registered("_k", pa.table(
                    {"did": [k[0] for k in ks], "collection": [k[1] for k in ks], "rkey": [k[2] for k in ks]},
                    schema=_KEYS,
                )):
                    for did, col, rkey, rev, live_hit, trev, tomb_hit in reader.fetchall(
                        "SELECT k.did, k.collection, k.rkey, r.rev, r.did IS NOT NULL, t.rev, t.did IS NOT NULL "
                        "FROM _k k LEFT JOIN records r USING (did, collection, rkey) "
                        "LEFT JOIN (SELECT did, collection, rkey, max(rev) AS rev FROM sink_tombstones "
                        "WHERE did IN (SELECT did FROM _k) GROUP BY ALL) t USING (did, collection, rkey)"
                    ):
                        if live_hit:
                            live[(did, col, rkey)] = rev
                        if tomb_hit:
                            tombs[(did, col, rkey)] = trev
            if dids:
                with reader.registered("_d", pa.table({"did": dids})):
                    for did, rev, seq, at, status, backfilled in reader.fetchall(
                        "SELECT did, rev, last_seq, strftime(last_event_at AT TIME ZONE 'UTC', "
                        "'%Y-%m-%dT%H:%M:%S.%fZ'), status, backfilled_at FROM repos WHERE did IN (SELECT did FROM _d)"
                    ):
                        seen[did] = _RepoSeen(rev, seq, at, status)
                        if backfilled is not None:
                            backfilled_at[did] = backfilled
        return _Fold(live=live, tombs=tombs, repos=seen, snapshots=snapshots, backfilled_at=backfilled_at)


def _has_key(m: dict[str, Any]) -> bool:
    return "did" in m and "collection" in m and "rkey" in m
