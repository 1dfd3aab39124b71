"""The lake rows of `python -m bench.scale`: real `skyfill sink` processes into one DuckLake vs a file.

One Kafka-protocol broker (tests/support/kafka.py) holds the same pre-published messages for every
run: `records` record changes in firehose commits of one op each (5% deletes of an earlier record of
the same DID), each commit followed by its repo message, 20 records a DID, keyed by DID on topics of
PARTITIONS partitions, as the daemon's KafkaPublisher sends them (publish/). Then, each run a consumer
group of its own reading every message from offset 0:
    lake.1   one `skyfill sink` into a fresh lake (catalog: a database of a throwaway PostgreSQL,
             tests/support/postgres.py; data: Parquet files in a temp dir)
    lake.2   two `skyfill sink` processes in one consumer group (PARTITIONS split between them) into
             another fresh lake on the same PostgreSQL
    file     one `skyfill sink` into a DuckDB file
A run lasts from spawning the sinks until the group's committed offsets reach the end of every
partition (polled every POLL_S); records/s = record messages / that time, start-up included.
Each process's CPU (user + sys) is read from /proc when the group is drained, before it is told to
stop, as is the catalog PostgreSQL's (postmaster + backends, reaped ones included) and the broker's.
The sinks run bench/scale/lake_sink.py: `skyfill sink` itself, which reports its conflict retries.
Afterwards every target must hold the same live records, and the one-sink lake is compacted
(`Store.compact`, timed) for its bytes per record: Parquet bytes on disk / live records, before and
after; the catalog database's size is reported apart.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libipld
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bench.harness import Row
from skyfill.protocol.records import record_json
from skyfill.publish import KafkaPublisher, RECORDS_TOPIC, REPOS_TOPIC
from skyfill.storage import Change, RecordChange, RepoChange, Store
from skyfill.storage.lake import lake_db
from tests.support.generate.records import RecordMaker, iso_time, tid
from tests.support.kafka import KafkaBroker
from tests.support.postgres import PostgresCluster, lake_url

__all__ = ["LakeRun", "LakeResult", "measure_lake", "lake_rows", "changes"]

PARTITIONS = 4
RECORDS_PER_DID = 20
DELETE_SHARE = 0.05
PUBLISH_CHUNK = 20_000
POLL_S = 0.5
_TICK = os.sysconf("SC_CLK_TCK")
_ROOT = Path(__file__).resolve().parents[2]
_Say = Callable[[str], None]


def changes(n_records: int, *, seed: int = 13) -> Iterator[list[Change]]:
    """Chunks of firehose changes: `n_records` record changes (one a commit; DELETE_SHARE of them
    delete an earlier record of the DID), each followed by the DID's repo message."""
    rng = random.Random(seed)
    dids = [f"did:plc:{rng.randbytes(12).hex()[:24]}" for _ in range(max(1, n_records // RECORDS_PER_DID))]
    maker = RecordMaker(rng, peers=dids)
    held: dict[str, list[tuple[str, str]]] = {}
    micros = 1_700_000_000_000_000
    out: list[Change] = []
    for seq in range(1, n_records + 1):
        micros += rng.randrange(1, 2_000)
        did = dids[rng.randrange(len(dids))]
        rev, at = tid(micros, 0), iso_time(micros)
        mine = held.setdefault(did, [])
        if mine and rng.random() < DELETE_SHARE:
            collection, rkey = mine.pop(rng.randrange(len(mine)))
            out.append(RecordChange(did, collection, rkey, "delete", None, rev, seq, at, None, "firehose"))
        else:
            collection = maker.collection()
            block, cid = maker.encode(collection, micros)
            record, _created = record_json(block)
            rkey = tid(micros, rng.randrange(1024))
            mine.append((collection, rkey))
            out.append(RecordChange(did, collection, rkey, "create", libipld.encode_cid(cid), rev, seq, at, record,
                                    "firehose"))
        out.append(RepoChange(did, "commit", rev, None, True, "active", None, "synchronized", None, seq, at,
                              "firehose"))
        if len(out) >= PUBLISH_CHUNK:
            yield out
            out = []
    if out:
        yield out


async def _publish(bootstrap: str, n_records: int) -> dict[str, int]:
    """Publish the changes; returns messages per topic."""
    sent = {RECORDS_TOPIC: 0, REPOS_TOPIC: 0}
    async with KafkaPublisher(bootstrap, create_partitions=PARTITIONS) as publisher:
        for chunk in changes(n_records):
            await publisher.publish(chunk)
            for c in chunk:
                sent[RECORDS_TOPIC if isinstance(c, RecordChange) else REPOS_TOPIC] += 1
    return sent


def _partitions() -> list[TopicPartition]:
    return [TopicPartition(t, p) for t in (RECORDS_TOPIC, REPOS_TOPIC) for p in range(PARTITIONS)]


async def _ends(bootstrap: str) -> tuple[dict[TopicPartition, int], int]:
    """The offset after the last message of every partition, and the messages held, read by
    consuming them all (this broker's ListOffsets answers the last batch's base, not the end)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_partition_fetch_bytes=8 << 20)
    await consumer.start()
    try:
        tps = _partitions()
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = dict.fromkeys(tps, 0)
        count = 0
        while True:
            got = await consumer.getmany(timeout_ms=3000, max_records=50_000)
            if not got:
                return ends, count
            for tp, msgs in got.items():
                ends[tp] = msgs[-1].offset + 1
                count += len(msgs)
    finally:
        await consumer.stop()


async def _committed(bootstrap: str, group: str) -> dict[TopicPartition, int]:
    """The group's committed offsets (0 where none)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        got = await admin.list_consumer_group_offsets(group, partitions=_partitions())
        return {tp: max(0, meta.offset) for tp, meta in got.items()}
    finally:
        await admin.close()


def _cpu(pid: int) -> float:
    """CPU seconds (user + sys) of a live process, and of its children it has reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / _TICK  # utime stime cutime cstime


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError):
                pass
    return out


def _tree_cpu(pid: int) -> float:
    """A server's CPU seconds: itself, its reaped children and its live children (PostgreSQL's backends)."""
    total = _cpu(pid)
    for child in _children(pid):
        try:
            total += _cpu(child)
        except OSError:
            pass  # exited between the listing and the read (then counted once reaped)
    return total


def _disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


@dataclass(slots=True)
class LakeRun:
    """One target: `sinks` processes writing `db`."""

    name: str
    sinks: int
    seconds: float = 0.0
    startup_s: float = 0.0           # spawn -> first committed offset
    cpu_s: list[float] = field(default_factory=list)   # per sink, at drain
    retries: float = 0.0
    pg_cpu_s: float = 0.0
    broker_cpu_s: float = 0.0
    live: int = 0
    load: float = 0.0                # mean 1-minute load average while it ran (the machine is shared)
    reports: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class LakeResult:
    records: int
    messages: int
    runs: dict[str, LakeRun] = field(default_factory=dict)
    parquet_bytes: int = 0           # the one-sink lake's live Parquet files (current snapshot), as written
    compacted_bytes: int = 0         # ... after Store.compact
    disk_bytes: int = 0              # its data path on disk after compaction (older snapshots' files too)
    compact_s: float = 0.0
    catalog_bytes: int = 0           # the one-sink lake's catalog database (pg_database_size)
    file_bytes: int = 0
    publish_s: float = 0.0


def _run_sinks(run: LakeRun, db: str, bootstrap: str, ends: dict[TopicPartition, int], tmp: Path,
               pids: dict[str, int], say: _Say, timeout: float) -> None:
    """Spawn `run.sinks` sink processes in group `run.name`, wait for the group to drain, stop them."""
    group = f"bench-{run.name}"
    total = sum(ends.values())  # offsets: the messages when they start at 0, as on a fresh broker
    reports = [tmp / f"{run.name}-{i}.json" for i in range(run.sinks)]
    pg0 = _tree_cpu(pids["postgres"]) if "postgres" in pids else 0.0
    broker0 = _cpu(pids["broker"])
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "bench.scale.lake_sink", str(out), "--kafka-bootstrap", bootstrap,
                               "--db", db, "--group-id", group],
                              cwd=_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=open(tmp / f"{run.name}-{i}.log", "wb"))
             for i, out in enumerate(reports)]
    try:
        first: float | None = None
        last_say = started
        loads: list[float] = []
        while True:
            loads.append(os.getloadavg()[0])
            done = sum(asyncio.run(_committed(bootstrap, group)).values())
            now = time.perf_counter()
            if done and first is None:
                first = now
            if done >= total:
                break
            dead = [p.args for p in procs if p.poll() is not None]
            if dead or now - started > timeout:
                raise RuntimeError(f"{run.name}: {done:,}/{total:,} messages after {now - started:.0f}s; "
                                   f"exited: {len(dead)} (logs in {tmp})")
            if now - last_say > 30:
                say(f"  [{run.name}] {done:,}/{total:,} messages ({done / (now - started):,.0f}/s)")
                last_say = now
            time.sleep(POLL_S)
        run.seconds = time.perf_counter() - started
        run.startup_s = (first or started) - started
        run.load = sum(loads) / len(loads)
        run.cpu_s = [_cpu(p.pid) for p in procs]
        run.pg_cpu_s = (_tree_cpu(pids["postgres"]) - pg0) if "postgres" in pids else 0.0
        run.broker_cpu_s = _cpu(pids["broker"]) - broker0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    run.reports = [json.loads(r.read_text()) for r in reports if r.exists()]
    bad = [r for r in run.reports if r["status"] != 0]
    if len(run.reports) != run.sinks or bad:
        raise RuntimeError(f"{run.name}: a sink failed: {bad or 'no report'} (logs in {tmp})")
    run.retries = sum(r["retries"] for r in run.reports)


def _postmaster(pg: PostgresCluster) -> int:
    return int((pg.data / "postmaster.pid").read_text().split()[0])


def _parquet(pg: PostgresCluster, database: str) -> int:
    """Bytes of the Parquet data and delete files the lake's current snapshot reads."""
    return int(pg.psql(
        "SELECT (SELECT coalesce(sum(file_size_bytes), 0) FROM ducklake_data_file WHERE end_snapshot IS NULL)"
        " + (SELECT coalesce(sum(file_size_bytes), 0) FROM ducklake_delete_file WHERE end_snapshot IS NULL)",
        database).strip())


def _compact(db: str) -> float:
    started = time.perf_counter()
    with Store(db) as store:
        store.compact()
    return time.perf_counter() - started


def _live(db: str) -> int:
    with Store(db) as store:
        return int(store.fetchall("SELECT count(*) FROM records")[0][0])


def measure_lake(n_records: int, say: _Say, *, timeout: float = 3600) -> LakeResult:
    """The three runs on one broker and one PostgreSQL (see the module's docstring)."""
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="skyfill-lake-scale-")))
        broker = stack.enter_context(KafkaBroker())
        pg = stack.enter_context(PostgresCluster())
        t0 = time.perf_counter()
        sent = asyncio.run(_publish(broker.bootstrap, n_records))
        result = LakeResult(n_records, sum(sent.values()), publish_s=time.perf_counter() - t0)
        ends, held = asyncio.run(_ends(broker.bootstrap))
        if held != result.messages:
            raise RuntimeError(f"published {result.messages} messages, the broker holds {held}")
        say(f"lake: the broker holds them all ({held:,} messages read back)")
        say(f"lake: {n_records:,} records ({result.messages:,} messages, {PARTITIONS} partitions a topic) "
            f"published in {result.publish_s:.0f}s")
        pids = {"broker": broker.pid, "postgres": _postmaster(pg)}
        targets: dict[str, tuple[int, str, Path]] = {}
        for name, sinks in (("lake.1", 1), ("lake.2", 2)):
            database = name.replace(".", "_")
            data = tmp / database
            targets[name] = (sinks, lake_db(lake_url(pg.create_database(database)), data), data)
        targets["file"] = (1, str(tmp / "file.duckdb"), tmp / "file.duckdb")
        for name, (sinks, db, _path) in targets.items():
            Store(db).close()  # the schema, once, before the clock starts
            run = LakeRun(name, sinks)
            say(f"lake: [{name}] {sinks} sink(s) start")
            _run_sinks(run, db, broker.bootstrap, ends, tmp, pids if name != "file" else {"broker": pids["broker"]},
                       say, timeout)
            run.live = _live(db)
            result.runs[name] = run
            say(f"lake: [{name}] {n_records / run.seconds:,.0f} records/s ({run.seconds:.1f}s, start-up "
                f"{run.startup_s:.1f}s), sink CPU {', '.join(f'{c:.0f}s' for c in run.cpu_s)}, PostgreSQL "
                f"{run.pg_cpu_s:.0f}s, broker {run.broker_cpu_s:.0f}s, retries {run.retries:.0f}, "
                f"{run.live:,} live records")
        lives = {name: run.live for name, run in result.runs.items()}
        if len(set(lives.values())) != 1:
            raise RuntimeError(f"the targets hold different live records: {lives}")
        _sinks, db1, data1 = targets["lake.1"]
        result.parquet_bytes = _parquet(pg, "lake_1")
        result.compact_s = _compact(db1)
        result.compacted_bytes = _parquet(pg, "lake_1")
        result.disk_bytes = _disk(data1)
        result.catalog_bytes = int(pg.psql("SELECT pg_database_size('lake_1')").strip())
        _compact(targets["file"][1])  # as the file's scale.bytes_per_record: compacted, checkpointed at close
        result.file_bytes = _disk(targets["file"][2])
        live = result.runs["lake.1"].live
        say(f"lake: Parquet {result.parquet_bytes / live:.0f} B/record as written, "
            f"{result.compacted_bytes / live:.0f} after compaction ({result.compact_s:.1f}s; on disk "
            f"{result.disk_bytes / live:.0f} with the older snapshots' files); catalog "
            f"{result.catalog_bytes / 1e6:.1f} MB; file {result.file_bytes / live:.0f} B/record")
        return result


