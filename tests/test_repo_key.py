"""The DID key `k` of repo_base / repo_log (storage/repos.py, schema version 5).

The view, `subset_sql` (what the gap reasons read) and compaction find rows by `k`; they must give
exactly the rows of a merge by `did` alone, also when two DIDs share a key (forced here: with
64-bit keys it is rare, never impossible). A file without the key gains it on open."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest

from skyfill.errors import StorageError
from skyfill.storage import Batch, RepoRow, Store, repos
from skyfill.storage.migrate import SCHEMA_VERSION

from .support.store import SetupStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)
COLS = ", ".join(repos.REPO_COLUMNS)
_HEAD = [c for c in repos.HEAD_FIELDS if c != "first_seen_at"]


def h(hours: int) -> datetime:
    return T0 + timedelta(hours=hours)


# The view as it was before the key: base rows of DIDs without a log row, the merge of every
# logged DID, both by `did` (the oracle the keyed reads must equal); the repo's version
# (repos.REV_FIELDS) from the head row with the newest rev, then v.
def _by_did() -> str:
    cols = ", ".join(repos.REPO_COLUMNS[1:])
    out = ", ".join([f"arg_max_null({c}, {'rv' if c in repos.REV_FIELDS else 'hv'}) AS {c}" for c in _HEAD] + ["arg_min(first_seen_at, v) AS first_seen_at"]
                    + [f"arg_max_null({c}, fv) AS {c}" for c in repos.BACKFILL_FIELDS])
    return f"""
