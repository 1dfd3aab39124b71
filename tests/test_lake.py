"""The store on DuckLake (`--db ducklake:postgres:...`, storage/lake.py) against a real PostgreSQL catalog.

The lake must mean what the DuckDB file means: every test writes the same things into a file store
and a lake store and compares what the views show. Then the lake's own promises: the cursor is in
the transaction of its effects, two processes write one lake at once without loss, and a DuckDB
client that knows nothing of skyfill reads the same `records`.
"""

from __future__ import annotations

import dataclasses
import json
import importlib.util
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest

from skyfill.errors import StorageError
from skyfill.net.identity import IdentityRow
from skyfill.protocol.repo import RepoSnapshot, materialize, parse_repo
from skyfill.storage import Batch, RecordPut, RepoRow, Store
from skyfill.storage import repos as repos_module
from skyfill.storage.discovery import ListedRow
from skyfill.storage.lake import lake_ddl, lake_db
from skyfill.storage.states import CoverageEnd
from tests.support.postgres import PostgresCluster, lake_url

VECTORS = Path(__file__).parent / "vectors" / "indigo"
GREENGROUND = VECTORS / "testing-testdata" / "greenground.repo.car"
GREENGROUND_DID = "did:plc:kzcqyc3unb33eh5sxzsfs25z"
POST, LIKE = "app.bsky.feed.post", "app.bsky.feed.like"
RECORDS = "SELECT did, collection, rkey, cid, rev, record::VARCHAR, created_at, event_at FROM records ORDER BY ALL"
REPOS = ("SELECT did, rev, data_cid, commit_cid, last_seq, handle, active, status, sync_state, backfill_status, "
         "backfilled_rev FROM repos ORDER BY did")


def new_lake(pg: PostgresCluster, tmp_path: Path) -> str:
    name = "lake_" + secrets.token_hex(4)
    return lake_db(lake_url(pg.create_database(name)), tmp_path / name)


@pytest.fixture
def lake(postgres_cluster: PostgresCluster, tmp_path: Path) -> str:
    """The db string of a new, empty lake: a fresh catalog database and data directory."""
    return new_lake(postgres_cluster, tmp_path)


