"""`kill -9` of a real lake writer (`skyfill consume --db ducklake:...`), mid-commit, again and again.

The writer is a real process mirroring tests/support/relay.py's LocalRelay (signed frames of a
generated World) into a lake whose catalog is a real PostgreSQL. It is killed with SIGKILL six times,
each time restarted from its stored cursor, and must lose nothing and apply nothing twice.

Hitting the commit window deterministically: the test freezes the writer (SIGSTOP) at jittered
moments and looks at the frozen state; only when the state is inside the window it wants does it
send SIGKILL, else SIGCONT and it samples again. Frozen, nothing moves, so what the test saw is what
the kill interrupts. The windows:
    file     a Parquet file of the writer's transaction is in the data path but no catalog row names it:
             DuckLake wrote the transaction's data and had not committed its snapshot
    catalog  the writer's catalog connection has sent the commit's `INSERT INTO ducklake_snapshot ...`
             and is in a transaction that has not committed (pg_stat_activity: active / idle in
             transaction): the kill lands inside DuckLake's COMMIT, Postgres rolls the catalog back
    any      a moment picked at random (wherever the writer happens to be)
After every kill the lake (read by this test) must hold exactly the fold of the frames up to the
stored cursor: every event <= cursor is in the lake and none after it. At the end the lake equals
what one uninterrupted run into a DuckDB file builds, one more restart changes nothing, no record
version was appended twice, and each killed run's coverage span reads `crashed` (the last run, stopped
with SIGTERM, `clean`).

A killed transaction leaves its Parquet files in the data path, referenced by no catalog row: the
test counts them (`orphans`, printed) and checks that DuckLake's `ducklake_delete_orphaned_files`
removes exactly those and the lake still reads the same.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libipld

from skyfill.storage import Store
from skyfill.storage.lake import lake_db
from tests.support.daemon import ROOT
from tests.support.mirror import consume_until, expected_mirror, world_frames
from tests.support.postgres import PostgresCluster, lake_url
from tests.support.relay import LocalRelay
from tests.support.wait import poll

KILLS = ("catalog", "file", "any", "file", "catalog", "file")
CHUNK = 120         # frames published per step: the writer always has work when a kill is wanted
BATCH_EVENTS = 20   # events per transaction: many commits to land in
RECORDS = "SELECT did, collection, rkey, cid, rev FROM records ORDER BY ALL"
REPOS = "SELECT did, rev, data_cid, commit_cid, last_seq, handle, active, status, sync_state FROM repos ORDER BY did"


class Lake:
    """The lake under test: its catalog database (read with psql) and data path."""

    def __init__(self, pg: PostgresCluster, tmp_path: Path) -> None:
        self.pg = pg
        self.name = "crash_" + secrets.token_hex(4)
        self.catalog = lake_url(pg.create_database(self.name))
        self.data = tmp_path / self.name
        self.db = lake_db(self.catalog, self.data)

    def sql(self, query: str) -> list[str]:
        return [line for line in self.pg.psql(query, self.name).splitlines() if line]

    def on_disk(self) -> set[str]:
        return {p.name for p in self.data.rglob("*.parquet")}

    def referenced(self) -> set[str]:
        paths = self.sql("SELECT path FROM ducklake_data_file UNION ALL SELECT path FROM ducklake_delete_file")
        return {Path(p).name for p in paths}

    def orphans(self) -> set[str]:
        return self.on_disk() - self.referenced()

    def snapshots(self) -> int:
        return int(self.sql("SELECT count(*) FROM ducklake_snapshot")[0])

    def committing(self) -> bool:
        """The writer's catalog connection is inside DuckLake's commit: the snapshot row is sent, the
        catalog transaction not committed."""
        return bool(self.sql(
            f"SELECT pid FROM pg_stat_activity WHERE datname = '{self.name}' AND pid <> pg_backend_pid() "
            "AND state IN ('active', 'idle in transaction') AND query LIKE '%INSERT INTO \"public\".ducklake_snapshot %'"))


def spawn(lake: Lake, relay: LocalRelay, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "skyfill", "consume", "--db", lake.catalog, "--data-path", str(lake.data),
             "--relay", relay.url, "--flush-interval", "0.05", "--batch-events", str(BATCH_EVENTS),
             "--admin-port", "0", *extra],
            cwd=ROOT, env={**os.environ, "SKYFILL_LOG_JSON": "1"}, stdout=subprocess.DEVNULL, stderr=err)


def state(lake: Lake) -> dict[str, Any]:
    """What the lake holds now, read by a process of its own (this one)."""
    with Store(lake.db, read_only=True) as store:
        cursor = store.fetchall("SELECT arg_max(seq, updated_at) FROM cursors")[0][0]
        records = {(d, c, k): cid for d, c, k, cid, _ in store.fetchall(RECORDS)}
        revs = dict(store.fetchall("SELECT did, rev FROM repos WHERE rev IS NOT NULL"))
        return {"cursor": cursor or 0, "mirror": (records, revs), "records": store.fetchall(RECORDS),
                "repos": store.fetchall(REPOS),
                "twice": store.fetchall("SELECT count(*) FROM (SELECT did, collection, rkey, cid FROM record_log "
                                        "GROUP BY ALL HAVING count(*) > 1)")[0][0],
                "coverage": [e for (e,) in store.fetchall("SELECT ended FROM coverage ORDER BY id")]}


def frozen_when(proc: subprocess.Popen[bytes], window: Callable[[], bool], more: Callable[[], None],
                timeout: float = 240) -> int:
    """Freeze `proc` (SIGSTOP) at jittered moments until `window()` holds while it is frozen; it is
    left frozen then. `more()` publishes frames every 25 misses. Returns the number of samples."""
    rng = random.Random(proc.pid)
    deadline = time.monotonic() + timeout
    samples = 0
    while True:
        assert proc.poll() is None, "the writer exited on its own"
        assert time.monotonic() < deadline, f"no kill window in {samples} samples"
        time.sleep(rng.uniform(0.0, 0.05))  # sampling jitter, not a wait for a condition
        proc.send_signal(signal.SIGSTOP)
        samples += 1
        if window():
            return samples
        proc.send_signal(signal.SIGCONT)
        if samples % 25 == 0:
            more()


def test_a_lake_writer_killed_mid_commit_loses_nothing_and_applies_nothing_twice(
    postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    frames = world_frames(31, 12, 1500)
    lake = Lake(postgres_cluster, tmp_path)
    log = tmp_path / "consume.log"
    published = CHUNK
    orphans: set[str] = set()
    report = []
    with LocalRelay(frames[:published]) as relay:

        def more() -> None:
            nonlocal published
            if published < len(frames):
                relay.append(frames[published:published + CHUNK])
                published += CHUNK

        for n, kind in enumerate(KILLS):
            more()
            connected = len(relay.connections)
            proc = spawn(lake, relay, log, *(("--cursor", "0") if n == 0 else ()))
            try:  # the windows of the event writes: after start-up (schema, coverage span) is done and
                # n % 3 + 1 more transactions committed (the kills land at varied points of the stream)
                poll(lambda: len(relay.connections) > connected, timeout=120, what="the writer to connect", interval=0.05)
                first = lake.snapshots() + n % 3 + 1
                if kind == "file":
                    samples = frozen_when(proc, lambda: lake.snapshots() >= first and bool(lake.orphans() - orphans), more)
                elif kind == "catalog":
                    samples = frozen_when(proc, lambda: lake.snapshots() >= first and lake.committing(), more)
                else:
                    time.sleep(random.Random(n).uniform(0.2, 0.45))
                    samples = 0
            finally:
                proc.kill()  # SIGKILL, frozen or not: no flush, no goodbye
                proc.wait(timeout=30)
            now = state(lake)
            seen = [f for f in frames[:published] if libipld.decode_dag_cbor_multi(f)[1]["seq"] <= now["cursor"]]
            assert now["mirror"] == expected_mirror(seen), f"kill {n} ({kind}): the lake != the frames <= cursor"
            left = lake.orphans() - orphans
            orphans |= left
            report.append((kind, samples, now["cursor"], len(left)))
        assert any(cursor > 0 for _, _, cursor, _ in report)

        relay.append(frames[published:])
        proc = spawn(lake, relay, log)
        try:
            poll(lambda: state(lake)["cursor"] == relay.head, timeout=300, what="the restarted writer at the head",
                 interval=0.2)
        finally:
            proc.kill()  # once more, idle at the head
            proc.wait(timeout=30)
        final = state(lake)
        orphans |= lake.orphans()

        connected = len(relay.connections)
        proc = spawn(lake, relay, log)  # one more restart, at the head: nothing to do, nothing changes
        try:
            poll(lambda: len(relay.connections) > connected, timeout=120, what="the last writer to connect")
            proc.send_signal(signal.SIGTERM)  # a service manager's stop: drains, ends its span clean, exits 0
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
        again = state(lake)

    with LocalRelay(frames) as relay:
        asyncio.run(consume_until(tmp_path / "file.duckdb", relay, relay.head, timeout=180, cursor=0,
                                  batch_events=BATCH_EVENTS))
    with Store(tmp_path / "file.duckdb", read_only=True) as file:
        want_records, want_repos = file.fetchall(RECORDS), file.fetchall(REPOS)
    assert final["records"] == want_records and final["repos"] == want_repos
    assert final["mirror"] == expected_mirror(frames)
    assert again["records"] == final["records"] and again["repos"] == final["repos"] and again["cursor"] == relay.head
    assert final["twice"] == 0
    assert again["coverage"] == ["crashed"] * (len(KILLS) + 1) + ["clean"]

    # what the kills left in the data path: files no catalog row names; DuckLake removes exactly those
    print("kills (window, samples, cursor, orphaned files):", report)
    print("orphaned Parquet files:", len(orphans), "of", len(lake.on_disk()), "files,",
          sum(p.stat().st_size for p in lake.data.rglob("*.parquet") if p.name in orphans), "bytes")
    assert orphans == lake.orphans()
    assert any(kind == "file" and left for kind, _, _, left in report)
    kept = lake.referenced()
    with Store(lake.db) as store:
        store.fetchall("CALL ducklake_delete_orphaned_files('skyfill_lake', cleanup_all => true)")
    assert lake.on_disk() == kept
    assert state(lake)["records"] == want_records
