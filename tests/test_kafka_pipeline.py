"""Kafka end to end: the daemon publishing real firehose frames, a broker outage, backfills
(in-daemon, standalone and scaled-out workers) and the sink rebuilding the mirror from the topics.

Real parts only: a Tansu broker (tests/support/kafka.py), a local relay replaying signed frames from
tests.support.generate.World (tests/support/relay.py), a local HTTP server playing PLC + PDS with signed repo
CARs (tests/support/faultserver.py), real DuckDB files. Tansu refuses the idempotent producer, so the
publisher runs its documented fallback (acks=all, one batch in flight per partition).
"""

from __future__ import annotations

import asyncio
import random
import resource
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import libipld
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from skyfill.app.api import backfill_from_request
from skyfill.backfill.backfiller import StoreReconciler, open_backfiller
from skyfill.app.jobs import run_backfill
from skyfill.backfill.config import BackfillConfig
from skyfill.protocol.repo import parse_repo
from tests.support.generate.firehose import World
from tests.support.generate.identity import GeneratedIdentity, did_document, make_identity
from tests.support.generate.repo import generate_repo
from skyfill.consumer.daemon import ConsumeConfig, Daemon
from skyfill.consumer.resync import DaemonReconciler
from skyfill.publish import KafkaPublisher, Topics, enqueue_backfill, ensure_topics
from skyfill.publish.sink import Sink
from skyfill.publish.worker import BackfillWorker, backfill_one_from
from skyfill import metrics
from skyfill.net.identity import IdentityRow
from skyfill.storage import Change, RecordChange, Store
from tests.support.kafka import KafkaBroker

from .support.faultserver import FaultServer, Reply, Seen, json_reply
from .support.relay import LocalRelay
from .support.topics import FAST, consume_all, schema
from .support.wait import apoll

pytestmark = pytest.mark.kafka

GET_REPO = "/xrpc/com.atproto.sync.getRepo"


def mirror(store: Store) -> tuple[list[Any], list[Any]]:
    """What a subscriber must reproduce: records (did, collection, rkey, cid, rev) and repos."""
    records = store.fetchall("SELECT did, collection, rkey, cid, rev FROM records ORDER BY ALL")
    repos = store.fetchall("SELECT did, rev, status, active, handle FROM repos ORDER BY did")
    return records, repos


async def sink_mirror(bs: str, path: Path, *, topics: Topics = Topics(), group: str = "mirror") -> tuple[list[Any], list[Any]]:
    store = Store(path)
    try:
        async with Sink(store, bs, group_id=group, topics=topics, session_timeout_ms=FAST) as sink:
            await sink.run(exit_when_idle=True)
        return mirror(store)
    finally:
        store.close()


def commit_indexes(frames: list[bytes], did: str) -> list[int]:
    out = []
    for i, f in enumerate(frames):
        header, body = libipld.decode_dag_cbor_multi(f)
        if header.get("t") == "#commit" and body["repo"] == did:
            out.append(i)
    return out


def check_messages(msgs: list[Any], records_topic: str) -> dict[str, list[dict[str, Any]]]:
    """Every message validates; each DID sits in one partition per topic, firehose seqs in order."""
    record_schema, repo_schema = schema("record.v1.json"), schema("repo.v1.json")
    partitions: dict[tuple[str, bytes], set[int]] = defaultdict(set)
    by_did: dict[tuple[str, bytes], list[dict[str, Any]]] = defaultdict(list)
    for m in sorted(msgs, key=lambda m: (m.topic, m.partition, m.offset)):
        obj = orjson.loads(m.value)
        (record_schema if m.topic == records_topic else repo_schema).validate(obj)
        assert m.key == obj["did"].encode()
        partitions[(m.topic, m.key)].add(m.partition)
        by_did[(m.topic, m.key)].append(obj)
    assert all(len(p) == 1 for p in partitions.values())
    for objs in by_did.values():
        seqs = [o["seq"] for o in objs if o["source"] == "firehose"]
        assert seqs == sorted(seqs)  # event order per DID (a duplicate repeats a run, never reorders)
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (topic, _key), objs in by_did.items():
        out[topic].extend(objs)
    return out