def lake_rows(r: LakeResult, *, cores: int | None = None) -> list[Row]:
    """The lake.* rows. The projection: with every sink CPU-bound on a machine of its own, each added
    machine adds what one sink writes alone (lake.1's rate), as long as the catalog keeps up."""
    one, two, file = r.runs["lake.1"], r.runs["lake.2"], r.runs["file"]
    rate = {name: r.records / run.seconds for name, run in r.runs.items()}
    live = max(1, one.live)
    rows = [
        Row("lake.sink.records_per_s.1", rate["lake.1"], "records/s"),
        Row("lake.sink.records_per_s.2", rate["lake.2"], "records/s"),
        Row("lake.sink.vs_one.2", rate["lake.2"] / rate["lake.1"], "x"),
        Row("lake.sink.startup_s.1", one.startup_s, "s"),
        Row("lake.sink.startup_s.2", two.startup_s, "s"),
        Row("lake.file.records_per_s", rate["file"], "records/s"),
        Row("lake.vs_file", rate["lake.1"] / rate["file"], "x"),
        # the same ratio in records per sink CPU second: the one that survives a shared machine's load
        Row("lake.vs_file.cpu", (r.records / sum(one.cpu_s)) / (r.records / sum(file.cpu_s)), "x"),
        Row("lake.bytes_per_record", r.compacted_bytes / live, "B"),
        Row("lake.bytes_per_record.uncompacted", r.parquet_bytes / live, "B"),
        Row("lake.bytes_per_record.on_disk", r.disk_bytes / live, "B"),
        Row("lake.file.bytes_per_record", r.file_bytes / live, "B"),
        Row("lake.catalog_mb", r.catalog_bytes / 1e6, "MB"),
        Row("lake.compact_s", r.compact_s, "s"),
        Row("lake.retries.2", two.retries, "txns"),
    ]
    for name, run in (("1", one), ("2", two), ("file", file)):
        for i, cpu in enumerate(run.cpu_s):
            rows.append(Row(f"lake.cpu_s.{name}.sink{i + 1}", cpu, "s"))
            rows.append(Row(f"lake.cpu_share.{name}.sink{i + 1}", cpu / run.seconds, "cores"))
        rows.append(Row(f"lake.records_per_cpu_s.{name}", r.records / sum(run.cpu_s), "records/s"))
        if name != "file":
            rows.append(Row(f"lake.cpu_s.{name}.postgres", run.pg_cpu_s, "s"))
        rows.append(Row(f"lake.loadavg.{name}", run.load, "load"))
        rows.append(Row(f"lake.cpu_s.{name}.broker", run.broker_cpu_s, "s"))
    # records per CPU second of one sink: what a machine of its own would write when CPU-bound
    rows.append(Row("lake.projected_records_per_s_per_machine", r.records / one.cpu_s[0], "records/s"))
    rows.append(Row("lake.catalog_cpu_per_1k_records", one.pg_cpu_s / r.records * 1000, "s"))
    return rows
