"""Referenced DIDs by hour (storage/refs.py), the `referenced` gap reason over them, the
migration of the per-record `refs` column, and the `repos` view's per-column merge."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest

from skyfill.backfill.gaps import Reason, detect_gaps
from skyfill.errors import StorageError
from skyfill.storage.migrate import SCHEMA_VERSION
from skyfill.storage import Store, repos
from tests.support.store import SetupStore

T0 = datetime(2025, 3, 10, tzinfo=UTC)
LIKE, FOLLOW = "app.bsky.feed.like", "app.bsky.graph.follow"


def h(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def like(subject: str) -> str:
    return json.dumps({"subject": {"uri": f"at://{subject}/app.bsky.feed.post/1", "cid": "x"}})


def seen(store: SetupStore, rkey: str, subject: str, at: datetime, *, did: str = "did:plc:actor") -> None:
    store.put_records([(did, LIKE, rkey, "bafyreia", like(subject), at.isoformat(), at.isoformat())])


@pytest.fixture
def store(tmp_path: Path) -> SetupStore:
    s = SetupStore(tmp_path / "refs.duckdb")
    yield s
    s.close()


async def test_referenced_rounds_the_window_outward_to_whole_hours(store: SetupStore) -> None:
    store.execute_write("INSERT INTO coverage (source, first_event_at, last_event_at, started_at, ended) "
                        "VALUES ('r', ?, ?, ?, 'clean')", [h(-48), h(60), h(-48)])
    start, end = h(2.5), h(5.5)                      # 02:30 .. 05:30
    seen(store, "1", "did:plc:inside", h(4))
    seen(store, "2", "did:plc:starthour", h(2.1))    # 02:06: before start, in start's hour: counted
    seen(store, "3", "did:plc:endhour", h(5.9))      # 05:54: after end, in end's hour: counted
    seen(store, "4", "did:plc:hourbefore", h(1.99))  # 01:59: outside the surrounding hours
    seen(store, "5", "did:plc:hourafter", h(6))      # 06:00: the next hour
    seen(store, "6", "did:plc:deleted", h(3))
    store.delete_records("rkey = '6'")                # seen in the window, deleted since: still counted
    report = await detect_gaps(store, start=start, end=end, now=h(72), audit=None)
    got = {d for d, rs in report.reasons_by_did.items() if Reason.REFERENCED.value in rs}
    assert got == {"did:plc:inside", "did:plc:starthour", "did:plc:endhour", "did:plc:deleted"}
    store.compact()                                   # the same answer from the base
    report = await detect_gaps(store, start=start, end=end, now=h(72), audit=None)
    assert {d for d, rs in report.reasons_by_did.items() if Reason.REFERENCED.value in rs} == got


def test_refs_are_appended_distinct_and_compaction_dedups_and_sorts_them(store: SetupStore) -> None:
    seen(store, "1", "did:plc:b", h(1.1))
    seen(store, "2", "did:plc:b", h(1.2))                # same hour, same DID, another batch
    seen(store, "3", "did:plc:a", h(1.3))
    seen(store, "4", "did:plc:b", h(0.5))                # an earlier hour
    store.put_records([("did:plc:x", LIKE, "5", "c", like("did:plc:c"), None, h(2).isoformat()),
                       ("did:plc:x", LIKE, "6", "c", like("did:plc:c"), None, h(2.5).isoformat())])
    assert store.fetchall("SELECT count(*) FROM ref_log WHERE did = 'did:plc:c'") == [(1,)]  # distinct in a batch
    assert store.fetchall("SELECT count(*) FROM ref_log") == [(5,)]
    store.compact()
    want = [(h(0), "did:plc:b"), (h(1), "did:plc:a"), (h(1), "did:plc:b"), (h(2), "did:plc:c")]
    assert store.fetchall("SELECT hour, did FROM ref_base") == want     # sorted by (hour, did)
    assert store.fetchall("SELECT count(*) FROM ref_log") == [(0,)]
    seen(store, "7", "did:plc:a", h(1.9))                # already in the base
    seen(store, "8", "did:plc:d", h(3))
    store.compact()
    assert store.fetchall("SELECT hour, did FROM ref_base ORDER BY ALL") == sorted([*want, (h(3), "did:plc:d")])
    store.compact(full=True)
    assert store.fetchall("SELECT hour, did FROM ref_base") == sorted([*want, (h(3), "did:plc:d")])


def _main_layout_file(path: Path) -> None:
    """A file as the store before storage/refs.py wrote it: `refs VARCHAR[]` per record in
    record_base and record_log, a `records` view showing it, no ref_log/ref_base."""
    Store(path).close()
    con = duckdb.connect(str(path))
    con.execute("DROP VIEW records; DROP TABLE ref_log; DROP TABLE ref_base")
    con.execute("ALTER TABLE record_base DROP COLUMN created_us; ALTER TABLE record_base DROP COLUMN created_raw")
    con.execute("ALTER TABLE record_base ADD COLUMN created_at TIMESTAMPTZ")  # as before schema 5
    con.execute("ALTER TABLE record_base ADD COLUMN refs VARCHAR[]")
    con.execute("ALTER TABLE record_log ADD COLUMN refs VARCHAR[]")
    con.execute("INSERT INTO record_base (did, collection, rkey, cid, record, indexed_at, event_at, refs) VALUES "
                "('did:plc:a', ?, '1', 'c1', ?, now(), ?, ['did:plc:liked']), "
                "('did:plc:a', ?, '2', 'c2', '{}', now(), ?, ['did:plc:followed', 'did:plc:liked']), "
                "('did:plc:a', 'app.bsky.actor.profile', 'self', 'c3', '{}', now(), ?, NULL)",
                [LIKE, like("did:plc:liked"), h(1.5), FOLLOW, h(1.7), h(1.8)])
    con.execute("INSERT INTO record_log (v, did, collection, rkey, cid, record, indexed_at, event_at, refs) VALUES "
                "(1, 'did:plc:b', ?, '1', 'c4', '{}', now(), ?, ['did:plc:logged'])", [LIKE, h(3.2)])
    con.execute("CREATE VIEW records AS SELECT did, collection, rkey, cid, rev, record, created_at, indexed_at, "
                "event_at, refs FROM record_base")
    con.close()


def test_a_file_with_the_refs_column_is_migrated_on_open(tmp_path: Path) -> None:
    path = tmp_path / "main.duckdb"
    _main_layout_file(path)
    with pytest.raises(StorageError, match="skyfill migrate --db"):
        Store(path, read_only=True)
    with Store(path) as s:
        assert s.fetchall("SELECT hour, did FROM ref_base ORDER BY ALL") == [
            (h(1), "did:plc:followed"), (h(1), "did:plc:liked"), (h(3), "did:plc:logged")]
        columns = {c for (c,) in s.fetchall("SELECT column_name FROM duckdb_columns() "
                                              "WHERE table_name IN ('records', 'record_base', 'record_log')")}
        assert "refs" not in columns and "event_at" in columns
        assert s.fetchall("SELECT count(*) FROM records") == [(4,)]
        assert s.fetchall("SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
    with Store(path) as s:                         # a second open changes nothing
        assert s.fetchall("SELECT count(*) FROM ref_base") == [(3,)]
    with Store(path, read_only=True) as s:
        assert s.fetchall("SELECT count(*) FROM records") == [(4,)]


# The view's merge as it was before the per-column aggregates (one struct per column group),
# kept here as the oracle the new view must equal; the repo's version (repos.REV_FIELDS) from
# the head row with the newest rev, then v (a row without a rev never gives it).
def _struct_merged() -> str:
    cols = ", ".join(repos.REPO_COLUMNS[1:])
    head = [c for c in repos.HEAD_FIELDS if c != "first_seen_at"]
    out = ", ".join([f"{'r' if c in repos.REV_FIELDS else 'h'}.{c} AS {c}" for c in head] + ["first_seen_at"]
                    + [f"f.{c} AS {c}" for c in repos.BACKFILL_FIELDS])
    return f"""