@pytest.fixture
def pair(lake: str, tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    """(a DuckDB file store, a lake store), both new."""
    with Store(tmp_path / "file.duckdb") as file, Store(lake) as lk:
        yield file, lk


def same(a: Store, b: Store, sql: str) -> list[tuple[Any, ...]]:
    rows = a.fetchall(sql)
    assert rows == b.fetchall(sql)
    return rows


def put(batch: Batch, did: str, collection: str, rkey: str, cid: str, text: str = "x") -> None:
    record = f'{{"$type": "{collection}", "text": "{text}", "createdAt": "2024-05-01T12:00:00.000Z"}}'
    batch.put_record(did, collection, rkey, RecordPut(cid, "3kabcdefghij2", record, "2024-05-01T12:00:00.000Z",
                                                      "2024-05-02T00:00:00.000Z"))


def cid(n: int) -> str:
    return f"bafyrei{'a' * 51}{'aeimquy4'[n % 8]}" if n < 8 else f"bafkrei-not-canonical-{n}"


def test_the_dialect_drops_only_what_ducklake_refuses() -> None:
    ddl = lake_ddl("CREATE SEQUENCE IF NOT EXISTS s;  -- v\nCREATE TABLE t (k VARCHAR PRIMARY KEY, "
                   "id BIGINT PRIMARY KEY DEFAULT nextval('s'), j JSON USING COMPRESSION zstd, a INT, PRIMARY KEY (k, a));")
    assert ddl.split() == "CREATE TABLE t (k VARCHAR NOT NULL, id BIGINT NOT NULL, j JSON, a INT);".split()


def test_firehose_writes_mean_the_same_on_the_lake(pair: tuple[Store, Store]) -> None:
    file, lk = pair
    alice, bob = "did:plc:alice", "did:plc:bob"
    steps: list[Batch] = []
    b = Batch()
    for i in range(4):
        put(b, alice, POST, f"3kaaaaaaaaa{i}2", cid(i))
    put(b, bob, LIKE, "3kbbbbbbbbbb2", cid(5))
    b.repos[alice] = RepoRow(alice, rev="3kaaaaaaaaaa2", data_cid=cid(1), commit_cid=cid(2), last_seq=7, handle="a.test")
    b.repos[bob] = RepoRow(bob, rev="3kbbbbbbbbbb2", last_seq=8)
    b.cursor = ("relay", 8)
    steps.append(b)
    b = Batch()  # an update, a delete, a create
    put(b, alice, POST, "3kaaaaaaaaa02", cid(6), "updated")
    b.delete_record(alice, POST, "3kaaaaaaaaa12")
    put(b, bob, POST, "3kbbbbbbbbbc2", cid(9))
    b.repos[alice] = RepoRow(alice, rev="3kaaaaaaaaab2", last_seq=9, sync_state="synchronized")
    b.cursor = ("relay", 10)
    steps.append(b)
    b = Batch()  # bob's account deleted, then a record of a new bob in the same batch
    b.purged_dids.add(bob)
    b.repos[bob] = RepoRow(bob, active=False, status="deleted", last_seq=11)
    b.cursor = ("relay", 11)
    steps.append(b)
    for i, batch in enumerate(steps):
        file.apply(batch)
        lk.apply(batch)
        same(file, lk, RECORDS)
        same(file, lk, REPOS)
        assert file.load_cursor("relay") == lk.load_cursor("relay") == batch.cursor[1]
        if i == 1:  # half the history compacted, half in the logs
            file.compact()
            lk.compact()
            same(file, lk, RECORDS)
    file.compact()
    lk.compact()
    rows = same(file, lk, RECORDS)
    assert {r[:3] for r in rows} == {(alice, POST, "3kaaaaaaaaa02"), (alice, POST, "3kaaaaaaaaa22"),
                                     (alice, POST, "3kaaaaaaaaa32")}
    same(file, lk, REPOS)
    assert lk.fetchall("SELECT count(*) FROM record_log")[0][0] == 0
    assert lk.load_cursor("relay") == file.load_cursor("relay") == 11


def test_coverage_spans_mean_the_same_on_the_lake(pair: tuple[Store, Store]) -> None:
    file, lk = pair
    ids = []
    for store in pair:
        first = store.start_coverage("relay")
        store.end_coverage(first, CoverageEnd.CLEAN)
        ids.append((first, store.start_coverage("relay")))  # a second run; the first one ended
    sql = "SELECT source, ended, stopped_at IS NULL FROM coverage ORDER BY id"
    assert same(file, lk, sql) == [("relay", "clean", False), ("relay", "running", True)]
    assert ids[1][0] < ids[1][1]


def snap(did: str, drop: int = 0) -> RepoSnapshot:
    s = parse_repo(GREENGROUND.read_bytes(), did=GREENGROUND_DID, key=None)
    return dataclasses.replace(s, did=did, walked=dict(list(s.records.items())[drop:]))


def test_a_backfill_reconcile_means_the_same_on_the_lake(pair: tuple[Store, Store]) -> None:
    did = "did:plc:greenground"
    for s in (snap(did, drop=2), snap(did)):
        for store in pair:
            store.reconcile(did, rev=s.rev, data_cid=s.data_cid, commit_cid=s.commit_cid, fetched=lambda s=s: s.records,
                            materialize=lambda keys, s=s: materialize(s, keys), trust_data_root=False)
        rows = same(*pair, RECORDS)
        assert len(rows) == len(s.records)
        same(*pair, REPOS)
    for store in pair:
        store.compact()
    same(*pair, RECORDS)
    assert pair[1].stored_cids(did) == pair[0].stored_cids(did)


def test_the_cursor_moves_only_with_its_effects(lake: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with Store(lake) as store:
        b = Batch()
        put(b, "did:plc:c", POST, "3kaaaaaaaaaa2", cid(1))
        b.cursor = ("relay", 5)
        store.apply(b)

        def broken(*args: Any, **kwargs: Any) -> None:
            raise duckdb.ConversionException("the repos append failed")

        monkeypatch.setattr(repos_module, "append_head", broken)
        b = Batch()  # records are appended before the repo rows and the cursor: all or nothing
        put(b, "did:plc:c", POST, "3kaaaaaaaaab2", cid(2))
        b.repos["did:plc:c"] = RepoRow("did:plc:c", last_seq=6)
        b.cursor = ("relay", 6)
        with pytest.raises(StorageError):
            store.apply(b)
        assert store.load_cursor("relay") == 5
        assert store.fetchall("SELECT rkey FROM records") == [("3kaaaaaaaaaa2",)]
    with Store(lake) as reopened:  # what is committed is in the catalog, not in this process
        assert reopened.load_cursor("relay") == 5


_WRITER = textwrap.dedent("""
    import sys
    from skyfill import metrics
    from skyfill.storage import Batch, RecordPut, RepoRow, Store
    db, name, batches, per = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with Store(db) as store:
        for n in range(batches):
            b = Batch()
            for i in range(per):
                did = f"did:plc:{name}{i % 5}"
                b.put_record(did, "app.bsky.feed.post", f"3k{n:05d}{i:04d}aa2",
                             RecordPut(f"bafkrei{name}{n}x{i}", None, '{"n": %d}' % n, None, None))
                b.repos[did] = RepoRow(did, last_seq=n)
            b.cursor = (name, n)
            store.apply(b)
            if n == batches // 2:
                store.compact()  # a compaction while the other process writes
    print(int(metrics.STORE_TXN_RETRIES._value.get()))
""")


def test_two_processes_write_one_lake_at_once_without_loss(lake: str) -> None:
    Store(lake).close()  # the schema, once (concurrent first opens are retried too, but slowly)
    batches, per = 12, 40
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, lake, name, str(batches), str(per)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("w", "x")]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    with Store(lake) as store:
        assert store.fetchall("SELECT count(*) FROM records")[0][0] == 2 * batches * per
        assert store.fetchall("SELECT count(DISTINCT did) FROM repos")[0][0] == 10
        assert store.fetchall("SELECT count(*) FROM repos WHERE last_seq = ?", [batches - 1])[0][0] == 10
        assert store.load_cursor("w") == store.load_cursor("x") == batches - 1
        store.compact()
        assert store.fetchall("SELECT count(*) FROM records")[0][0] == 2 * batches * per
    print("conflict retries:", [out.strip() for out, _ in outs])


def test_a_plain_duckdb_client_reads_the_same_records(lake: str, tmp_path: Path) -> None:
    with Store(lake) as store:
        b = Batch()
        for i in range(10):
            put(b, f"did:plc:p{i % 3}", POST, f"3kaaaaaaaa{i}a2", cid(i))
        store.apply(b)
        store.compact()
        b = Batch()
        put(b, "did:plc:p0", LIKE, "3kzzzzzzzzzz2", cid(3))
        store.apply(b)  # one in the log too
        mine = store.fetchall(RECORDS)
    # nothing of skyfill: the extension files and an ATTACH under another name
    exts = {name: Path(next(iter(importlib.util.find_spec(f"duckdb_extension_{name}").submodule_search_locations)))
            for name in ("ducklake", "postgres")}
    version = f"v{duckdb.__version__}"
    link = tmp_path / "postgres_scanner.duckdb_extension"
    link.symlink_to(exts["postgres"] / "extensions" / version / "postgres.duckdb_extension")
    catalog, data_path = lake.split(";data_path=")
    con = duckdb.connect()
    con.execute(f"LOAD '{exts['ducklake'] / 'extensions' / version / 'ducklake.duckdb_extension'}'")
    con.execute(f"LOAD '{link}'")
    con.execute(f"ATTACH '{catalog}' AS mirror (READ_ONLY)")
    theirs = con.execute(RECORDS.replace("FROM records", "FROM mirror.records")).fetchall()
    con.close()
    assert theirs == mine and len(mine) == 11


def test_the_small_keyed_tables_mean_the_same_on_the_lake(pair: tuple[Store, Store]) -> None:
    """identities, the sink's marks and the enumeration cursors: upserts on the file; on the lake the
    keyed tables are appended, read newest-wins, and a compaction prunes the superseded rows."""
    from_now = 1_900_000_000.0
    for store in pair:
        store.create_sink_tables()
        store.save_identities([IdentityRow("did:plc:i1", "https://a", "zKey1", "a.test", "{}", from_now, None),
                               IdentityRow("did:plc:i2", None, None, None, None, from_now, "gone")])
        store.save_identities([IdentityRow("did:plc:i1", "https://b", "zKey2", "b.test", "{}", from_now + 1, None)])
        store.write_sink_marks({("did:plc:i1", POST, "1"): "3kaaaaaaaaaa2"}, {"did:plc:i1": "3kbbbbbbbbbb2"})
        store.write_sink_marks({("did:plc:i1", POST, "1"): "3kcccccccccc2"}, {"did:plc:i1": "3kaaaaaaaaaa2"})
        store.add_enumerations([("https://pds.one", "listRepos")], parent=("relay", "listHosts"), cursor="c1", skipped=0)
        store.save_listing("https://pds.one", "listRepos", [ListedRow("did:plc:l1", "h", "r", True, "active")],
                           cursor="c2", skipped=1)
        store.save_listing("https://pds.one", "listRepos", [], cursor=None, skipped=0)
        store.enumeration_failed("https://pds.one", "listReposByCollection:x", "boom")
    file, lake = pair
    assert file.load_identity("did:plc:i1", max_age=1e10) == lake.load_identity("did:plc:i1", max_age=1e10)
    assert lake.load_identity("did:plc:i1", max_age=1e10).pds == "https://b"  # type: ignore[union-attr]
    assert lake.fetchall("SELECT count(*) FROM identities")[0][0] == 3  # appended, not replaced
    assert lake.compact().pruned == 3  # an identity, a tombstone, a snapshot mark
    same(*pair, "SELECT did, pds, signing_key, handle, error FROM identities ORDER BY did")
    assert same(*pair, "SELECT * FROM sink_tombstones") == [("did:plc:i1", POST, "1", "3kcccccccccc2")]
    assert same(*pair, "SELECT * FROM sink_snapshots") == [("did:plc:i1", "3kbbbbbbbbbb2")]
    rows = same(*pair, "SELECT host, endpoint, cursor, done, pages, items, skipped, error FROM enum_cursors ORDER BY ALL")
    assert ("https://pds.one", "listRepos", None, True, 2, 1, 1, None) in rows and len(rows) == 3
    same(*pair, "SELECT did, host, endpoint, head FROM listed_repos")


def test_the_cli_takes_a_lake_and_its_data_path(lake: str) -> None:
    with Store(lake) as store:
        b = Batch()
        put(b, "did:plc:cli", POST, "3kaaaaaaaaaa2", cid(1))
        b.cursor = ("relay", 3)
        store.apply(b)
    catalog, data_path = lake.split(";data_path=")
    done = subprocess.run([sys.executable, "-m", "skyfill", "status", "--json", "--db", catalog, "--data-path", data_path],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["records"]["total"] == 1
    assert [(c["source"], c["seq"]) for c in report["cursors"]] == [("relay", 3)]
    wrong = subprocess.run([sys.executable, "-m", "skyfill", "status", "--db", "x.duckdb", "--data-path", data_path],
                           capture_output=True, text=True, timeout=300, check=False)
    assert wrong.returncode != 0 and "only for a DuckLake" in wrong.stderr
