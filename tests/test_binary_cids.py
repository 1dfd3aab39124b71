"""Record CIDs stored binary (storage/cids.py, schema version 3): lossless through the `records`
view for every CID text, before and after compaction and after the v2 -> v3 migration."""

from __future__ import annotations

import base64
import hashlib
import random
from pathlib import Path

import duckdb
import pytest

from skyfill.errors import StorageError
from skyfill.storage import Batch, RecordPut, RepoRow, Store
from skyfill.storage.cids import CID_MACROS_SQL, cid_bytes, cid_str
from skyfill.storage.migrate import SCHEMA_VERSION


def dag_cbor_cid(n: int) -> str:
    digest = hashlib.sha256(str(n).encode()).digest()
    return "b" + base64.b32encode(bytes([0x01, 0x71, 0x12, 0x20]) + digest).decode().lower().rstrip("=")


ODD_CIDS = [
    "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku",   # raw codec: kept as text
    "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG",                # CIDv0
    dag_cbor_cid(7).upper(),                                         # not the canonical lowercase
    dag_cbor_cid(8)[:-1] + "b",                                      # non-zero pad bits
    "bafyrei5acxdt5phtn25v2244nxhaykxhxscrs5bfjlp4gdxgixec24ul3i",   # a digest char where a prefix bit is
    dag_cbor_cid(9)[:-1],                                            # one char short
    "x" * 32,                                                        # 32 bytes of text: never a digest's length
    "",
    "bafyrei",
]


def test_python_and_sql_conversions_agree_and_round_trip() -> None:
    con = duckdb.connect()
    con.execute(CID_MACROS_SQL)
    rng = random.Random(3)
    cids = [dag_cbor_cid(rng.randrange(10**9)) for _ in range(300)] + ODD_CIDS
    for text in cids:
        stored = cid_bytes(text)
        assert cid_str(stored) == text
        assert con.execute("SELECT cid_bin(?) = ?, cid_text(?) = ?", [text, stored, stored, text]).fetchall() == [
            (True, True)], text
        if text.startswith("bafyrei") and text == text.lower() and len(text) == 59 and text not in ODD_CIDS:
            assert len(stored) == 32
    assert [len(cid_bytes(c)) for c in ODD_CIDS] == [len(c) + 1 for c in ODD_CIDS]  # the text + a marker byte


def write_all(store: Store, cids: list[str]) -> dict[tuple[str, str], str]:
    batch = Batch()
    expected = {}
    for i, cid in enumerate(cids):
        rkey = f"k{i}"
        batch.put_record("did:plc:a", "app.bsky.feed.post", rkey, RecordPut(cid, "3kaaaaaaaaaaa", '{"text": "t"}', None, None))
        expected[("app.bsky.feed.post", rkey)] = cid
    store.apply(batch)
    return expected


def view_cids(store: Store) -> dict[tuple[str, str], str]:
    return {(c, k): cid for c, k, cid in store.fetchall("SELECT collection, rkey, cid FROM records")}


CIDS = [dag_cbor_cid(i) for i in range(20)] + [c for c in ODD_CIDS if c]


