"""`repos` on the v2 layout (storage/repos.py): appended head/backfill groups, the view, compaction
(also racing writers), the migration of a v1 file, and the daemon tracker's bounded cache."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest

from skyfill.consumer import Account, Identity, Tracker, Verdict
from skyfill.storage import Batch, BackfillStatus, RepoRow, RetryPolicy, Store, repos

from .support.mirror import consume_until, expected_mirror, mirror_of, world_frames
from .support.relay import LocalRelay
from .support.store import SetupStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)
COLS = ", ".join(repos.REPO_COLUMNS)
POLICY = RetryPolicy(max_attempts=3, backoff_min=timedelta(seconds=1), backoff_max=timedelta(seconds=2))
V1_SCHEMA = Path(__file__).parent / "fixtures" / "schema_v1.sql"


def head(did: str, seq: int, **kw: Any) -> RepoRow:
    kw.setdefault("rev", f"3l{seq:011d}")
    kw.setdefault("first_seen_at", T0 + timedelta(seconds=seq))
    return RepoRow(did=did, data_cid=f"bafy{seq}", commit_cid=f"bafc{seq}", last_seq=seq,
                   last_event_at="2026-01-01T00:00:00Z", **kw)


def apply_heads(store: Store, *rows: RepoRow) -> None:
    batch = Batch()
    for row in rows:
        batch.put_repo(row)
    batch.cursor = ("relay", max(r.last_seq or 0 for r in rows))
    store.apply(batch)


def view(store: Store, did: str | None = None) -> list[tuple[Any, ...]]:
    if did is None:
        return store.fetchall(f"SELECT {COLS} FROM repos ORDER BY did")
    return store.fetchall(f"SELECT {COLS} FROM repos WHERE did = ?", [did])


def one(store: Store, did: str, columns: str) -> tuple[Any, ...]:
    rows = store.fetchall(f"SELECT {columns} FROM repos WHERE did = ?", [did])
    assert len(rows) == 1, rows
    return rows[0]


def counts(store: Store) -> tuple[int, int]:
    return store.fetchall("SELECT (SELECT count(*) FROM repo_base), (SELECT count(*) FROM repo_log)")[0]


@pytest.fixture
def store(tmp_path: Path) -> SetupStore:
    with SetupStore(tmp_path / "m.duckdb") as s:
        yield s


def test_no_update_or_primary_key_on_repos(store: SetupStore) -> None:
    kinds = dict(store.fetchall("SELECT table_name, table_type FROM information_schema.tables "
                                "WHERE table_name IN ('repos', 'repo_base', 'repo_log')"))
    assert kinds == {"repos": "VIEW", "repo_base": "BASE TABLE", "repo_log": "BASE TABLE"}
    assert store.fetchall("SELECT count(*) FROM duckdb_constraints() WHERE table_name IN ('repo_base', 'repo_log') "
                          "AND constraint_type IN ('PRIMARY KEY', 'UNIQUE')") == [(0,)]
    for path in Path(repos.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "UPDATE repos" not in text and "INTO repos" not in text, path


def test_head_then_backfill_then_compaction_then_more(store: SetupStore) -> None:
    a, b = "did:plc:a", "did:plc:b"
    apply_heads(store, head(a, 1), head(b, 2))
    apply_heads(store, head(a, 3, handle="a.test"))
    assert one(store, a, "rev, last_seq, handle, backfill_status, backfill_attempts") == (
        "3l00000000003", 3, "a.test", None, 0)
    # a backfill group (failure) changes only the backfill columns
    store.record_backfill_failure(a, status=BackfillStatus.RETRYING, error="boom", policy=POLICY)
    assert one(store, a, "rev, handle, backfill_status, backfill_error, backfill_attempts") == (
        "3l00000000003", "a.test", "retrying", "boom", 1)
    before = view(store)
    assert len(before) == 2
    assert store.compact_repos() == 2
    assert counts(store) == (2, 0)
    assert view(store) == before
    # more of each group after the compaction: the log overrides the base, group by group
    apply_heads(store, head(a, 5, handle="a.test", sync_state="desynchronized", desync_reason="since_mismatch"))
    assert one(store, a, "rev, sync_state, desync_reason, backfill_status, backfill_attempts") == (
        "3l00000000005", "desynchronized", "since_mismatch", "retrying", 1)
    store.record_backfill_failure(a, status=BackfillStatus.RETRYING, error="again", policy=POLICY)
    assert one(store, a, "rev, backfill_error, backfill_attempts") == ("3l00000000005", "again", 2)
    assert one(store, b, "rev, backfill_status") == ("3l00000000002", None)
    again = view(store)
    store.compact_repos()
    assert view(store) == again and counts(store) == (2, 0)
    # re-sorting the base (compaction appends its rows at the end) changes no row either
    store.compact(full=True)
    assert view(store) == again
    dids = [r[0] for r in store.fetchall("SELECT did FROM repo_base")]
    assert dids == sorted(dids)


def test_first_seen_at_is_never_overwritten(store: SetupStore) -> None:
    did = "did:plc:first"
    # a backfill outcome creates the row (wall clock), the firehose's later row carries its own time
    store.record_backfill_failure(did, status=BackfillStatus.RETRYING, error="x", policy=POLICY)
    (created,) = one(store, did, "first_seen_at")
    assert one(store, did, "active, status, sync_state, backfill_attempts") == (True, "active", "unknown", 1)
    apply_heads(store, head(did, 7, first_seen_at=T0))
    assert one(store, did, "first_seen_at, rev") == (created, "3l00000000007")
    store.compact_repos()
    apply_heads(store, head(did, 8, first_seen_at=T0 + timedelta(days=9)))
    assert one(store, did, "first_seen_at, rev") == (created, "3l00000000008")
    store.compact_repos()
    assert one(store, did, "first_seen_at") == (created,)


def test_queue_transitions_on_the_log(store: SetupStore) -> None:
    did = "did:plc:q"
    apply_heads(store, head(did, 1))
    store.enqueue({did: ["desynchronized"]})
    assert store.claim_backfills(10) == [did]
    store.record_backfill_failure(did, status=BackfillStatus.RETRYING, error="e1", policy=POLICY)
    assert store.backfill_attempts(did) == 1
    store.compact_repos()
    # a deferral (the host's rate limit) keeps the attempts
    at = T0 + timedelta(days=400)
    store.defer_backfill(did, at, error="parked")
    assert one(store, did, "backfill_status, backfill_error, backfill_attempts, backfill_retry_after") == (
        "retrying", "parked", 1, at)
    store.record_backfill_failure(did, status=BackfillStatus.RETRYING, error="e2", policy=POLICY)
    assert store.backfill_attempts(did) == 2
    status, message = store.record_backfill_failure(did, status=BackfillStatus.RETRYING, error="e3", policy=POLICY)
    assert status is BackfillStatus.FAILED and message.startswith("gave up after 3 attempts")
    assert store.fetchall("SELECT state FROM backfill_queue WHERE did = ?", [did]) == [("failed",)]
    # a committed reconcile: ok, attempts reset, the head group synchronized at its rev
    store.reconcile(did, rev="3l00000000009", data_cid="bafyroot", commit_cid="bafycommit", fetched={},
                    materialize=lambda keys: pytest.fail("nothing to decode"))
    assert one(store, did, "rev, data_cid, sync_state, last_seq, backfill_status, backfill_attempts, "
                           "backfill_error, backfilled_rev") == (
        "3l00000000009", "bafyroot", "synchronized", 1, "ok", 0, None, "3l00000000009")
    assert store.fetchall("SELECT state FROM backfill_queue WHERE did = ?", [did]) == [("done",)]
    assert store.trusted_root(did) == "bafyroot"
    # a reconcile with firehose effects captured meanwhile: their head group wins, in one transaction
    after = Batch()
    after.put_repo(head(did, 12, rev="3l00000000012", sync_state="synchronized"))
    store.reconcile(did, rev="3l00000000010", data_cid="bafyroot2", commit_cid="bafyc2", fetched={},
                    materialize=lambda keys: pytest.fail("nothing to decode"), after=after)
    assert one(store, did, "rev, last_seq, backfilled_rev") == ("3l00000000012", 12, "3l00000000010")
    assert store.fetchall("SELECT count(*) FROM repo_log GROUP BY v, part, did HAVING count(*) > 1") == []


def test_compaction_racing_writers_equals_never_compacting(tmp_path: Path) -> None:
    dids = [f"did:plc:{i:04d}" for i in range(60)]

    def ops(i: int, store: Store) -> None:
        batch = Batch()
        for k in range(10):
            did = dids[(i * 7 + k * 13) % len(dids)]
            batch.put_repo(head(did, i * 100 + k, handle=f"h{i}", first_seen_at=T0 + timedelta(seconds=i)))
        batch.cursor = ("relay", i)
        store.apply(batch)
        if i % 3 == 0:
            store.defer_backfill(dids[i % len(dids)], T0 + timedelta(hours=i), error=f"parked {i}")

    rounds = 120
    with SetupStore(tmp_path / "a.duckdb") as racing, SetupStore(tmp_path / "b.duckdb") as plain:
        for s in (racing, plain):  # every DID's row exists first (a deferral would stamp the wall clock)
            apply_heads(s, *(head(did, 0) for did in dids))
        done = threading.Event()
        compactions: list[int] = []
        errors: list[BaseException] = []

        def compactor() -> None:
            try:
                while not done.is_set():
                    compactions.append(racing.compact_repos())
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        thread = threading.Thread(target=compactor)
        thread.start()
        try:
            for i in range(rounds):
                ops(i, racing)
                ops(i, plain)
        finally:
            done.set()
            thread.join()
        assert not errors, errors
        assert sum(1 for n in compactions if n) >= 2, compactions  # it really ran between writes
        assert view(racing) == view(plain)
        racing.compact_repos()
        assert view(racing) == view(plain)
        assert counts(racing)[1] == 0 and counts(racing)[0] == len(dids)


def _v1_file(path: Path) -> list[tuple[Any, ...]]:
    con = duckdb.connect(str(path))
    con.execute(V1_SCHEMA.read_text())
    con.execute(
        "INSERT INTO repos (did, rev, data_cid, last_seq, last_event_at, handle, active, status, sync_state, "
        "desync_reason, first_seen_at, backfill_status, backfill_attempts, backfilled_rev) "
        "SELECT 'did:plc:' || md5(i::VARCHAR)[:24], '3l' || lpad(i::VARCHAR, 11, '0'), 'bafy' || i, i, TIMESTAMPTZ '2026-01-01' + i * "
        "INTERVAL 1 SECOND, CASE WHEN i % 2 = 0 THEN 'h' || i END, i % 5 <> 0, CASE WHEN i % 5 = 0 THEN "
        "'deactivated' ELSE 'active' END, CASE WHEN i % 3 = 0 THEN 'desynchronized' ELSE 'synchronized' END, "
        "CASE WHEN i % 3 = 0 THEN 'since_mismatch' END, TIMESTAMPTZ '2025-01-01' + i * INTERVAL 1 MINUTE, "
        "CASE WHEN i % 4 = 0 THEN 'ok' END, i % 4, CASE WHEN i % 4 = 0 THEN '3l' || i END FROM range(3000) t(i)"
    )
    con.execute("INSERT INTO cursors VALUES ('relay', 77, now())")
    # a v1 table has no backfill_run (added later): the migrated rows have it NULL
    v1_cols = COLS.replace(", backfill_run", ", NULL AS backfill_run")
    rows = con.execute(f"SELECT {v1_cols} FROM repos ORDER BY did").fetchall()
    con.close()
    return rows


def test_a_v1_file_is_migrated_on_open(tmp_path: Path) -> None:
    path = tmp_path / "v1.duckdb"
    old = _v1_file(path)
    with Store(path) as store:
        assert view(store) == old
        assert store.fetchall("SELECT table_type FROM information_schema.tables WHERE table_name = 'repos'") == [
            ("VIEW",)]
        assert store.load_cursor("relay") == 77
        # the base is sorted by did: a point read scans one row group's zone map
        dids = [r[0] for r in store.fetchall("SELECT did FROM repo_base")]
        assert dids == sorted(dids)
        apply_heads(store, head(old[0][0], 9999))
        assert one(store, old[0][0], "rev, first_seen_at") == ("3l00000009999", old[0][12])
    with Store(path) as store:  # reopening a v2 file changes nothing
        assert counts(store) == (3000, 1)


def test_tracker_cache_never_evicts_an_uncommitted_row(store: SetupStore) -> None:
    tracker = Tracker(load=store.repo_row, capacity=3, clock=lambda: T0)
    dids = [f"did:plc:t{i}" for i in range(6)]
    seq = 0

    def event(did: str, handle: str) -> Identity:
        nonlocal seq
        seq += 1
        return Identity(seq=seq, time="2026-01-01T00:00:00Z", did=did, handle=handle)

    first = Batch()
    for did in dids:
        assert tracker.apply(event(did, "one"), first) is Verdict.APPLIED
    tracker.sealed()
    # nothing committed yet: every row is pinned by the sealed batch, nothing may go
    assert tracker.trim(committed=0) == 0 and len(tracker.rows) == 6
    store.apply(first)
    second = Batch()
    tracker.apply(event(dids[0], "two"), second)
    tracker.apply(Account(seq=seq + 1, time="2026-01-01T00:00:01Z", did=dids[5], active=False,
                          status="deactivated"), second)
    seq += 1
    evicted = {d: RepoRow(**{f: getattr(tracker.rows[d], f) for f in RepoRow.__slots__}) for d in dids[1:5]}
    # batch 1 committed, batch 2 (dids 0 and 5) filling: only the four others may go
    assert tracker.trim(committed=1) == 3
    assert dids[0] in tracker.rows and dids[5] in tracker.rows
    assert len(tracker.rows) == 3
    # a re-read row equals the evicted one (the store held its last change)
    for did in dids[1:5]:
        tracker.rows.pop(did, None)
        again = tracker.row(did)
        assert again is not None
        assert _fields(again) == _fields(evicted[did])
    # a row evicted once its batch committed reads back with the same verdict-making state
    tracker.sealed()
    store.apply(second)
    tracker.rows.pop(dids[5])
    row = tracker.row(dids[5])
    assert row is not None and (row.active, row.status, row.handle) == (False, "deactivated", "one")
    assert tracker.loads >= 6


def _fields(row: RepoRow) -> dict[str, Any]:
    """The row's state; last_event_at compared as an instant (the store gives it back as its text)."""
    out = {f: getattr(row, f) for f in RepoRow.__slots__}
    text = out.pop("last_event_at")
    out["last_event_at"] = datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None
    return out