SELECT did, {cols} FROM repo_base WHERE did NOT IN (SELECT did FROM repo_log)
UNION ALL
SELECT did, {out} FROM (
    SELECT did, 0 AS v, 0 AS hv, 0 AS fv, {cols}, struct_pack(r := coalesce(rev, ''), v := 0) AS rv
    FROM repo_base WHERE did IN (SELECT did FROM repo_log)
    UNION ALL
    SELECT did, v, CASE WHEN part = 'head' THEN v ELSE -1 END, CASE WHEN part = 'backfill' THEN v ELSE -1 END,
           {cols}, struct_pack(r := CASE WHEN part = 'head' THEN coalesce(rev, '') ELSE '' END,
                  v := CASE WHEN part = 'head' THEN v ELSE -1 END) AS rv FROM repo_log
) GROUP BY did"""


def fill(store: SetupStore, seed: int) -> dict[str, str]:
    """Base rows, head and backfill log rows, new DIDs, and DIDs sharing keys. Returns each DID's
    key source (the text its key is the KEY_SQL of: itself, or the DID it shares a key with)."""
    rng = random.Random(seed)
    dids = [f"did:plc:k{seed}x{i:03d}" for i in range(90)]
    keyed: dict[str, str] = {}  # did -> the text its key is computed from
    for did in dids:
        # one DID in six shares the key of another (logged or not, in the base or not)
        keyed[did] = rng.choice(dids) if rng.random() < 1 / 6 else did
    v = 0
    for i, did in enumerate(dids):
        key = keyed[did]
        if rng.random() < 0.7:
            store.execute_write(
                "INSERT INTO repo_base (did, rev, last_event_at, first_seen_at, sync_state, active, backfill_status, "
                "backfilled_at, k) VALUES (?, ?, ?, ?, ?, ?, ?, ?, md5_number_lower(?))",
                [did, rng.choice([None, "r0"]), rng.choice([None, h(rng.randrange(48))]), h(-i),
                 rng.choice(["synchronized", "desynchronized", "unknown"]), rng.random() < 0.8,
                 rng.choice([None, "ok", "RepoNotFound"]), rng.choice([None, h(rng.randrange(48))]), key])
        for _ in range(rng.randrange(4)):
            v += 1
            if rng.random() < 0.6:
                store.execute_write(
                    "INSERT INTO repo_log (v, part, did, rev, last_event_at, first_seen_at, sync_state, active, k) "
                    "VALUES (?, 'head', ?, ?, ?, ?, ?, ?, md5_number_lower(?))",
                    [v, did, f"r{v}", rng.choice([None, h(rng.randrange(48))]), h(v - i),
                     rng.choice(["synchronized", "desynchronized"]), rng.random() < 0.8, key])
            else:
                store.execute_write(
                    "INSERT INTO repo_log (v, part, did, first_seen_at, backfill_status, backfilled_at, k) "
                    "VALUES (?, 'backfill', ?, ?, ?, ?, md5_number_lower(?))",
                    [v, did, h(v - i), rng.choice([None, "ok", "retrying", "RepoNotFound"]),
                     rng.choice([None, h(v)]), key])
    return keyed


_T = "TIMESTAMPTZ '2026-01-02 00:00:00+00'"  # h(24)
_CASES = [  # (head_where for subset_sql, the whole condition: it implies head_where)
    ("TRUE", "TRUE"),
    ("sync_state = 'desynchronized'",
     "sync_state = 'desynchronized' AND (backfill_status IS NULL OR backfill_status <> 'RepoNotFound')"),
    (f"last_event_at >= {_T} AND active", f"last_event_at >= {_T} AND active AND backfilled_at IS NULL AND first_seen_at <= {_T}"),
    ("active", f"active AND first_seen_at < {_T} AND (backfilled_at IS NULL OR backfilled_at < {_T})"),
]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_view_subset_and_compaction_equal_the_merge_by_did_with_shared_keys(tmp_path: Path, seed: int) -> None:
    with SetupStore(tmp_path / "k.duckdb") as store:
        keyed = fill(store, seed)
        shared = store.fetchall("SELECT count(*) FROM (SELECT k FROM (SELECT DISTINCT did, k FROM repo_base UNION "
                                "SELECT DISTINCT did, k FROM repo_log) GROUP BY k HAVING count(*) > 1)")[0][0]
        assert shared > 0  # the case under test is there
        want = store.fetchall(f"SELECT {COLS} FROM ({_by_did()}) ORDER BY did")
        assert len(want) == len({d for d, in store.fetchall("SELECT did FROM repo_base UNION SELECT did FROM repo_log")})
        assert store.fetchall(f"SELECT {COLS} FROM repos ORDER BY did") == want
        for head_where, where in _CASES:
            expect = store.fetchall(f"SELECT did FROM ({_by_did()}) WHERE {where} ORDER BY did")
            got = store.fetchall(f"SELECT did FROM ({repos.subset_sql(head_where)}) WHERE {where} ORDER BY did")
            assert got == expect and (expect or head_where == "TRUE"), head_where
        # restricted to a set of DIDs (some unknown), as `referenced` reads it
        wanted = random.Random(seed).sample(sorted(keyed), 30) + ["did:plc:unknown"]
        keyed["did:plc:unknown"] = "did:plc:unknown"
        marks = ", ".join("(?, ?)" for _ in wanted)
        args = [x for did in wanted for x in (did, keyed[did])]
        base = f"WITH w(did, src) AS (VALUES {marks}), keys AS (SELECT md5_number_lower(src) AS k FROM w) "
        expect = store.fetchall(base + f"SELECT w.did, r.sync_state, r.backfill_status FROM w LEFT JOIN ({_by_did()}) r "
                                "ON r.did = w.did ORDER BY w.did", args)
        got = store.fetchall(base + f"SELECT w.did, r.sync_state, r.backfill_status FROM w LEFT JOIN "
                             f"({repos.subset_sql(keys='SELECT k FROM keys')}) r ON r.did = w.did ORDER BY w.did", args)
        assert got == expect
        store.compact()
        assert store.fetchall("SELECT count(*) FROM repo_log") == [(0,)]
        assert store.fetchall(f"SELECT {COLS} FROM repos ORDER BY did") == want
        assert store.fetchall(f"SELECT {COLS} FROM repo_base ORDER BY did") == want
        # compaction computes the key from the did (KEY_SQL), so forced shares end there
        assert store.fetchall(f"SELECT count(*) FROM repo_base WHERE did IN (SELECT did FROM repo_base GROUP BY did "
                              "HAVING count(*) > 1)") == [(0,)]


def test_writers_set_the_key_and_it_is_required(tmp_path: Path) -> None:
    with SetupStore(tmp_path / "w.duckdb") as store:
        batch = Batch()
        for i in range(3):
            batch.put_repo(RepoRow(did=f"did:plc:w{i}", rev=f"3l{i:011d}", last_seq=i, first_seen_at=T0,
                                   last_event_at="2026-01-01T00:00:00Z"))
        batch.cursor = ("relay", 3)
        store.apply(batch)                                    # head groups (the firehose)
        store.defer_backfill("did:plc:w0", T0, error="later")  # backfill groups
        store.defer_backfill("did:plc:new", T0, error="later")
        parts = {p for p, in store.fetchall("SELECT DISTINCT part FROM repo_log")}
        assert parts == {"head", "backfill"}
        assert store.fetchall(f"SELECT count(*) FROM repo_log WHERE k IS DISTINCT FROM {repos.KEY_SQL}") == [(0,)]
        store.compact()
        assert store.fetchall(f"SELECT count(*) FROM repo_base WHERE k IS DISTINCT FROM {repos.KEY_SQL}") == [(0,)]
        assert store.fetchall("SELECT count(*) FROM repo_base") == [(4,)]
        with pytest.raises(StorageError):  # a writer that forgets the key fails, it does not hide a row
            store.execute_write("INSERT INTO repo_log (v, part, did, first_seen_at) VALUES (1, 'head', 'did:plc:x', ?)", [T0])


def _strip_key(path: Path, version: int) -> None:
    """Make `path` look like a schema `version` file: repo_base / repo_log without `k`."""
    con = duckdb.connect(str(path))
    try:
        con.execute("DROP VIEW IF EXISTS repos")
        for table in ("repo_base", "repo_log"):
            con.execute(f"CREATE TABLE {table}_old AS SELECT * EXCLUDE (k) FROM {table}")
            con.execute(f"DROP TABLE {table}")
            con.execute(f"ALTER TABLE {table}_old RENAME TO {table}")
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(version)])
    finally:
        con.close()


def test_a_file_without_the_key_gains_it_on_open(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    with SetupStore(path) as store:
        fill(store, 7)
        store.compact()
        fill(store, 8)  # and a log over the base
        before = store.fetchall(f"SELECT {COLS} FROM repos ORDER BY did")
        log_rows = store.fetchall("SELECT count(*) FROM repo_log")
    _strip_key(path, SCHEMA_VERSION - 1)
    with pytest.raises(StorageError, match="skyfill migrate"):
        Store(path, read_only=True)
    with Store(path) as store:
        assert store.fetchall(
            "SELECT count(*) FROM duckdb_columns() WHERE table_name IN ('repo_base', 'repo_log') AND column_name = 'k' "
            "AND NOT is_nullable") == [(2,)]
        assert store.fetchall(f"SELECT {COLS} FROM repos ORDER BY did") == before
        assert store.fetchall("SELECT count(*) FROM repo_log") == log_rows
        for table in ("repo_base", "repo_log"):
            assert store.fetchall(f"SELECT count(*) FROM {table} WHERE k <> {repos.KEY_SQL}") == [(0,)]
        assert store.fetchall("SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
        dids = [d for d, in store.fetchall("SELECT did FROM repo_base")]
        assert dids == sorted(dids)  # rebuilt sorted by did
    with Store(path, read_only=True) as store:
        assert store.fetchall(f"SELECT {COLS} FROM repos ORDER BY did") == before