def test_every_cid_text_comes_back_identical_through_the_view_before_and_after_compaction(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        expected = write_all(store, CIDS)
        assert view_cids(store) == expected
        store.compact()
        assert view_cids(store) == expected
        assert store.fetchall("SELECT count(*) FROM record_log") == [(0,)]
        digests = store.fetchall("SELECT count(*) FROM record_base WHERE octet_length(cid) = 32")[0][0]
        assert digests == 20
    with Store(tmp_path / "s.duckdb", read_only=True) as store:
        assert view_cids(store) == expected


def make_v2(path: Path, cids: list[str]) -> dict[tuple[str, str], str]:
    """A schema-version-2 file: text CID columns (one row in the base, the rest in the log)."""
    with Store(path) as store:
        expected = write_all(store, cids[:5])
        store.compact()
        expected |= write_all(store, cids[5:])
        batch = Batch()                              # a deletion in the log: a NULL cid
        batch.delete_record("did:plc:a", "app.bsky.feed.post", "k0")
        store.apply(batch)
        del expected[("app.bsky.feed.post", "k0")]
    con = duckdb.connect(str(path))
    for table in ("record_base", "record_log"):
        con.execute(f"ALTER TABLE {table} ALTER cid TYPE VARCHAR USING cid_text(cid)")
    con.execute("DROP MACRO cid_bin; DROP MACRO cid_text")
    con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    assert con.execute("SELECT count(*) FROM record_log WHERE cid IS NULL").fetchall() == [(1,)]
    con.execute("CREATE OR REPLACE VIEW records AS SELECT did, collection, rkey, cid FROM record_base")
    con.close()
    return expected


def test_a_v2_file_is_migrated_to_binary_cids_on_open_losing_nothing(tmp_path: Path) -> None:
    path = tmp_path / "v2.duckdb"
    expected = make_v2(path, CIDS)
    with pytest.raises(StorageError, match=r"skyfill migrate --db .*v2\.duckdb"):
        Store(path, read_only=True)
    with Store(path) as store:
        assert store.fetchall("SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
        types = store.fetchall("SELECT DISTINCT data_type FROM duckdb_columns() "
                               "WHERE table_name IN ('record_base', 'record_log') AND column_name = 'cid'")
        assert types == [("BLOB",)]
        assert view_cids(store) == expected
        store.compact()
        assert view_cids(store) == expected
    with Store(path) as store:                       # a second open changes nothing
        assert view_cids(store) == expected


# -- repo_base keeps data_cid / commit_cid binary too (schema 5); repo_log and the view keep text ------

REPO_CIDS = [dag_cbor_cid(100 + i) for i in range(6)] + [c for c in ODD_CIDS if c] + [None]


def write_repos(store: Store, prefix: str) -> dict[str, tuple]:
    batch = Batch()
    expected = {}
    for i, cid in enumerate(REPO_CIDS):
        did = f"did:plc:{prefix}{i}"
        commit = REPO_CIDS[(i + 1) % len(REPO_CIDS)]
        batch.put_repo(RepoRow(did=did, rev="3kaaaaaaaaaaa", data_cid=cid, commit_cid=commit, sync_state="synchronized"))
        expected[did] = (cid, commit)
    store.apply(batch)
    return expected


def view_repo_cids(store: Store) -> dict[str, tuple]:
    return {d: (a, b) for d, a, b in store.fetchall("SELECT did, data_cid, commit_cid FROM repos")}


def point_repo_cids(store: Store, dids: list[str]) -> dict[str, tuple]:
    return {did: tuple(store.fetchall("SELECT data_cid, commit_cid FROM repos WHERE did = ?", [did])[0]) for did in dids}


def test_repo_cids_come_back_identical_through_the_repos_view(tmp_path: Path) -> None:
    with Store(tmp_path / "r.duckdb") as store:
        expected = write_repos(store, "a")
        assert view_repo_cids(store) == expected
        store.compact()
        assert store.fetchall("SELECT count(*) FROM repo_log") == [(0,)]
        assert store.fetchall("SELECT count(*) FROM repo_base WHERE octet_length(data_cid) = 32") == [(6,)]
        assert view_repo_cids(store) == expected
        expected |= write_repos(store, "b")          # base and log together
        assert view_repo_cids(store) == expected
        assert point_repo_cids(store, list(expected)) == expected
    with Store(tmp_path / "r.duckdb", read_only=True) as store:
        assert view_repo_cids(store) == expected


def test_a_file_with_text_repo_cids_is_migrated_on_open(tmp_path: Path) -> None:
    path = tmp_path / "v4.duckdb"
    with Store(path) as store:
        expected = write_repos(store, "a")
        store.compact()
        expected |= write_repos(store, "b")
    con = duckdb.connect(str(path))
    con.execute("DROP VIEW repos")
    for c in ("data_cid", "commit_cid"):
        con.execute(f"ALTER TABLE repo_base ALTER {c} TYPE VARCHAR USING cid_text({c})")
    con.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(StorageError, match=r"skyfill migrate --db .*v4\.duckdb"):
        Store(path, read_only=True)
    with Store(path) as store:
        types = store.fetchall("SELECT DISTINCT data_type FROM duckdb_columns() WHERE table_name = 'repo_base' "
                               "AND column_name IN ('data_cid', 'commit_cid')")
        assert types == [("BLOB",)]
        assert view_repo_cids(store) == expected
        store.compact()
        assert view_repo_cids(store) == expected
    with Store(path, read_only=True) as store:
        assert view_repo_cids(store) == expected
