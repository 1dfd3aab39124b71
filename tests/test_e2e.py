"""End to end against the real reference PDS: after every scenario the DuckDB mirror equals what
the PDS serves (tests/support/oracle.py: getRepo walked independently; same (collection, rkey, cid) set,
same rev, nothing missing, nothing extra, nothing stale).

One PDS serves the whole session (the `pds_network` fixture); every test makes its own accounts
and its own database. A consumer is started "at the live head" with `cursor=head_seq(...)`: the
seq of a fresh write by a clock account, so it sees every later event and nothing before (a
cursor-less subscription would race the test's first write).

The daemon runs in-process on its own thread and event loop (`DaemonThread`), so tests can read
its store and run `run_gaps`/`run_backfill` on its loop through the daemon's sink, exactly what
the admin API does; the crash scenario runs the real `skyfill consume` process and kills it.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pytest

from skyfill.app.jobs import all_dids, run_backfill, run_gaps
from skyfill.backfill.config import BackfillConfig
from skyfill.app.handler import lambda_handler
from skyfill.consumer.daemon import ConsumeConfig, Daemon
from skyfill.consumer.resync import DaemonReconciler
from skyfill.storage import Store
from tests.support.network import (
    Create,
    Delete,
    LocalNetwork,
    PdsAccount,
    PdsClient,
    RecordRef,
    Update,
    like_record,
    post_record,
)
from tests.support.oracle import assert_mirror_equals, commit_seq, fetch_truth, head_seq, mirror_diff, rows_of
from tests.support.daemon import announced, reap, spawn_consume, stored_cursor
from tests.support.wait import poll

pytestmark = pytest.mark.pds

POST = "app.bsky.feed.post"
LIKE = "app.bsky.feed.like"
REPOST = "app.bsky.feed.repost"
FOLLOW = "app.bsky.graph.follow"
PROFILE = "app.bsky.actor.profile"

MakeAccount = Callable[..., PdsAccount]
T = TypeVar("T")


# -- helpers ---------------------------------------------------------------------------------


def bf_config(net: LocalNetwork) -> BackfillConfig:
    # The PDS is on 127.0.0.1 and its DID documents say http://localhost:PORT.
    return BackfillConfig(plc_url=net.plc_url, allow_private_hosts=True, per_host_rps=200.0)


def post(client: PdsClient, who: PdsAccount, text: str) -> RecordRef:
    return client.create_record(who, POST, post_record(text))


def follow(client: PdsClient, who: PdsAccount, whom: PdsAccount) -> RecordRef:
    return client.create_record(
        who, FOLLOW, {"$type": FOLLOW, "subject": whom.did, "createdAt": post_record("")["createdAt"]}
    )


def repost(client: PdsClient, who: PdsAccount, subject: RecordRef) -> RecordRef:
    body = like_record(subject)
    body["$type"] = REPOST
    return client.create_record(who, REPOST, body)


def profile(client: PdsClient, who: PdsAccount, name: str) -> RecordRef:
    return client.put_record(who, PROFILE, "self", {"$type": PROFILE, "displayName": name})


def repo_row(con: Any, did: str) -> dict[str, Any]:
    cols = ["rev", "handle", "active", "status", "sync_state", "desync_reason", "backfill_status",
            "backfill_retry_after", "backfilled_at"]
    rows = rows_of(con, f"SELECT {', '.join(cols)} FROM repos WHERE did = ?", [did])
    assert rows, f"no repos row for {did}"
    return dict(zip(cols, rows[0], strict=True))


class DaemonThread:
    """`Daemon(store, ConsumeConfig(...)).run()` on its own thread and loop; `call` runs a
    coroutine on that loop (so a DaemonReconciler sees the same tracker and flush lock)."""

    def __init__(self, store: Store, net: LocalNetwork, *, cursor: int | None) -> None:
        self.store = store
        self.config = ConsumeConfig(relay=net.pds_url, cursor=cursor, flush_interval=0.05, batch_events=500)
        self.loop = asyncio.new_event_loop()
        self.daemon: Daemon | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="skyfill-daemon", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.daemon = Daemon(self.store, self.config)
            self._ready.set()
            self.loop.run_until_complete(self.daemon.run(install_signal_handlers=False))
        except BaseException as exc:  # surfaced by wait_for / stop
            self.error = exc
        finally:
            self._ready.set()
            self.loop.close()

    def __enter__(self) -> DaemonThread:
        self._thread.start()
        self._ready.wait(30)
        assert self.daemon is not None, self.error
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def sink(self) -> DaemonReconciler:
        assert self.daemon is not None
        return DaemonReconciler(self.daemon)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_for(self, seq: int, timeout: float = 60) -> None:
        """Until every event up to `seq` is durably stored (the daemon's committed cursor)."""
        assert self.daemon is not None
        deadline = time.monotonic() + timeout
        while (self.daemon.committed_seq or 0) < seq:
            if self.error is not None or not self._thread.is_alive():
                raise AssertionError(f"daemon died: {self.error!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon stuck at {self.daemon.committed_seq}, wanted {seq}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self._thread.is_alive() and self.daemon is not None:
            self.loop.call_soon_threadsafe(self.daemon.stop)
        self._thread.join(30)
        assert not self._thread.is_alive(), "daemon did not stop"
        if self.error is not None:
            raise self.error


def gaps_now(d: DaemonThread, net: LocalNetwork, start: datetime, **kw: Any) -> dict[str, Any]:
    return d.call(run_gaps(d.store, start=start, end=datetime.now(UTC) + timedelta(minutes=1),
                           config=bf_config(net), **kw))


def dids_with(report: dict[str, Any], reason: str) -> set[str]:
    return {did for did, reasons in report["dids"].items() if reason in reasons}


def coverage(con: Any) -> list[tuple[Any, ...]]:
    return rows_of(con, "SELECT first_event_at, last_event_at, ended FROM coverage ORDER BY id")


# -- scenarios -------------------------------------------------------------------------------


def test_live_activity_of_20_accounts_mirrors_exactly(
    pds_network: LocalNetwork, pds_client: PdsClient, make_account: MakeAccount, tmp_path: Path
) -> None:
    c = pds_client
    store = Store(tmp_path / "live.duckdb")
    start = head_seq(c)
    with DaemonThread(store, pds_network, cursor=start) as d:
        users = [make_account(f"live{i}") for i in range(20)]
        posts = {u.did: [post(c, u, f"{u.handle} #{i}") for i in range(3)] for u in users}
        likes: list[tuple[PdsAccount, RecordRef]] = []
        for i, u in enumerate(users):
            other = users[(i + 1) % 20]
            for k in (1, 2, 3):
                follow(c, u, users[(i + k) % 20])
            likes.append((u, c.create_record(u, LIKE, like_record(posts[other.did][0]))))
            c.create_record(u, LIKE, like_record(posts[other.did][1]))
            repost(c, u, posts[users[(i + 2) % 20].did][2])
            profile(c, u, f"User {i}")
            profile(c, u, f"User {i}, renamed")  # an update
        for u, like in likes[::2]:
            c.delete_record(u, LIKE, like.rkey)
        for u in users[::3]:
            c.delete_record(u, POST, posts[u.did][1].rkey)
        # one commit of 200 ops: creates, updates and deletes of records made just before
        big = users[7]
        seed = [post(c, big, f"seed {i}") for i in range(20)]
        writes = ([Create(POST, post_record(f"bulk {i}")) for i in range(180)]
                  + [Update(POST, r.rkey, post_record(f"seed {i}, edited")) for i, r in enumerate(seed[:10])]
                  + [Delete(POST, r.rkey) for r in seed[10:]])
        commit, _ = c.apply_writes(big, writes)
        d.wait_for(commit_seq(c, big.did, commit.rev, since=start))

        con = store  # reads (under the write lock)
        assert_mirror_equals(con, c, [u.did for u in users])
        assert {u.handle for u in users} == {repo_row(con, u.did)["handle"] for u in users}
        assert rows_of(con, "SELECT count(*) FROM records WHERE did = ?", [big.did])[0][0] > 190
    store.close()


def test_history_before_we_started_is_found_by_gaps_and_brought_in_by_backfill(
    pds_network: LocalNetwork, pds_client: PdsClient, make_account: MakeAccount, tmp_path: Path
) -> None:
    c = pds_client
    # Written before the consumer ever ran.
    old = [make_account(f"hist{i}") for i in range(3)]
    for u in old:
        refs = [post(c, u, f"old {i}") for i in range(5)]
        profile(c, u, "from before")
        c.delete_record(u, POST, refs[0].rkey)
    quiet = make_account("quiet")  # never writes again; only referenced by a like in the window
    quiet_post = post(c, quiet, "an old post someone will like")

    store = Store(tmp_path / "hist.duckdb")
    window_start = datetime.now(UTC) - timedelta(minutes=5)
    start = head_seq(c)
    with DaemonThread(store, pds_network, cursor=start) as d:
        for u in old:
            post(c, u, "new, seen live")
        liker = make_account("liker")
        like = c.create_record(liker, LIKE, like_record(quiet_post))
        d.wait_for(commit_seq(c, liker.did, like.commit.rev, since=start))

        con = store  # reads (under the write lock)
        everyone = [u.did for u in old] + [quiet.did, liker.did]
        # Before the backfill the mirror holds only what was seen live: not equal.
        assert rows_of(con, "SELECT count(*) FROM records WHERE did = ?", [old[0].did])[0][0] == 1

        report = gaps_now(d, pds_network, window_start, enqueue=True)
        assert dids_with(report, "never_backfilled") == {u.did for u in old} | {liker.did}
        assert dids_with(report, "referenced") == {quiet.did}
        assert dids_with(report, "downtime") == set() and dids_with(report, "desynchronized") == set()
        assert report["enqueued"] == 5

        summary = d.call(run_backfill(store, dids=None, from_queue=True, config=bf_config(pds_network),
                                      sink=d.sink, progress=False))
        assert (summary.repos_ok, summary.failed) == (5, {})
        assert summary.records_added == 3 * 5 + 1  # 4 old posts + a profile each, and quiet's post
        assert_mirror_equals(con, c, everyone)
        assert {repo_row(con, did)["sync_state"] for did in everyone} == {"synchronized"}

        # Nothing is left to do for the window.
        again = gaps_now(d, pds_network, window_start)
        assert again["total"] == 0, again
    store.close()


def test_downtime_is_audited_per_did_and_backfill_repairs_writes_and_deletes(
    pds_network: LocalNetwork, pds_client: PdsClient, make_account: MakeAccount, tmp_path: Path
) -> None:
    c = pds_client
    store = Store(tmp_path / "down.duckdb")
    start = head_seq(c)
    with DaemonThread(store, pds_network, cursor=start) as d:
        users = [make_account(f"down{i}") for i in range(6)]
        posts = {u.did: [post(c, u, f"p{i}") for i in range(3)] for u in users}
        for u in users:
            last = profile(c, u, "before")
        d.wait_for(commit_seq(c, users[-1].did, last.commit.rev, since=start))
        # Reconcile everyone first, so only what happens next can make a DID need a backfill.
        summary = d.call(run_backfill(store, dids=[u.did for u in users], config=bf_config(pds_network),
                                      sink=d.sink, progress=False))
        assert summary.repos_ok == 6
    stopped_event_at = coverage(store)[-1][1]

    # Downtime: four accounts change, two do not.
    a0, a1, a2, a3, a4, a5 = users
    post(c, a0, "written while we were down")
    c.delete_record(a1, POST, posts[a1.did][0].rkey)
    profile(c, a2, "renamed while we were down")
    c.apply_writes(a3, [Create(POST, post_record("batch while down")), Delete(POST, posts[a3.did][2].rkey)])
    # The gap detector ignores gaps under 5 s (event time); make this outage longer than that.
    while datetime.now(UTC) - stopped_event_at < timedelta(seconds=6):
        time.sleep(0.2)

    # Restart "from the live head", as after an outage longer than the relay's replay window:
    # the cursor is the PDS's current head, so every event written while we were down is skipped.
    restart = head_seq(c)
    with DaemonThread(store, pds_network, cursor=restart) as d:
        alive = post(c, a4, "after the restart, seen live")  # a4 changes, but we saw it
        d.wait_for(commit_seq(c, a4.did, alive.commit.rev, since=restart))
        con = store  # reads (under the write lock)
        first_event_at = coverage(con)[0][0]
        assert len(coverage(con)) == 2

        report = gaps_now(d, pds_network, first_event_at, enqueue=True)
        assert len(report["downtime"]) == 1 and report["audited"] is True
        assert dids_with(report, "downtime") == {a0.did, a1.did, a2.did, a3.did}
        assert report["total"] == 4, report  # a4 and a5 hold their PDS head: not flagged

        summary = d.call(run_backfill(store, dids=None, from_queue=True, config=bf_config(pds_network),
                                      sink=d.sink, progress=False))
        assert (summary.repos_ok, summary.failed) == (4, {})
        assert (summary.records_added, summary.records_updated, summary.records_deleted) == (2, 1, 2)
        assert_mirror_equals(con, c, [u.did for u in users])
    store.close()


def test_broken_chain_is_reported_desynchronized_and_repaired(
    pds_network: LocalNetwork, pds_client: PdsClient, make_account: MakeAccount, tmp_path: Path
) -> None:
    c = pds_client
    store = Store(tmp_path / "chain.duckdb")
    start = head_seq(c)
    with DaemonThread(store, pds_network, cursor=start) as d:
        b, ok = make_account("broken"), make_account("intact")
        first = post(c, b, "one")
        last = post(c, ok, "fine")
        d.wait_for(commit_seq(c, ok.did, last.commit.rev, since=start))
    # Events dropped on purpose: b commits twice, then we resume past those seqs.
    post(c, b, "two (never delivered)")
    c.delete_record(b, POST, first.rkey)
    skip_to = head_seq(c)
    with DaemonThread(store, pds_network, cursor=skip_to) as d:
        three = post(c, b, "three")  # since = the dropped delete's rev != the rev we hold
        more = post(c, ok, "still fine")
        d.wait_for(commit_seq(c, ok.did, more.commit.rev, since=skip_to))
        con = store  # reads (under the write lock)
        row = repo_row(con, b.did)
        assert (row["sync_state"], row["desync_reason"], row["rev"]) == (
            "desynchronized", "since_mismatch", three.commit.rev)
        assert repo_row(con, ok.did)["sync_state"] == "unknown"  # live, never broken, never backfilled

        report = gaps_now(d, pds_network, coverage(con)[0][0], enqueue=True)
        assert dids_with(report, "desynchronized") == {b.did}
        summary = d.call(run_backfill(store, dids=None, from_queue=True, config=bf_config(pds_network),
                                      sink=d.sink, progress=False))
        assert summary.failed == {}
        assert_mirror_equals(con, c, [b.did, ok.did])
        assert repo_row(con, b.did)["sync_state"] == "synchronized"
    store.close()


def test_account_lifecycle_statuses_handles_and_terminal_backfills(
    pds_network: LocalNetwork, pds_client: PdsClient, make_account: MakeAccount, tmp_path: Path
) -> None:
    c = pds_client
    store = Store(tmp_path / "acct.duckdb")
    start = head_seq(c)
    with DaemonThread(store, pds_network, cursor=start) as d:
        deact, react, taken, gone, renamed = (make_account(n) for n in ("deact", "react", "taken", "gone", "renamed"))
        for u in (deact, react, taken, gone, renamed):
            for i in range(3):
                post(c, u, f"{u.handle} {i}")
        before = {u.did: fetch_truth(c, u.did) for u in (deact, taken)}
        c.deactivate(deact)
        c.deactivate(react)
        c.activate(react)
        post(c, react, "back again")
        c.takedown(taken.did)
        c.delete_account(gone.did)
        new_handle = "re-" + renamed.handle
        renamed = c.update_handle(renamed, new_handle)
        last = post(c, renamed, "same account, new name")
        d.wait_for(commit_seq(c, renamed.did, last.commit.rev, since=start))

        con = store  # reads (under the write lock)
        state = {u.did: repo_row(con, u.did) for u in (deact, react, taken, gone, renamed)}
        assert (state[deact.did]["active"], state[deact.did]["status"]) == (False, "deactivated")
        assert (state[react.did]["active"], state[react.did]["status"]) == (True, "active")
        assert (state[taken.did]["active"], state[taken.did]["status"]) == (False, "takendown")
        assert (state[gone.did]["active"], state[gone.did]["status"]) == (False, "deleted")
        assert state[renamed.did]["handle"] == new_handle
        everyone = [u.did for u in (deact, react, taken, gone, renamed)]
        # deactivated / taken down: no repo served, the mirror keeps what they had; deleted: nothing
        assert_mirror_equals(con, c, everyone, truths=before)

        # Backfilling the unavailable repos records the PDS's answer as terminal.
        summary = d.call(run_backfill(store, dids=[deact.did, taken.did, gone.did],
                                      config=bf_config(pds_network), sink=d.sink, progress=False))
        assert summary.failed == {"RepoDeactivated": 1, "RepoTakendown": 1, "RepoNotFound": 1}
        for did, outcome in ((deact.did, "RepoDeactivated"), (taken.did, "RepoTakendown"), (gone.did, "RepoNotFound")):
            row = repo_row(con, did)
            assert (row["backfill_status"], row["backfill_retry_after"]) == (outcome, None)
        # ... and not retried forever: not flagged again, not handed out by the queue, not in "all".
        report = gaps_now(d, pds_network, coverage(con)[0][0], enqueue=True)
        assert not {deact.did, taken.did, gone.did} & set(report["dids"])
        store.enqueue({deact.did: ["explicit"]})
        first = d.call(run_backfill(store, dids=None, from_queue=True, config=bf_config(pds_network),
                                    sink=d.sink, progress=False))
        assert first.failed.get("RepoDeactivated") == 1
        second = d.call(run_backfill(store, dids=None, from_queue=True, config=bf_config(pds_network),
                                     sink=d.sink, progress=False))
        assert second.repos_ok + second.repos_failed == 0
        assert deact.did not in all_dids(store)
        assert_mirror_equals(con, c, everyone, truths=before)
    store.close()


def _spawn(db: Path, net: LocalNetwork, *extra: str) -> subprocess.Popen[bytes]:
    return spawn_consume(db, net.pds_url, "--flush-interval", "0.05", "--batch-events", "50", *extra,
                         stderr=subprocess.DEVNULL)


def test_kill_9_while_writes_stream_in_then_restart_reaches_equality(
    pds_network: LocalNetwork, pds_client: PdsClient, make_account: MakeAccount, tmp_path: Path
) -> None:
    c = pds_client
    db = tmp_path / "crash.duckdb"
    start = head_seq(c)
    proc = _spawn(db, pds_network, "--cursor", str(start))
    try:
        info = announced(db, proc)
        users = [make_account(f"crash{i}") for i in range(6)]
        last: list[RecordRef] = []
        done = threading.Event()

        def writer() -> None:
            with pds_network.client() as wc:  # its own connection: httpx clients are not shared
                try:
                    for round_ in range(40):
                        for u in users:
                            ref = wc.create_record(u, POST, post_record(f"{u.handle} r{round_}"))
                            if round_ % 3 == 2:
                                wc.delete_record(u, POST, ref.rkey)
                            last.append(ref)
                finally:
                    done.set()

        thread = threading.Thread(target=writer)
        thread.start()
        poll(lambda: done.is_set() or stored_cursor(info) >= start + 100, timeout=60, what="100 events stored")
        assert not done.is_set(), "writes ended before the kill"
        proc.kill()  # SIGKILL mid-stream: no flush, no goodbye
        proc.wait(10)
        assert not done.is_set(), "the kill must land while writes stream in"
        written = len(last)  # let writes land while the daemon is down
        poll(lambda: done.is_set() or len(last) > written, timeout=30, what="a write while the daemon is down")
        proc = _spawn(db, pds_network)  # resumes from the stored cursor; the stale announcement is ignored
        info = announced(db, proc)
        thread.join(120)
        tail = last[-1]
        target = commit_seq(c, tail.uri.split("/")[2], tail.commit.rev, since=start)
        poll(lambda: stored_cursor(info) >= target, timeout=60, what="the last write stored")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        reap(proc)
    con = duckdb.connect(str(db), read_only=True)
    try:
        assert_mirror_equals(con, c, [u.did for u in users])
        assert [e for _, _, e in coverage(con)] == ["crashed", "clean"]
    finally:
        con.close()


def test_lambda_handler_modes_reach_equality(
    pds_network: LocalNetwork, pds_client: PdsClient, make_account: MakeAccount, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = pds_client
    db = tmp_path / "lambda.duckdb"
    old = [make_account(f"lold{i}") for i in range(2)]
    for u in old:
        for i in range(4):
            post(c, u, f"history {i}")
    store = Store(db)
    start = head_seq(c)
    with DaemonThread(store, pds_network, cursor=start) as d:
        new = [make_account(f"lnew{i}") for i in range(2)]
        for u in old + new:
            post(c, u, "seen live")
        tail = post(c, new[-1], "the end")
        d.wait_for(commit_seq(c, new[-1].did, tail.commit.rev, since=start))
    store.close()  # the handler opens the file itself

    monkeypatch.setenv("SKYFILL_DB", str(db))
    monkeypatch.setenv("SKYFILL_PLC_URL", pds_network.plc_url)
    monkeypatch.setenv("SKYFILL_ALLOW_PRIVATE_HOSTS", "1")
    today = datetime.now(UTC).date().isoformat()
    found = lambda_handler({"mode": "determine_dids_to_backfill", "start_date": today, "end_date": today}, None)
    assert found["status"] == "success", found
    assert found["counts"]["never_backfilled"] == 4 and found["enqueued"] == 4
    done = lambda_handler({"mode": "backfill", "dids": "all"}, None)
    assert done["status"] == "success", done
    assert (done["repos_ok"], done["repos_failed"]) == (4, 0)
    con = duckdb.connect(str(db), read_only=True)
    try:
        assert_mirror_equals(con, c, [u.did for u in old + new])
    finally:
        con.close()



def test_the_oracle_itself_reports_missing_extra_stale_and_rev(
    pds_client: PdsClient, make_account: MakeAccount, tmp_path: Path
) -> None:
    c = pds_client
    u = make_account("oracle")
    a, b, d = (post(c, u, t) for t in ("a", "b", "d"))
    truth = fetch_truth(c, u.did)
    assert truth.rev == d.commit.rev and dict(truth.records) == {(POST, r.rkey): r.cid for r in (a, b, d)}
    con = duckdb.connect(str(tmp_path / "o.duckdb"))
    con.execute("CREATE TABLE records (did VARCHAR, collection VARCHAR, rkey VARCHAR, cid VARCHAR)")
    con.execute("CREATE TABLE repos (did VARCHAR, rev VARCHAR, status VARCHAR, active BOOLEAN, sync_state VARCHAR)")
    con.execute("INSERT INTO repos VALUES (?, ?, 'active', true, 'unknown')", [u.did, b.commit.rev])
    for rkey, cid in ((a.rkey, a.cid), (b.rkey, a.cid), ("3zzzzzzzzzzzz", d.cid)):  # b stale, d missing, one extra
        con.execute("INSERT INTO records VALUES (?, ?, ?, ?)", [u.did, POST, rkey, cid])
    con.execute("INSERT INTO records VALUES ('did:plc:someoneelse', ?, 'x', ?)", [POST, a.cid])
    diff = mirror_diff(con, c, [u.did])
    assert [line.split()[1] for line in diff] == ["rev", "missing", "extra", "stale", "extra"], diff
    assert f"{POST}/{d.rkey}" in diff[1] and "did:plc:someoneelse" in diff[4]
    con.close()
