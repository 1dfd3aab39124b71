"""Compaction on a lake beside constant appenders, its lease, and DuckLake's file upkeep (real PostgreSQL).

On the lake writers only append and only the compactor deletes, holding the lake's compaction lease
(storage/lease.py): these tests write from several Stores at once while compactions run, kill a
compactor that holds the lease, count the conflict retries of two sinks' small-table writes, and run
`skyfill compact`'s upkeep on a lake with a killed writer's orphan file.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from skyfill import metrics
from skyfill.net.identity import IdentityRow
from skyfill.storage import Batch, RecordPut, RepoRow, Store
from skyfill.storage.lake import lake_db
from skyfill.storage.lease import lease_remaining
from tests.support.postgres import PostgresCluster, lake_url
from tests.support.wait import poll

POST = "app.bsky.feed.post"
RECORDS = "SELECT did, collection, rkey, cid, rev, record::VARCHAR, created_at, event_at FROM records ORDER BY ALL"
REPOS = "SELECT did, rev, last_seq, handle, active, status FROM repos ORDER BY did"
CID = "bafyrei" + "a" * 52


@pytest.fixture
def lake(postgres_cluster: PostgresCluster, tmp_path: Path) -> str:
    name = "lake_" + tmp_path.name.lower().replace("-", "_")[-40:]
    return lake_db(lake_url(postgres_cluster.create_database(name)), tmp_path / "data")


def retries() -> float:
    return metrics.REGISTRY.get_sample_value("skyfill_store_txn_retries_total") or 0.0


def batch(writer: str, j: int) -> Batch:
    """Writer `writer`'s batch `j`: puts over its own 4 DIDs (keys overwritten every 3 batches), a
    delete, repo heads and its cursor."""
    b = Batch()
    for k in range(12):
        did = f"did:plc:{writer}{k % 4}"
        rkey = f"3k{writer}{(j % 3):03d}{k:05d}2"
        b.put_record(did, POST, rkey, RecordPut(CID, f"3k{j:010d}2", f'{{"text": "{writer} {j} {k}"}}',
                                                "2024-05-01T12:00:00.000Z", "2024-05-02T00:00:00.000Z"))
    if j % 4 == 3:
        b.delete_record(f"did:plc:{writer}1", POST, f"3k{writer}{((j - 1) % 3):03d}{1:05d}2")
    for k in range(4):
        did = f"did:plc:{writer}{k}"
        b.repos[did] = RepoRow(did, rev=f"3k{j:010d}2", last_seq=j, handle=f"{writer}{k}.test")
    b.cursor = (writer, j)
    return b


def identity(writer: str, j: int) -> IdentityRow:
    return IdentityRow(f"did:plc:{writer}0", f"https://{writer}{j}", "zKey", None, "{}", 1_900_000_000.0 + j, None)


def test_compactions_complete_while_two_writers_append_and_the_views_equal_a_file(lake: str, tmp_path: Path) -> None:
    Store(lake).close()  # the schema, once
    stop = threading.Event()
    written: dict[str, int] = {}
    failures: list[BaseException] = []

    def write(writer: str) -> None:
        try:
            with Store(lake) as store:
                store.create_sink_tables()
                j = 0
                while not stop.is_set() or j < 6:
                    store.apply(batch(writer, j))
                    store.save_identities([identity(writer, j)])
                    store.write_sink_marks({(f"did:plc:{writer}1", POST, "x"): f"3k{j:010d}2"},
                                           {f"did:plc:{writer}2": f"3k{j:010d}2"})
                    j += 1
                    written[writer] = j
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in ("w", "x")]
    for t in threads:
        t.start()
    compactions = []
    try:
        with Store(lake) as compactor:
            for _ in range(3):
                before = dict(written)
                poll(lambda b=before: all(written.get(w, 0) >= b.get(w, 0) + 2 for w in ("w", "x")) or bool(failures),
                     timeout=300, what="both writers appending")
                compactions.append(compactor.compact())
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=600)
    assert not failures, failures
    assert len(compactions) == 3 and not any(c.skipped for c in compactions)
    assert all(c.records is not None and c.records.log_rows > 0 for c in compactions)
    assert sum(c.pruned for c in compactions) > 0  # the appended cursors, identities and marks

    with Store(tmp_path / "same.duckdb") as file, Store(lake) as lk:
        file.create_sink_tables()
        for writer, n in written.items():
            for j in range(n):
                file.apply(batch(writer, j))
                file.save_identities([identity(writer, j)])
                file.write_sink_marks({(f"did:plc:{writer}1", POST, "x"): f"3k{j:010d}2"},
                                      {f"did:plc:{writer}2": f"3k{j:010d}2"})
        for store in (file, lk):  # before and after a last compaction
            assert file.fetchall(RECORDS) == lk.fetchall(RECORDS)
            assert file.fetchall(REPOS) == lk.fetchall(REPOS)
            for writer, n in written.items():
                assert lk.load_cursor(writer) == file.load_cursor(writer) == n - 1
                assert lk.load_identity(f"did:plc:{writer}0", max_age=1e10) == \
                    file.load_identity(f"did:plc:{writer}0", max_age=1e10)
            store.compact()
        assert lk.fetchall("SELECT count(*) FROM cursors")[0][0] == 2  # pruned to the newest per source
        assert file.fetchall("SELECT * FROM sink_snapshots ORDER BY did") == \
            lk.fetchall("SELECT * FROM sink_snapshots ORDER BY did")


_HOLDER = """
import sys
from skyfill.storage import Store
from skyfill.storage.base import COMPACTION_LEASE
from skyfill.storage.lease import Lease
store = Store(sys.argv[1])
lease = Lease(store._conn, COMPACTION_LEASE, seconds=float(sys.argv[2]))
assert lease.acquire(timeout=60)
print("held", flush=True)
sys.stdin.read()  # holds the lease until killed (the test never writes to stdin)
"""


def test_a_compactor_killed_holding_the_lease_stalls_writers_only_until_it_expires(lake: str) -> None:
    with Store(lake) as writer:
        term = 6.0
        holder = subprocess.Popen([sys.executable, "-c", _HOLDER, lake, str(term)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        finally:
            holder.kill()  # SIGKILL: no release, no more renewals
            holder.wait(timeout=60)
        cur = writer._conn.cursor()
        left = lease_remaining(cur, "compaction")
        assert left is not None and left > 0  # still held by the dead compactor
        done = threading.Event()
        threading.Thread(target=lambda: (writer.apply(batch("k", 0)), done.set()), daemon=True).start()
        with Store(lake) as reader:
            time.sleep(0.2)  # noqa: the writer is held for the rest of the term: nothing may commit meanwhile
            if lease_remaining(cur, "compaction") is not None:
                assert reader.load_cursor("k") is None
            poll(done.is_set, timeout=term + 120, what="the writer's commit after the lease expired")
            assert lease_remaining(cur, "compaction") is None
            assert reader.load_cursor("k") == 0
            compaction = reader.compact()  # and the next compactor takes the expired lease
            assert not compaction.skipped and compaction.records is not None
        cur.close()


def test_two_sinks_small_table_writes_do_not_conflict(lake: str) -> None:
    with Store(lake) as first:
        first.create_sink_tables()
    before = retries()
    failures: list[BaseException] = []

    def sink(name: str) -> None:
        try:
            with Store(lake) as store:
                for j in range(15):
                    store.save_identities([IdentityRow(f"did:plc:{name}{j}", "https://pds", "zKey", None, "{}",
                                                       1_900_000_000.0 + j, None)])
                    store.write_sink_marks({(f"did:plc:{name}{j}", POST, "r"): f"3k{j:010d}2"},
                                           {f"did:plc:{name}{j}": f"3k{j:010d}2"})
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)

    threads = [threading.Thread(target=sink, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not failures, failures
    assert retries() == before  # DELETE+INSERT upserts conflicted with each other on every batch
    with Store(lake) as store:
        assert store.fetchall("SELECT count(*) FROM identities")[0][0] == 30
        assert store.fetchall("SELECT count(*) FROM sink_snapshots")[0][0] == 30


def _parquet_files(root: Path) -> set[Path]:
    return set(root.rglob("*.parquet"))


def test_skyfill_compact_on_a_lake_merges_files_and_removes_orphans(lake: str) -> None:
    data = Path(lake.split(";data_path=")[1])
    with Store(lake) as store:
        for j in range(12):
            b = Batch()
            for k in range(300):  # past DuckLake's inlining: each commit writes Parquet files
                b.put_record(f"did:plc:u{k % 7}", POST, f"3k{j:05d}{k:05d}2",
                             RecordPut(CID, "3kaaaaaaaaaa2", f'{{"n": {k}}}', None, None))
            b.cursor = ("relay", j)
            store.apply(b)
        store.compact()
        records = store.fetchall(RECORDS)
    # a writer killed (-9) after writing a Parquet file and before its commit leaves this behind
    table_file = next(iter(_parquet_files(data)))
    orphan = table_file.with_name("ducklake-killed-writer.parquet")
    shutil.copy(table_file, orphan)
    files = _parquet_files(data)
    done = subprocess.run([sys.executable, "-m", "skyfill", "compact", "--db", lake.split(";data_path=")[0],
                           "--data-path", str(data), "--retention", "0"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    after = _parquet_files(data)
    assert not orphan.exists()
    assert len(after) < len(files), (len(files), len(after))
    with Store(lake, read_only=True) as store:
        assert store.fetchall(RECORDS) == records and len(records) == 12 * 300
        assert store.load_cursor("relay") == 11