SELECT did, {cols} FROM repo_base b WHERE b.did NOT IN (SELECT did FROM repo_log)
UNION ALL
SELECT did, {out} FROM (
    SELECT did, arg_max(struct_pack({", ".join(f"{c} := {c}" for c in head)}), hv) AS h,
           arg_max(struct_pack({", ".join(f"{c} := {c}" for c in repos.BACKFILL_FIELDS)}), fv) AS f,
           arg_max(struct_pack({", ".join(f"{c} := {c}" for c in repos.REV_FIELDS)}), rv) AS r,
           arg_min(first_seen_at, v) AS first_seen_at
    FROM (
        SELECT did, 0 AS v, 0 AS hv, 0 AS fv, {cols}, struct_pack(r := coalesce(rev, ''), v := 0) AS rv
    FROM repo_base WHERE did IN (SELECT did FROM repo_log)
        UNION ALL
        SELECT did, v, CASE WHEN part = 'head' THEN v ELSE -1 END, CASE WHEN part = 'backfill' THEN v ELSE -1 END,
               {cols}, struct_pack(r := CASE WHEN part = 'head' THEN coalesce(rev, '') ELSE '' END,
                  v := CASE WHEN part = 'head' THEN v ELSE -1 END) AS rv FROM repo_log
    ) GROUP BY did
)"""


def test_the_repos_view_equals_the_struct_merge_for_mixed_base_and_log_states(store: SetupStore) -> None:
    rng = random.Random(5)
    rows: list[tuple[Any, ...]] = []
    for i in range(60):
        did = f"did:plc:m{i:02d}"
        if rng.random() < 0.7:                   # in the base (with NULLs in some columns)
            rows.append(("base", 0, did, rng.choice([None, "r0"]), rng.choice([None, h(0)]), h(-i),
                         rng.choice(["synchronized", "desynchronized"]), rng.choice([None, "ok", "RepoNotFound"])))
        for k in range(rng.randrange(4)):       # 0-3 log rows, head or backfill
            part = rng.choice(["head", "backfill"])
            rows.append((part, 10 * i + k + 1, did, rng.choice([None, f"r{k + 1}"]), rng.choice([None, h(k)]),
                         h(k - i), rng.choice(["synchronized", "desynchronized"]), rng.choice([None, "ok", "retrying"])))
    for part, v, did, rev, last_event_at, first_seen_at, sync_state, status in rows:
        if part == "base":
            store.execute_write("INSERT INTO repo_base (did, rev, last_event_at, first_seen_at, sync_state, "
                                "backfill_status, k) VALUES (?, ?, ?, ?, ?, ?, md5_number_lower(?))",
                                [did, rev, last_event_at, first_seen_at, sync_state, status, did])
        elif part == "head":                     # a writer appends only the group it owns
            store.execute_write("INSERT INTO repo_log (v, part, did, rev, last_event_at, first_seen_at, sync_state, k) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?, md5_number_lower(?))",
                                [v, part, did, rev, last_event_at, first_seen_at, sync_state, did])
        else:
            store.execute_write("INSERT INTO repo_log (v, part, did, first_seen_at, backfill_status, backfilled_at, k) "
                                "VALUES (?, ?, ?, ?, ?, ?, md5_number_lower(?))", [v, part, did, first_seen_at, status, h(v), did])
    cols = ", ".join(repos.REPO_COLUMNS)
    want = store.fetchall(f"SELECT {cols} FROM ({_struct_merged()}) ORDER BY did")
    assert len(want) == len({r[2] for r in rows}) and any(r[0] != "base" for r in rows)
    assert store.fetchall(f"SELECT {cols} FROM repos ORDER BY did") == want
    # a filter on the view gives the same rows as the filter on the oracle
    where = "sync_state = 'desynchronized' AND (backfill_status IS NULL OR backfill_status <> 'RepoNotFound')"
    assert store.fetchall(f"SELECT did FROM repos WHERE {where} ORDER BY did") == \
        store.fetchall(f"SELECT did FROM ({_struct_merged()}) WHERE {where} ORDER BY did")