def test_point_reads_equal_the_view(store: SetupStore) -> None:
    a, b, c = "did:plc:pa", "did:plc:pb", "did:plc:pc"
    store.record_backfill_failure(c, status=BackfillStatus.RETRYING, error="x", policy=POLICY)  # backfill group only
    apply_heads(store, head(a, 1), head(b, 2))
    store.compact_repos()
    apply_heads(store, head(a, 3, handle="a.test", first_seen_at=T0 + timedelta(days=3)))
    store.defer_backfill(b, T0, error="parked")
    head_cols = "did, rev, data_cid, commit_cid, last_seq, last_event_at, handle, active, status, sync_state, " \
                "desync_reason, desynced_at, first_seen_at"
    for did in (a, b, c):
        row = store.repo_row(did)
        assert row is not None
        expected = one(store, did, head_cols)
        got = _fields(row)
        assert tuple(got[f] for f in head_cols.split(", ")) == expected
    assert store.repo_row("did:plc:none") is None
    many = store.repo_rows([a, b, c, "did:plc:none"] + [f"did:plc:x{i}" for i in range(40)])
    assert sorted(many) == [a, b, c]
    assert all(_fields(many[d]) == _fields(store.repo_row(d)) for d in (a, b, c))  # type: ignore[arg-type]