def serve_world(srv: FaultServer, world: World, *, served: dict[str, bytes] | None = None) -> None:
    for ident in world.identities:
        srv.script(f"/{ident.did}", json_reply(did_document(ident, srv.url)))
    srv.script(GET_REPO, lambda seen: Reply(200, (served or {}).get(seen.query["did"])
                                            or world.repo_car(seen.query["did"])))


# -- 1. the daemon publishes everything; the sink rebuilds its mirror -------------------------


async def test_daemon_topics_rebuild_its_mirror(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    bs = kafka_broker.bootstrap
    world = World(21, n_dids=8, initial_records=(5, 15))
    frames = list(world.frames(500))
    counts = {did: len(commit_indexes(frames, did)) for did in world.dids}
    busy = sorted(world.dids, key=counts.__getitem__, reverse=True)
    gapped, dead, healed = busy[0], busy[1], busy[2]
    # A gap: five commits of one DID never reach us, so its chain breaks (desynchronized).
    lost = set(commit_indexes(frames, gapped)[10:15])
    stream = [f for i, f in enumerate(frames) if i not in lost]
    stream.append(world.account_frame(dead, active=False, status="deleted"))

    with FaultServer() as srv, LocalRelay(stream) as relay:
        serve_world(srv, world)
        store = Store(tmp_path / "daemon.duckdb")
        publisher = KafkaPublisher(bs, create_partitions=4)
        await publisher.start()
        daemon = Daemon(store, ConsumeConfig(relay=relay.url, cursor=0, flush_interval=0.05, batch_events=100,
                                             publish=True), publish=publisher.publish)
        task = asyncio.create_task(daemon.run(install_signal_handlers=False))
        try:
            await apoll(lambda: daemon.committed_seq == relay.head)
            assert store.fetchall("SELECT sync_state FROM repos WHERE did = ?", [gapped]) == [("desynchronized",)]
            # The backfill heals the gap and brings the records that predate the stream.
            summary = await backfill_from_request(store, {"dids": [gapped, healed]}, sink=DaemonReconciler(daemon),
                                                  config=BackfillConfig(plc_url=srv.url, allow_private_hosts=True))
            assert summary["repos_ok"] == 2, summary
        finally:
            daemon.stop()
            await task
            await publisher.aclose()
        want = mirror(store)
        for did in (gapped, healed):
            truth = parse_repo(world.repo_car(did), did=did, key=None)
            assert {(c, k): cid for d, c, k, cid, _ in want[0] if d == did} == truth.records
        store.close()

    assert not [r for r in want[0] if r[0] == dead]
    assert (dead, False) in {(r[0], r[3]) for r in want[1]}
    msgs = await consume_all(bs, ["skyfill.records", "skyfill.repos"], len(want[0]))
    objs = check_messages(msgs, "skyfill.records")
    ops = {(o["op"], o["source"]) for o in objs["skyfill.records"]}
    assert {("create", "firehose"), ("update", "firehose"), ("delete", "firehose"), ("create", "backfill")} <= ops
    backfilled = {o["did"] for o in objs["skyfill.repos"] if o["kind"] == "backfill"}
    assert backfilled == {gapped, healed}
    assert any(o["status"] == "deleted" for o in objs["skyfill.repos"])

    assert await sink_mirror(bs, tmp_path / "sink.duckdb") == want


# -- 2. the broker freezes mid-stream ------------------------------------------------------------


async def test_broker_outage_pauses_the_daemon_and_loses_nothing(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    bs = kafka_broker.bootstrap
    batch_events = 200
    world = World(22, n_dids=30, retain_blocks=False)
    first = list(world.frames(600))
    later = list(world.frames(4000))
    publisher = KafkaPublisher(bs, create_partitions=3, request_timeout_ms=1000, backoff_initial=0.05,
                               backoff_max=0.5)
    await publisher.start()
    unacked: list[int] = []  # first seq of each batch whose publish has not returned

    async def publish(changes: list[Change]) -> None:
        start = min(c.seq for c in changes if c.seq is not None)
        unacked.append(start)
        try:
            await publisher.publish(changes)
        finally:
            unacked.remove(start)

    violations: list[tuple[int, int]] = []
    peak = {"batch_events": 0, "ahead": 0, "held": 0}

    with LocalRelay(first) as relay:
        store = Store(tmp_path / "daemon.duckdb")
        daemon = Daemon(store, ConsumeConfig(relay=relay.url, cursor=0, flush_interval=0.05,
                                             batch_events=batch_events, publish=True), publish=publish)

        async def watch() -> None:
            while True:
                committed = daemon.committed_seq
                if committed is not None and unacked and committed >= min(unacked):
                    violations.append((committed, min(unacked)))
                peak["batch_events"] = max(peak["batch_events"], daemon._batch.events)
                peak["held"] = max(peak["held"], publisher.held_messages)
                if committed is not None and daemon.last_seq is not None:
                    peak["ahead"] = max(peak["ahead"], daemon.last_seq - committed)
                await asyncio.sleep(0.005)

        task = asyncio.create_task(daemon.run(install_signal_handlers=False))
        watcher = asyncio.create_task(watch())
        try:
            await apoll(lambda: daemon.committed_seq == relay.head)
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            retries_before = metrics.KAFKA_PUBLISH_RETRIES._value.get()
            kafka_broker.freeze()
            frozen_at = daemon.committed_seq
            relay.append(later)  # the firehose keeps going while the broker is gone
            # the producer timed out (request_timeout_ms) and retried while the relay kept sending
            await apoll(lambda: metrics.KAFKA_PUBLISH_RETRIES._value.get() > retries_before
                           and (daemon.last_seq or 0) > frozen_at)
            # Paused, not buffering: the cursor stayed put, and the daemon read at most the batch
            # being published plus one open batch of the 4000 new events.
            assert daemon.committed_seq == frozen_at
            assert store.load_cursor(daemon.source) == frozen_at
            assert daemon.last_seq is not None and daemon.last_seq - frozen_at <= 2 * batch_events + 1
            assert daemon.last_seq < relay.head
            kafka_broker.thaw()
            t0 = time.monotonic()
            await apoll(lambda: daemon.committed_seq == relay.head)
            catch_up = time.monotonic() - t0
            rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        finally:
            kafka_broker.thaw()
            watcher.cancel()
            daemon.stop()
            await task
            await publisher.aclose()
        assert store.load_cursor(daemon.source) == relay.head
        want = mirror(store)
        store.close()

    assert violations == []  # the stored cursor never passed an unacknowledged batch
    assert peak["batch_events"] <= batch_events + 1
    assert peak["ahead"] <= 2 * batch_events + 1
    print(f"\noutage: peak open batch {peak['batch_events']} events, read-ahead {peak['ahead']} events, "
          f"held {peak['held']} messages; ru_maxrss {rss_before} -> {rss_after} KiB; "
          f"catch-up of {len(later)} events in {catch_up:.2f} s")
    # No event lost: the topics alone rebuild the daemon's mirror.
    assert await sink_mirror(bs, tmp_path / "sink.duckdb") == want


# -- 3. a standalone backfill publishes before it commits ---------------------------------------


async def test_standalone_backfill_is_acknowledged_before_it_commits(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    bs = kafka_broker.bootstrap
    world = World(23, n_dids=3, initial_records=(10, 20))
    old = {did: world.repo_car(did) for did in world.dids}
    list(world.frames(120))  # the repos move on: updates and deletes against the stored copy
    a, b, c = world.dids
    await ensure_topics(bs, {"skyfill.records": 2, "skyfill.repos": 2})
    new = {did: parse_repo(world.repo_car(did), did=did, key=None).records for did in world.dids}
    assert any(set(parse_repo(old[d], did=d, key=None).records) - set(new[d]) for d in world.dids)
    with FaultServer() as srv:
        serve_world(srv, world, served=old)
        config = BackfillConfig(plc_url=srv.url, allow_private_hosts=True, request_backoff=0.01)
        store = Store(tmp_path / "standalone.duckdb")
        # First pass: the old repos, published (the topics and the store start equal).
        summary = await run_backfill(store, dids=[a, b, c], config=config, kafka_bootstrap=bs)
        assert summary.repos_ok == 3
        serve_world(srv, world)  # now the current repos

        async with KafkaPublisher(bs) as publisher:
            kafka_broker.freeze()
            try:
                job = asyncio.create_task(run_backfill(store, dids=[a], config=config,
                                                       sink=StoreReconciler(store, publish=publisher.publish)))
                await apoll(lambda: srv.count(GET_REPO) == 4)
                # the reconcile's diff is in the publisher, waiting for the frozen broker
                await apoll(lambda: publisher.held_messages > 0)
                # Fetched and diffed, but the broker has not acknowledged: nothing is committed.
                # (A separate cursor: the reconcile's transaction holds the writer's lock.)
                assert not job.done()
                with store.read() as reader:
                    stored = {(col, k): cid for col, k, cid in reader.fetchall(
                        "SELECT collection, rkey, cid FROM records WHERE did = ?", [a])}
                assert stored == parse_repo(old[a], did=a, key=None).records
                assert stored != new[a]
            finally:
                kafka_broker.thaw()
            assert (await job).repos_ok == 1
        summary = await run_backfill(store, dids=[b, c], config=config, kafka_bootstrap=bs)
        assert summary.repos_ok == 2
        want = mirror(store)
        store.close()
    for did in world.dids:
        assert {(col, k): cid for d, col, k, cid, _ in want[0] if d == did} == new[did]
    msgs = await consume_all(bs, ["skyfill.records", "skyfill.repos"], len(want[0]))
    objs = check_messages(msgs, "skyfill.records")
    assert {o["op"] for o in objs["skyfill.records"]} == {"create", "delete"} | (
        {"update"} if any(o["op"] == "update" for o in objs["skyfill.records"]) else set())
    assert all(o["source"] == "backfill" and o["kind"] == "backfill" for o in objs["skyfill.repos"])
    assert await sink_mirror(bs, tmp_path / "sink.duckdb") == want


# -- 4. scale-out: backfill workers publish snapshots to a shared sink ---------------------------


class Repos:
    """Signed repos (tests.support.generate) for a set of DIDs, served by a FaultServer as PLC + PDS.
    The first getRepo of `hang_on` stalls (until the server stops) so a worker can die mid-fetch."""

    def __init__(self, srv: FaultServer, n: int, *, hang_on: int | None = None) -> None:
        rng = random.Random(31)
        self.idents: list[GeneratedIdentity] = [make_identity(rng) for _ in range(n)]
        self.cars = {i.did: generate_repo(rng, did=i.did, key=i.secret, n_records=rng.randint(3, 25))
                     for i in self.idents}
        self.hang_did = self.idents[hang_on].did if hang_on is not None else None
        self.hanging = threading.Event()
        for ident in self.idents:
            srv.script(f"/{ident.did}", json_reply(did_document(ident, srv.url)))
        srv.script(GET_REPO, self._get_repo)

    @property
    def dids(self) -> list[str]:
        return [i.did for i in self.idents]

    def _get_repo(self, seen: Seen) -> Reply:
        did = seen.query["did"]
        if did == self.hang_did and not self.hanging.is_set():
            self.hanging.set()
            return Reply(200, self.cars[did], delay=120)
        return Reply(200, self.cars[did])

    def truth(self) -> dict[str, dict[tuple[str, str], str]]:
        return {d: parse_repo(car, did=d, key=None).records for d, car in self.cars.items()}


Track = dict[str, set[str]]  # worker name -> DIDs in flight; "done" -> DIDs backfilled
finished: dict[str, list[str]] = defaultdict(list)  # worker name -> DIDs it backfilled, in order


@asynccontextmanager
async def worker(name: str, bs: str, tmp_path: Path, srv: FaultServer, *, group: str, prefix: str,
                 inflight: Track) -> AsyncIterator[BackfillWorker]:
    """One `skyfill backfill-worker`: its own working DuckDB and publisher, the real backfiller."""
    store = Store(tmp_path / f"{name}.duckdb")
    config = BackfillConfig(plc_url=srv.url, allow_private_hosts=True, request_backoff=0.01, concurrency=2)
    try:
        async with KafkaPublisher(bs, records_topic=f"{prefix}.records", repos_topic=f"{prefix}.repos") as pub:
            sink = StoreReconciler(store, publish=pub.publish, snapshot=True)
            async with open_backfiller(store, config=config, sink=sink, progress=False) as bf:
                one = backfill_one_from(bf)

                async def tracked(did: str) -> None:
                    inflight[name].add(did)
                    try:
                        await one(did)
                        inflight["done"].add(did)
                        finished[name].append(did)
                    finally:
                        inflight[name].discard(did)

                async with BackfillWorker(bs, tracked, topic=f"{prefix}.backfill", group_id=group, concurrency=2,
                                          session_timeout_ms=FAST, heartbeat_interval_ms=FAST // 3) as w:
                    yield w
    finally:
        store.close()


async def stale_log(bs: str, prefix: str, did: str) -> None:
    """What the topics held before the backfill: firehose records of `did` that its repo no longer has."""
    async with KafkaPublisher(bs, records_topic=f"{prefix}.records", repos_topic=f"{prefix}.repos") as pub:
        await pub.publish([
            RecordChange(did=did, collection="app.bsky.feed.post", rkey=f"22222222222{i}2", op="create",
                         cid="bafyreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku", rev="2222222222222",
                         seq=i + 1, time="2023-01-01T00:00:00.000Z",
                         record='{"$type":"app.bsky.feed.post","text":"gone","createdAt":"2023-01-01T00:00:00.000Z"}',
                         source="firehose")
            for i in range(3)
        ])


async def test_two_workers_one_killed_publish_what_one_worker_does(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    bs = kafka_broker.bootstrap
    with FaultServer() as srv:
        repos = Repos(srv, 16, hang_on=7)
        dids = repos.dids
        for prefix in ("two", "solo"):
            await ensure_topics(bs, {f"{prefix}.backfill": 4, f"{prefix}.backfill.dead": 1,
                                     f"{prefix}.records": 4, f"{prefix}.repos": 4})
            await stale_log(bs, prefix, dids[0])
            assert await enqueue_backfill(bs, {d: ["gap"] for d in dids}, topic=f"{prefix}.backfill") == len(dids)

        inflight: Track = defaultdict(set)
        async with AsyncExitStack() as stack:
            workers = {n: await stack.enter_async_context(
                worker(n, bs, tmp_path, srv, group="g", prefix="two", inflight=inflight)) for n in ("w1", "w2")}
            stop = asyncio.Event()
            tasks = {n: asyncio.create_task(w.run(stop=stop)) for n, w in workers.items()}
            await asyncio.to_thread(repos.hanging.wait, 60)
            victim = next(n for n in workers if repos.hang_did in inflight[n])
            survivor = "w2" if victim == "w1" else "w1"
            tasks[victim].cancel()  # killed mid-fetch: its uncommitted requests go to the survivor
            with pytest.raises(asyncio.CancelledError):
                await tasks[victim]
            await workers[victim].aclose()
            # What the group had committed when the victim died: the survivor takes over from there.
            reader = AIOKafkaConsumer(bootstrap_servers=bs, group_id="g", enable_auto_commit=False)
            await reader.start()
            try:
                tps = [TopicPartition("two.backfill", p) for p in range(4)]
                committed = {tp.partition: await reader.committed(tp) or 0 for tp in tps}
            finally:
                await reader.stop()
            before = len(finished[survivor])
            # The request the victim died on is redone by the survivor, not lost.
            await apoll(lambda: set(dids) <= inflight["done"], timeout=90)
            stop.set()
            await asyncio.wait_for(tasks[survivor], 30)
            assert srv.count(GET_REPO) > len(dids)
            # The survivor redoes only requests the group had not committed: the victim's
            # requests behind the one it died on (a partition's commit never passes an
            # unfinished request), never one below a committed offset; each once, but for the
            # (at most `concurrency` = 2) it had in flight when the rebalance moved their partition.
            where = {m.key.decode(): (m.partition, m.offset)
                     for m in await consume_all(bs, ["two.backfill"], len(dids))}
            uncommitted = {d for d, (p, off) in where.items() if off >= committed[p]}
            redone = finished[survivor][before:]
            assert repos.hang_did in redone and set(redone) <= uncommitted
            assert len(redone) <= len(uncommitted) + 2
            assert workers[survivor].processed > 0 and workers[survivor].processed <= before + len(uncommitted) + 2

        async with worker("solo", bs, tmp_path, srv, group="solo", prefix="solo", inflight=inflight) as w:
            await w.run(exit_when_idle=True)
            assert w.processed == len(dids)

    two = await sink_mirror(bs, tmp_path / "two-sink.duckdb", topics=Topics("two.records", "two.repos"), group="a")
    solo = await sink_mirror(bs, tmp_path / "solo-sink.duckdb", topics=Topics("solo.records", "solo.repos"),
                             group="b")
    assert two == solo
    got: dict[str, dict[tuple[str, str], str]] = {d: {} for d in dids}
    for did, col, rkey, cid, _rev in two[0]:
        got[did][(col, rkey)] = cid
    assert got == repos.truth()  # the stale records of dids[0] were dropped by its snapshot
    assert {r[0] for r in two[1]} == set(dids)


# -- 5. `skyfill gaps --enqueue kafka` --------------------------------------------------------------


def test_gaps_enqueue_kafka_publishes_requests_and_plain_enqueue_still_means_db(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from skyfill.cli import main

    db = str(tmp_path / "gaps.duckdb")
    dids = ["did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb", "did:web:x.example"]
    with Store(db) as store:  # the first two DIDs' PDS is known (identity cache): their requests are keyed by it
        store.save_identities([IdentityRow(d, "https://pds.example", "zQ3sh", None, "{}", time.time()) for d in dids[:2]])
    base = ["gaps", "--db", db, "--start", "2025-03-10", "--end", "2025-03-10", "--no-audit", "--json",
            "--dids", ",".join(dids)]
    missing = CliRunner().invoke(main, [*base, "--enqueue", "kafka"])
    assert missing.exit_code != 0 and "--kafka-bootstrap" in missing.output
    out = CliRunner().invoke(main, [*base, "--enqueue", "kafka", "--kafka-bootstrap", kafka_broker.bootstrap])
    assert out.exit_code == 0, out.output
    assert orjson.loads(out.output)["enqueued"] == 3
    msgs = asyncio.run(consume_all(kafka_broker.bootstrap, ["skyfill.backfill"], 3))
    backfill_schema = schema("backfill.v1.json")
    for m in msgs:
        backfill_schema.validate(orjson.loads(m.value))
    # keyed by host where known (one partition, so one worker, paces each host), else by DID
    keys = {orjson.loads(m.value)["did"]: (m.key.decode(), m.partition, orjson.loads(m.value)["reasons"]) for m in msgs}
    assert {d: (k, r) for d, (k, _, r) in keys.items()} == {
        dids[0]: ("https://pds.example", ["explicit"]), dids[1]: ("https://pds.example", ["explicit"]),
        dids[2]: (dids[2], ["explicit"])}
    assert keys[dids[0]][1] == keys[dids[1]][1]
    # `--enqueue` alone is the DuckDB queue, as before
    db_mode = CliRunner().invoke(main, [*base, "--enqueue"])
    assert db_mode.exit_code == 0, db_mode.output
    assert orjson.loads(db_mode.output)["enqueued"] == 3
    with Store(db) as store:
        assert sorted(d for (d,) in store.fetchall("SELECT did FROM backfill_queue")) == sorted(dids)
