"""The mirror on a lake, end to end: real `skyfill` processes, a real PostgreSQL catalog, a real Kafka-protocol
broker and the real reference PDS (issue 13).

One lake (`--db ducklake:postgres:... --data-path DIR`) is written at once by the daemon (`skyfill consume
--kafka-bootstrap`: the firehose, its cursor and coverage), two `skyfill sink`s (one consumer group: the
topics, including the workers' snapshots) and two `skyfill backfill-worker`s (requests from `skyfill gaps
--enqueue kafka`), while accounts create, update and delete. At the end the lake equals every account's
getRepo (tests/support/oracle.py), holds each record and repo once, `skyfill export` writes the same rows,
and a DuckDB that knows nothing of skyfill (it LOADs the two extension files and ATTACHes the lake) counts
what `skyfill status` reports. Then `skyfill backfill` (direct, no Kafka) into a second lake ends equal too.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq

from skyfill.app.daemon_client import find_daemon
from skyfill.publish import BACKFILL_TOPIC, RECORDS_TOPIC, REPOS_TOPIC
from skyfill.publish.topics import ensure_topics
from skyfill.storage import Store
from skyfill.storage.lake import connect_lake, lake_db
from tests.support.daemon import ROOT, announced
from tests.support.kafka import KafkaBroker
from tests.support.network import LocalNetwork, PdsAccount, PdsClient, RecordRef, post_record
from tests.support.oracle import commit_seq, fetch_truth, head_seq, mirror_diff
from tests.support.postgres import PostgresCluster, lake_url
from tests.support.wait import poll

MakeAccount = Callable[..., PdsAccount]
POST = "app.bsky.feed.post"
PROFILE = "app.bsky.actor.profile"
FOLLOW = "app.bsky.graph.follow"
RECORDS = "SELECT did, collection, rkey, cid, rev FROM records ORDER BY ALL"


class Lake:
    """A new lake: its `--db`/`--data-path` flags, and the one db string skyfill makes of them."""

    def __init__(self, pg: PostgresCluster, tmp_path: Path) -> None:
        name = "lake_" + secrets.token_hex(4)
        self.catalog = lake_url(pg.create_database(name))
        self.data_path = tmp_path / name
        self.db = lake_db(self.catalog, self.data_path)
        self.flags = ["--db", self.catalog, "--data-path", str(self.data_path)]


class Procs:
    """`python -m skyfill ...` processes with JSON logs in files; all stopped (SIGTERM) on exit."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.tmp_path = tmp_path
        self.env = {**os.environ, "SKYFILL_LOG_JSON": "1", **env}
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def log(self, name: str) -> Path:
        return self.tmp_path / f"{name}.log"

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with self.log(name).open("wb") as err, (self.tmp_path / f"{name}.out").open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "skyfill", *args], cwd=ROOT, env=self.env,
                                    stdout=out, stderr=err)
        self.running[name] = proc
        return proc

    def run(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run([sys.executable, "-m", "skyfill", *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)
        assert done.returncode == 0, f"skyfill {args[0]} exited {done.returncode}:\n{done.stderr[-4000:]}"
        return done.stdout

    def alive(self) -> None:
        """Fail with the log of any process that died."""
        for name, proc in self.running.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited {proc.returncode}:\n{self.log(name).read_text()[-4000:]}")

    def output(self, name: str) -> str:
        return (self.tmp_path / f"{name}.out").read_text()

    def stop(self, name: str) -> int:
        proc = self.running.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"{name} ignored SIGTERM:\n{self.log(name).read_text()[-4000:]}") from None

    def close(self) -> None:
        for name in list(self.running):
            proc = self.running.pop(name)
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@contextmanager
def processes(tmp_path: Path, env: dict[str, str]) -> Iterator[Procs]:
    procs = Procs(tmp_path, env)
    try:
        yield procs
    finally:
        procs.close()


def post(c: PdsClient, who: PdsAccount, text: str) -> RecordRef:
    return c.create_record(who, POST, post_record(text))


def profile(c: PdsClient, who: PdsAccount, name: str) -> RecordRef:
    return c.put_record(who, PROFILE, "self", {"$type": PROFILE, "displayName": name})


def follow(c: PdsClient, who: PdsAccount, whom: PdsAccount) -> RecordRef:
    return c.create_record(who, FOLLOW, {"$type": FOLLOW, "subject": whom.did,
                                         "createdAt": post_record("")["createdAt"]})


def truths(c: PdsClient, dids: list[str]) -> dict[str, Any]:
    return {did: fetch_truth(c, did).records for did in dids}


def plain_duckdb(catalog: str, tmp_path: Path) -> duckdb.DuckDBPyConnection:
    """A DuckDB that knows nothing of skyfill: the two extension files from their wheels, one ATTACH."""
    version = f"v{duckdb.__version__}"
    exts = {name: Path(next(iter(importlib.util.find_spec(f"duckdb_extension_{name}").submodule_search_locations)))
            / "extensions" / version for name in ("ducklake", "postgres")}
    link = tmp_path / "postgres_scanner.duckdb_extension"
    if not link.exists():
        link.symlink_to(exts["postgres"] / "postgres.duckdb_extension")
    con = duckdb.connect()
    con.execute(f"LOAD '{exts['ducklake'] / 'ducklake.duckdb_extension'}'")
    con.execute(f"LOAD '{link}'")
    con.execute(f"ATTACH '{catalog}' AS mirror (READ_ONLY)")
    con.execute("USE mirror")
    return con


def test_daemon_two_sinks_and_two_workers_write_one_lake_equal_to_get_repo(
    pds_network: LocalNetwork, pds_client: PdsClient, make_account: MakeAccount, kafka_broker: KafkaBroker,
    postgres_cluster: PostgresCluster, tmp_path: Path,
) -> None:
    c, bs = pds_client, kafka_broker.bootstrap
    lake = Lake(postgres_cluster, tmp_path)
    Store(lake.db).close()  # the schema, once, before five processes open it
    asyncio.run(ensure_topics(bs, {RECORDS_TOPIC: 4, REPOS_TOPIC: 4, BACKFILL_TOPIC: 4, f"{BACKFILL_TOPIC}.dead": 1}))

    # history: written before skyfill ran, only a backfill brings it in
    old = [make_account(f"lold{i}") for i in range(3)]
    history: dict[str, list[RecordRef]] = {u.did: [post(c, u, f"{u.handle} old {i}") for i in range(5)] for u in old}
    for u in old:
        profile(c, u, "before")
    c.delete_record(old[0], POST, history[old[0].did][0].rkey)
    since = datetime.now(UTC) - timedelta(minutes=1)
    start = head_seq(c)

    env = {"SKYFILL_PLC_URL": pds_network.plc_url, "SKYFILL_ALLOW_PRIVATE_HOSTS": "1",
           "SKYFILL_KAFKA_BOOTSTRAP": bs}
    with processes(tmp_path, env) as procs:
        daemon = procs.spawn("consume", "consume", *lake.flags, "--relay", pds_network.pds_url, "--cursor", str(start),
                             "--flush-interval", "0.05", "--batch-events", "50")
        announced(lake.db, daemon, log=procs.log("consume"), timeout=120)
        for n in (1, 2):
            procs.spawn(f"sink{n}", "sink", *lake.flags, "--group-id", "lake")

        # live: new accounts and the old ones write while the daemon and the sinks run
        new = [make_account(f"lnew{i}") for i in range(2)]
        everyone = old + new
        refs: dict[str, list[RecordRef]] = {u.did: [post(c, u, f"{u.handle} live {i}") for i in range(4)] for u in new}
        for i, u in enumerate(everyone):
            follow(c, u, everyone[(i + 1) % len(everyone)])
            profile(c, u, f"live {i}")                             # an update for the old ones
            extra = post(c, u, f"{u.handle} live extra")
            c.delete_record(u, POST, extra.rkey)                   # a create and its delete
        c.delete_record(old[1], POST, history[old[1].did][1].rkey)  # a delete of history
        c.delete_record(new[0], POST, refs[new[0].did][0].rkey)
        procs.alive()

        # a lake has many writers: a command that opens it leaves the daemon's announcement alone
        procs.run("migrate", *lake.flags)
        assert (find_daemon(lake.db) or {}).get("pid") == daemon.pid

        # which DIDs need a backfill: every one (never backfilled), requests on Kafka
        out = procs.run("gaps", *lake.flags, "--start", since.isoformat(),
                        "--end", (datetime.now(UTC) + timedelta(minutes=5)).isoformat(),
                        "--enqueue", "kafka", "--json")
        report = json.loads(out)
        assert set(report["dids"]) >= {u.did for u in everyone}, report
        assert report["enqueued"] >= len(everyone)
        for n in (1, 2):  # a worker's --db is its working store; its results reach the lake through the sinks
            procs.spawn(f"worker{n}", "backfill-worker", "--db", str(tmp_path / f"worker{n}.duckdb"),
                        "--concurrency", "2")

        # writes while the workers backfill
        for i, u in enumerate(everyone):
            post(c, u, f"{u.handle} during backfill")
            profile(c, u, f"during {i}")
        last = post(c, new[1], "the last write")
        target = commit_seq(c, new[1].did, last.commit.rev, since=start)

        dids = [u.did for u in everyone]
        reader = connect_lake(lake.db, read_only=True)
        diff: list[str] = ["not checked yet"]

        def equal() -> bool:
            procs.alive()
            cursor = reader.execute("SELECT max(seq) FROM cursors").fetchall()[0][0]  # one source: the PDS
            if (cursor or 0) < target:
                return False
            diff[:] = mirror_diff(reader, c, dids)
            return not diff

        try:
            poll(equal, timeout=300, interval=0.3, what="the lake to equal getRepo")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {diff[:40]}") from None
        # `skyfill status` reads the lake itself while the daemon writes it
        running = json.loads(procs.run("status", *lake.flags, "--json"))
        assert running["consumer_running"] is True and running["cursors"][0]["seq"] >= target
        assert running["records"]["total"] == sum(len(truth) for truth in truths(c, dids).values())
        for name in ("worker1", "worker2", "sink1", "sink2", "consume"):
            assert procs.stop(name) == 0, procs.log(name).read_text()[-4000:]
        reader.close()
        applied = [int(procs.output(f"sink{n}").split()[1].rstrip(",")) for n in (1, 2)]  # "applied N, skipped M ..."
        assert sum(applied) > 0, applied
    # every DID was backfilled once by one of the workers (the history is in the lake only through them)
    done: dict[str, int] = {}
    for n in (1, 2):
        with Store(tmp_path / f"worker{n}.duckdb", read_only=True) as worker:
            for did, in worker.fetchall("SELECT did FROM repos WHERE backfill_status = 'ok'"):
                done[did] = done.get(did, 0) + 1
    assert set(done) == set(dids), done

    with Store(lake.db, read_only=True) as store:
        assert mirror_diff(store, c, dids) == []  # still equal with every writer stopped
        assert store.fetchall("SELECT did, collection, rkey FROM records GROUP BY ALL HAVING count(*) > 1") == []
        assert store.fetchall("SELECT did FROM repos GROUP BY did HAVING count(*) > 1") == []
        mine = store.fetchall(RECORDS)
        counts = {"repos": store.fetchall("SELECT count(*) FROM repos")[0][0],
                  "records": store.fetchall("SELECT count(*) FROM records")[0][0],
                  "collections": dict(store.fetchall("SELECT collection, count(*) FROM records GROUP BY 1")),
                  "backfilled": store.fetchall("SELECT count(*) FROM repos WHERE backfill_status = 'ok' "
                                               "AND backfilled_at IS NOT NULL")[0][0]}

    # `skyfill export` from the lake: the same rows, in Parquet
    exported = tmp_path / "export"
    with processes(tmp_path, env) as procs:
        procs.run("export", *lake.flags, "--parquet", str(exported))
        table = pq.read_table(exported, partitioning="hive")
        rows = sorted(zip(table["did"].to_pylist(), [str(x) for x in table["collection"].to_pylist()],
                          table["rkey"].to_pylist(), table["cid"].to_pylist(), table["rev"].to_pylist(), strict=True))
        assert rows == mine

        # `skyfill status` against a DuckDB client that knows nothing of skyfill
        status = json.loads(procs.run("status", *lake.flags, "--json"))
        plain = plain_duckdb(lake.catalog, tmp_path)
        try:
            theirs = plain.execute(RECORDS).fetchall()
            assert theirs == mine
            assert status["records"]["total"] == len(theirs) == counts["records"]
            assert status["repos"]["total"] == plain.execute("SELECT count(*) FROM repos").fetchall()[0][0] \
                == counts["repos"]
            by_collection = dict(plain.execute("SELECT collection, count(*) FROM records GROUP BY 1").fetchall())
            assert status["records"]["by_collection"] == by_collection == counts["collections"]
            for key, column in (("by_sync_state", "sync_state"), ("by_status", "status"),
                                ("by_backfill_status", "coalesce(backfill_status, 'never')")):
                assert status["repos"][key] == dict(plain.execute(
                    f"SELECT {column}, count(*) FROM repos GROUP BY 1").fetchall()), key
            cursors = plain.execute("SELECT source, arg_max(seq, updated_at) FROM cursors GROUP BY 1").fetchall()
            assert [(c_["source"], c_["seq"]) for c_ in status["cursors"]] == cursors and cursors[0][1] >= target
        finally:
            plain.close()

        # the sinks recorded the workers' backfills in the lake's repo rows: gaps no longer asks for them
        after = json.loads(procs.run("gaps", *lake.flags, "--start", since.isoformat(), "--end",
                                     (datetime.now(UTC) + timedelta(minutes=5)).isoformat(), "--no-audit", "--json"))
        assert {d for d, reasons in after["dids"].items() if "never_backfilled" in reasons} & set(dids) == set()
        assert counts["backfilled"] == len(dids)

        # `skyfill backfill` straight into a second lake (no Kafka, no daemon) ends equal too, and so does a
        # worker whose working store is a lake (a new group: the same requests again), at the same time
        direct, solo = Lake(postgres_cluster, tmp_path), Lake(postgres_cluster, tmp_path)
        Store(solo.db).close()
        worker = procs.spawn("solo", "backfill-worker", *solo.flags, "--group-id", "solo", "--exit-when-idle")
        summary = json.loads(procs.run("backfill", *direct.flags, "--dids", ",".join(dids), "--json"))
        assert summary["repos_ok"] == len(dids), summary
        assert worker.wait(300) == 0, procs.log("solo").read_text()[-4000:]
        assert int(procs.output("solo").split()[1]) >= len(dids)  # "backfilled N requested repos"
    for backfilled in (direct, solo):
        with Store(backfilled.db, read_only=True) as store:
            assert mirror_diff(store, c, dids) == []
            assert store.fetchall("SELECT count(*) FROM repos WHERE backfill_status = 'ok'")[0][0] == len(dids)