async def test_a_daemon_with_a_tiny_tracker_cache_stores_what_a_big_one_does(tmp_path: Path) -> None:
    """Rows evicted and read back (capacity 5 of 40 DIDs, 100-event batches, a restart and a
    compaction midway) give the same mirror and the same repos rows as holding every row."""
    frames = world_frames(3, 40, 2400)
    small, big = tmp_path / "small.duckdb", tmp_path / "big.duckdb"
    with LocalRelay(frames[:1200]) as relay:
        daemon = await consume_until(small, relay, relay.head, cursor=0, tracker_capacity=5, batch_events=100)
        # more reads than DIDs: evicted rows were read back (a DID new to the store is never read)
        assert daemon.tracker.loads > 40 and len(daemon.tracker.rows) <= 5 + 100
        await consume_until(big, relay, relay.head, cursor=0)
        with SetupStore(small) as s:
            assert s.compact_repos() > 0
        relay.append(frames[1200:])
        await consume_until(small, relay, relay.head, tracker_capacity=5, batch_events=100)
        await consume_until(big, relay, relay.head)
    assert mirror_of(small) == mirror_of(big) == expected_mirror(frames)
    with Store(small) as a, Store(big) as b:
        assert view(a) == view(b)


def test_desynchronized_count_equals_the_view(store: SetupStore) -> None:
    """The gauge's count (read without the view's merge) equals the view's, whatever mix of base
    rows, head versions and backfill-only rows the DIDs have, before and after compaction."""
    def desync(did: str, seq: int) -> RepoRow:
        return head(did, seq, sync_state="desynchronized", desync_reason="rev-gap")

    def check() -> None:
        want = store.fetchall("SELECT count(*) FROM repos WHERE sync_state = 'desynchronized'")[0][0]
        assert store.count_desynchronized() == want

    check()
    apply_heads(store, desync("did:plc:a", 1), desync("did:plc:b", 2), head("did:plc:c", 3), head("did:plc:g", 4))
    store.compact_repos()
    check()
    apply_heads(store, head("did:plc:b", 5), desync("did:plc:c", 6), desync("did:plc:d", 7), desync("did:plc:e", 8))
    apply_heads(store, head("did:plc:e", 9), desync("did:plc:d", 10))
    store.record_backfill_failure("did:plc:f", status=BackfillStatus.RETRYING, error="x", policy=POLICY)
    store.record_backfill_failure("did:plc:a", status=BackfillStatus.RETRYING, error="x", policy=POLICY)
    check()
    assert store.count_desynchronized() == 3   # a (base, backfill log row after), c and d (log)
    store.compact_repos()
    check()
    assert store.count_desynchronized() == 3
