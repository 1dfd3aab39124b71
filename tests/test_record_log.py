"""The records layout: versions appended to a log, compacted into a base, one row per live record in the view.

Every test compares the `records` view with a plain Python model of what the writes mean, before
and after compactions, so a wrong anti-join, a lost purge or a compaction that folds too much shows
up as a row too many or too few.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from skyfill.errors import StorageError
from skyfill.storage import Batch, RecordColumns, RecordPut, Store
from skyfill.storage import compaction as compaction_module
from skyfill.storage.migrate import SCHEMA_VERSION
from tests.support.generate.records import tid
from tests.support.wait import poll

Key = tuple[str, str, str]
LIKE = "app.bsky.feed.like"
POST = "app.bsky.feed.post"
FOLLOW = "app.bsky.graph.follow"
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "s.duckdb")
    yield s
    s.close()


def live(store: Store) -> dict[Key, str]:
    rows = store.fetchall("SELECT did, collection, rkey, cid FROM records")
    out = {(d, c, k): cid for d, c, k, cid in rows}
    assert len(out) == len(rows), "the view shows a key twice"
    return out


def log_rows(store: Store) -> int:
    return int(store.fetchall("SELECT (SELECT count(*) FROM record_log) + (SELECT count(*) FROM record_purges)")[0][0])


def put(batch: Batch, key: Key, cid: str, record: str = "{}", event_at: str | None = None) -> None:
    batch.put_record(*key, RecordPut(cid, "3kaaaaaaaaaaa", record, None, event_at))


def test_updates_deletes_and_recreates_show_the_newest_version_before_and_after_compaction(store: Store) -> None:
    a, b, c = ("did:plc:a", POST, "1"), ("did:plc:a", POST, "2"), ("did:plc:b", LIKE, "1")
    steps: list[list[tuple[Key, str | None]]] = [
        [(a, "X1"), (b, "Y1"), (c, "Z1")],
        [(a, "X2")],                 # update
        [(b, None)],                 # delete
        [(b, "Y2"), (c, None)],      # re-create and delete
    ]
    model: dict[Key, str] = {}
    for i, step in enumerate(steps):
        batch = Batch()
        for key, cid in step:
            if cid is None:
                batch.delete_record(*key)
                model.pop(key, None)
            else:
                put(batch, key, cid)
                model[key] = cid
        store.apply(batch)
        assert live(store) == model
        if i == 1:
            store.compact()                     # half the history in the base, half in the log
            assert log_rows(store) == 0 and live(store) == model
    store.compact(full=True)                    # rewrites the base in key order
    assert log_rows(store) == 0
    assert live(store) == model == {a: "X2", b: "Y2"}
    assert store.fetchall("SELECT count(*) FROM record_base")[0][0] == 2


def test_account_deletion_removes_base_and_log_rows_but_not_a_recreate_after_it(store: Store) -> None:
    gone, other = "did:plc:gone", "did:plc:other"
    first = Batch()
    for i in range(3):
        put(first, (gone, POST, str(i)), f"c{i}")
    put(first, (other, POST, "0"), "o")
    store.apply(first)
    store.compact()                              # the DID's rows are in the base
    second = Batch()
    put(second, (gone, POST, "9"), "c9")         # in the log, before the purge
    store.apply(second)
    purge = Batch()
    purge.purge_did(gone)
    put(purge, (gone, LIKE, "new"), "n")         # the account came back in the same batch
    store.apply(purge)
    expect = {(other, POST, "0"): "o", (gone, LIKE, "new"): "n"}
    assert live(store) == expect
    store.compact()
    assert live(store) == expect and log_rows(store) == 0


def reconcile(store: Store, did: str, records: dict[tuple[str, str], str], rev: str) -> object:
    def materialize(keys: list[tuple[str, str]]) -> RecordColumns:
        return RecordColumns(collection=[k[0] for k in keys], rkey=[k[1] for k in keys],
                             cid=[records[k] for k in keys], record=["{}" for _ in keys],
                             created_at=[None for _ in keys])

    return store.reconcile(did, rev=rev, data_cid=f"root-{rev}", commit_cid=f"commit-{rev}",
                           fetched=records, materialize=materialize)


def test_a_backfill_snapshot_deletes_what_vanished_from_the_base_and_the_log(store: Store) -> None:
    did = "did:plc:snap"
    batch = Batch()
    for i in range(4):
        put(batch, (did, POST, f"k{i}"), f"old{i}")
    store.apply(batch)
    store.compact()
    newer = Batch()
    put(newer, (did, POST, "k4"), "old4")        # a log row the snapshot lacks too
    store.apply(newer)
    counts = reconcile(store, did, {(POST, "k0"): "old0", (POST, "k1"): "new1", (LIKE, "l"): "L"}, tid(1_700_000_000_000_000, 1))
    assert (counts.added, counts.updated, counts.deleted, counts.unchanged) == (1, 1, 3, 1)  # type: ignore[attr-defined]
    expect = {(did, POST, "k0"): "old0", (did, POST, "k1"): "new1", (did, LIKE, "l"): "L"}
    assert live(store) == expect
    store.compact()
    assert live(store) == expect


def test_event_time_is_the_firehose_time_else_the_tid_of_the_rkey_else_of_the_rev(store: Store) -> None:
    did = "did:plc:time"
    live_batch = Batch()
    put(live_batch, ("did:plc:live", POST, tid(1_600_000_000_000_000, 3)), "a", event_at="2026-11-30T12:00:00.000Z")
    store.apply(live_batch)
    rkey_tid = tid(1_650_000_000_000_000, 7)
    rev = tid(1_660_000_000_000_000, 1)
    reconcile(store, did, {(POST, rkey_tid): "b", ("app.bsky.actor.profile", "self"): "c"}, rev)
    got = {(c, k): t for c, k, t in store.fetchall("SELECT collection, rkey, event_at FROM records")}
    assert got[(POST, tid(1_600_000_000_000_000, 3))] == datetime(2026, 11, 30, 12, tzinfo=UTC)
    assert got[(POST, rkey_tid)] == datetime.fromtimestamp(1_650_000_000, UTC)
    assert got[("app.bsky.actor.profile", "self")] == datetime.fromtimestamp(1_660_000_000, UTC)


def test_referenced_dids_are_extracted_when_written(store: Store) -> None:
    """Each record is seen in its own hour, so the (hour, did) pairs of ref_log say which record
    referenced which DIDs (storage/refs.py)."""
    did = "did:plc:refs"
    batch = Batch()
    put(batch, (did, LIKE, "1"), "a", '{"subject": {"uri": "at://did:plc:liked/app.bsky.feed.post/x", "cid": "b"}}',
        "2026-11-30T01:10:00Z")
    put(batch, (did, FOLLOW, "2"), "b", '{"subject": "did:plc:followed"}', "2026-11-30T02:10:00Z")
    put(batch, (did, POST, "3"), "c", '{"text": "hi", "reply": {"parent": {"uri": "at://did:plc:p/app.bsky.feed.post/1"},'
        ' "root": {"uri": "at://did:plc:r/app.bsky.feed.post/1"}}, "embed": {"record": {"uri": "at://did:web:q.example/x/y"}}}',
        "2026-11-30T03:10:00Z")
    put(batch, (did, "app.bsky.graph.block", "4"), "d", '{"subject": "did:plc:blocked"}', "2026-11-30T04:10:00Z")
    put(batch, (did, FOLLOW, "5"), "e", '{"subject": "not a did"}', "2026-11-30T05:10:00Z")
    store.apply(batch)
    refs: dict[int, list[str]] = {}
    for hour, ref in store.fetchall("SELECT hour, did FROM ref_log ORDER BY did"):
        assert hour == datetime(2026, 11, 30, hour.hour, tzinfo=UTC)
        refs.setdefault(hour.hour, []).append(ref)
    assert refs == {1: ["did:plc:liked"], 2: ["did:plc:followed"], 3: ["did:plc:p", "did:plc:r", "did:web:q.example"]}
    assert "refs" not in {c for (c,) in store.fetchall(
        "SELECT column_name FROM duckdb_columns() WHERE table_name IN ('records', 'record_base', 'record_log')")}


def test_compaction_racing_writes_ends_like_the_writes_alone(store: Store) -> None:
    rng = random.Random(11)
    dids = [f"did:plc:race{i}" for i in range(8)]
    model: dict[Key, str] = {}
    stop = threading.Event()
    errors: list[BaseException] = []
    compactions = 0

    def compact_until_stopped() -> None:
        nonlocal compactions
        try:
            while not stop.is_set():
                store.compact(full=compactions % 5 == 4)   # now and then the whole base rewritten
                compactions += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    worker = threading.Thread(target=compact_until_stopped)
    worker.start()
    try:
        for n in range(300):
            batch = Batch()
            for _ in range(rng.randrange(1, 20)):
                did = rng.choice(dids)
                key = (did, rng.choice((POST, LIKE)), str(rng.randrange(30)))
                roll = rng.random()
                if roll < 0.02:
                    batch.purge_did(did)
                    for k in [k for k in model if k[0] == did]:
                        del model[k]
                elif roll < 0.3:
                    batch.delete_record(*key)
                    model.pop(key, None)
                else:
                    cid = f"c{n}-{rng.randrange(10**6)}"
                    put(batch, key, cid)
                    model[key] = cid
            store.apply(batch)
            if n % 50 == 0:
                assert live(store) == model
    finally:
        stop.set()
        worker.join()
    assert not errors, errors
    assert compactions > 0
    assert live(store) == model
    store.compact()
    assert live(store) == model and log_rows(store) == 0


def test_a_background_compaction_starts_past_the_threshold(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compaction_module, "COMPACT_AFTER_ROWS", 50)
    model: dict[Key, str] = {}
    for n in range(6):
        batch = Batch()
        for i in range(20):
            key = ("did:plc:bg", POST, f"{n}-{i}")
            put(batch, key, "x")
            model[key] = "x"
        store.apply(batch)
    poll(lambda: store.fetchall("SELECT count(*) FROM record_base")[0][0] >= 40, timeout=30,
         what="a background compaction to fold the log")
    store.wait_compaction()
    assert live(store) == model


def make_v1(path: Path) -> None:
    con = duckdb.connect(str(path))
    con.execute((FIXTURES / "schema_v1.sql").read_text())
    like = '{"$type": "app.bsky.feed.like", "subject": {"uri": "at://did:plc:target/app.bsky.feed.post/x", "cid": "b"}}'
    con.execute("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?, now())",
                ["did:plc:old", LIKE, tid(1_650_000_000_000_000, 0), "c1", "3kaaaaaaaaaaa", like, "2022-04-15T05:06:40Z"])
    con.execute("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, NULL, now())",
                ["did:plc:old", "app.bsky.actor.profile", "self", "c2", tid(1_660_000_000_000_000, 0), "{}"])
    con.execute("INSERT INTO repos (did, rev, first_seen_at) VALUES ('did:plc:old', 'r', now())")
    con.close()


def test_a_v1_file_is_migrated_on_open(tmp_path: Path) -> None:
    path = tmp_path / "v1.duckdb"
    make_v1(path)
    with Store(path) as s:
        rows = s.fetchall("SELECT rkey, cid, event_at FROM records ORDER BY rkey")
        assert rows == [
            (tid(1_650_000_000_000_000, 0), "c1", datetime.fromtimestamp(1_650_000_000, UTC)),
            ("self", "c2", datetime.fromtimestamp(1_660_000_000, UTC)),
        ]
        # the like's referenced DID, in the hour of its event time (storage/refs.py)
        assert s.fetchall("SELECT hour, did FROM ref_base") == [
            (datetime.fromtimestamp(1_650_000_000 // 3600 * 3600, UTC), "did:plc:target")]
        assert s.fetchall("SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
        batch = Batch()
        batch.delete_record("did:plc:old", "app.bsky.actor.profile", "self")
        s.apply(batch)
        assert len(s.fetchall("SELECT * FROM records")) == 1
    with Store(path) as s:                       # a second open changes nothing
        assert len(s.fetchall("SELECT * FROM records")) == 1


def test_a_read_only_open_of_a_v1_file_names_the_command_that_migrates_it(tmp_path: Path) -> None:
    path = tmp_path / "v1.duckdb"
    make_v1(path)
    with pytest.raises(StorageError, match=r"skyfill migrate --db .*v1\.duckdb"):
        Store(path, read_only=True)


def test_the_cli_migrates_then_status_reads_and_compact_folds(tmp_path: Path) -> None:
    path = tmp_path / "v1.duckdb"
    make_v1(path)
    cli = [sys.executable, "-m", "skyfill"]
    refused = subprocess.run([*cli, "status", "--db", str(path)], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and f"skyfill migrate --db {path}" in refused.stderr, refused.stderr
    done = subprocess.run([*cli, "migrate", "--db", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout)["schema_version"] == SCHEMA_VERSION, done.stderr
    status = subprocess.run([*cli, "status", "--db", str(path), "--json"], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["records"]["total"] == 2
    with Store(path) as s:
        batch = Batch()
        batch.delete_record("did:plc:old", "app.bsky.actor.profile", "self")
        s.apply(batch)
    compacted = subprocess.run([*cli, "compact", "--db", str(path), "--full"], capture_output=True, text=True,
                               timeout=120)
    assert compacted.returncode == 0 and json.loads(compacted.stdout)["log_rows"] == 1, compacted.stderr
    with Store(path) as s:
        assert log_rows(s) == 0 and len(s.fetchall("SELECT * FROM records")) == 1


# -- kill -9 while compactions run --------------------------------------------------------------

def scripted_batch(n: int) -> list[tuple[str, Key, str | None]]:
    """Batch n of a deterministic history: ("put", key, cid) | ("delete", key, None) | ("purge", (did,..), None)."""
    did = f"did:plc:k{n % 5}"
    ops: list[tuple[str, Key, str | None]] = []
    if n % 37 == 36:
        ops.append(("purge", (did, "", ""), None))
    ops += [("put", (did, POST, f"{n}-{i}"), f"c{n}") for i in range(40)]
    if n >= 3:
        ops.append(("delete", (f"did:plc:k{(n - 3) % 5}", POST, f"{n - 3}-0"), None))
        ops.append(("put", (f"did:plc:k{(n - 2) % 5}", POST, f"{n - 2}-1"), f"u{n}"))
    return ops


def scripted_model(upto: int) -> dict[Key, str]:
    model: dict[Key, str] = {}
    for n in range(upto + 1):
        for kind, key, cid in scripted_batch(n):
            if kind == "purge":
                for k in [k for k in model if k[0] == key[0]]:
                    del model[k]
            elif kind == "delete":
                model.pop(key, None)
            else:
                assert cid is not None
                model[key] = cid
    return model


_WRITER = '''
import sys, threading
from skyfill.storage import Batch, RecordPut, Store
from tests.test_record_log import scripted_batch
store = Store(sys.argv[1])
def compact_forever():
    n = 0
    while True:
        store.compact(full=n % 4 == 3)
        n += 1
        sys.stdout.write("C\\n")   # one write per line: the two threads never interleave inside one
        sys.stdout.flush()
threading.Thread(target=compact_forever, daemon=True).start()
n = 0
while True:
    batch = Batch()
    for kind, key, cid in scripted_batch(n):
        if kind == "purge":
            batch.purge_did(key[0])
        elif kind == "delete":
            batch.delete_record(*key)
        else:
            batch.put_record(*key, RecordPut(cid, None, "{}", None, None))
    store.apply(batch)
    sys.stdout.write(f"B {n}\\n")
    sys.stdout.flush()
    n += 1
'''


@pytest.mark.parametrize("kill_after_compactions", [2, 7])
def test_kill_9_during_compactions_loses_no_committed_batch(tmp_path: Path, kill_after_compactions: int) -> None:
    path = tmp_path / "k.duckdb"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    acked, compactions = -1, 0
    watchdog = threading.Timer(180, proc.kill)   # a hung writer ends the loop below, and the test fails
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("B"):
                acked = int(line.split()[1])
            elif line.startswith("C"):
                compactions += 1
            if compactions >= kill_after_compactions and acked >= 40:
                proc.kill()        # SIGKILL: no close, no checkpoint, a compaction likely mid-way
                break
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait(timeout=60)
    assert compactions >= kill_after_compactions, "the writer died before the kill"
    with Store(path) as s:
        got = live(s)
    # the batch in flight at the kill may or may not have committed; nothing acked may be lost
    assert got in (scripted_model(acked), scripted_model(acked + 1))


def test_rows_left_in_the_logs_by_earlier_processes_count_toward_the_threshold(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "many.duckdb"
    model: dict[Key, str] = {}
    for n in range(3):                   # three short-lived writers, each below the threshold
        with Store(path) as s:
            batch = Batch()
            for i in range(30):
                key = ("did:plc:short", POST, f"{n}-{i}")
                put(batch, key, "x")
                model[key] = "x"
            s.apply(batch)
    monkeypatch.setattr(compaction_module, "COMPACT_AFTER_ROWS", 50)
    with Store(path) as s:
        assert log_rows(s) >= 90
        batch = Batch()
        put(batch, ("did:plc:short", POST, "last"), "y")
        model[("did:plc:short", POST, "last")] = "y"
        s.apply(batch)                   # the first write starts the compaction the logs call for
        s.wait_compaction()
        assert log_rows(s) == 0 and live(s) == model


@pytest.mark.parametrize("n_dids", [5, 1_200])  # the base DIDs listed first, and too many to list
def test_compaction_replaces_base_rows_of_logged_dids_among_new_ones(store: Store, n_dids: int) -> None:
    old = [f"did:plc:old{i:05d}" for i in range(n_dids)]
    batch = Batch()
    for did in old:
        put(batch, (did, "app.bsky.feed.post", "a"), "bafyold")
        put(batch, (did, "app.bsky.feed.post", "b"), "bafykeep")
    store.apply(batch)
    store.compact()
    batch = Batch()
    for did in old:
        put(batch, (did, "app.bsky.feed.post", "a"), "bafynew")
    put(batch, ("did:plc:stranger", "app.bsky.feed.post", "a"), "bafystranger")
    store.apply(batch)
    expected = {(d, "app.bsky.feed.post", "a"): "bafynew" for d in old} | {
        (d, "app.bsky.feed.post", "b"): "bafykeep" for d in old} | {("did:plc:stranger", "app.bsky.feed.post", "a"): "bafystranger"}
    assert live(store) == expected
    result = store.compact().records
    assert result is not None and result.base_deleted == n_dids and result.base_inserted == n_dids + 1
    assert live(store) == expected and log_rows(store) == 0
    assert store.fetchall("SELECT count(*) FROM record_base")[0][0] == 2 * n_dids + 1
