"""A backfill inside the running daemon while the firehose keeps writing the same repo.

Real parts only: a local relay (WebSocket) streams signed commits, a local HTTP server plays
PLC and PDS and serves the repo CAR slowly, the daemon writes a real DuckDB file. The truth is
the generator's own repo after the last commit.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import httpx
import orjson

from skyfill.protocol.repo import parse_repo
from skyfill.app.api import backfill_from_request
from skyfill.backfill.config import BackfillConfig
from tests.support.generate.firehose import World
from tests.support.generate.identity import did_document
from skyfill.consumer.daemon import ConsumeConfig, Daemon
from skyfill.consumer.resync import DaemonReconciler
from skyfill.storage import Store
from tests.support.network import Create, LocalNetwork, PdsAccount, PdsClient, RecordRef, post_record
from tests.support.oracle import assert_mirror_equals, commit_seq, fetch_truth, head_seq

from .support.faultserver import FaultServer, Reply, json_reply
from .support.relay import LocalRelay
from .support.daemon import ROOT, announced, reap, spawn_consume, stored_cursor
from .support.wait import apoll, poll

GET_REPO = "/xrpc/com.atproto.sync.getRepo"
POST = "app.bsky.feed.post"


def truth(world: World, did: str) -> tuple[dict[tuple[str, str], str], str]:
    snap = parse_repo(world.repo_car(did), did=did, key=None)
    assert snap.rev is not None
    return dict(snap.records), snap.rev


async def test_firehose_commits_racing_the_fetch_are_kept(tmp_path: Path) -> None:
    world = World(11, n_dids=3, initial_records=(30, 30))
    dids = world.dids
    before = list(world.frames(150))
    # The repo as the PDS serves it at fetch time (older than what the firehose will deliver).
    served = {did: world.repo_car(did) for did in dids}
    during = list(world.frames(150))  # commits that land while the fetch is in flight

    with FaultServer() as srv, LocalRelay(before) as relay:
        for ident in world.identities:
            srv.script(f"/{ident.did}", json_reply(did_document(ident, srv.url)))
        srv.script(GET_REPO, lambda seen: Reply(200, served[seen.query["did"]], delay=1.5))

        store = Store(tmp_path / "race.duckdb")
        daemon = Daemon(store, ConsumeConfig(relay=relay.url, cursor=0, flush_interval=0.05))
        task = asyncio.create_task(daemon.run(install_signal_handlers=False))
        await apoll(lambda: daemon.committed_seq == relay.head, timeout=30)

        backfill = asyncio.create_task(
            backfill_from_request(store, {"dids": dids}, sink=DaemonReconciler(daemon),
                                  config=BackfillConfig(plc_url=srv.url, allow_private_hosts=True))
        )
        await apoll(lambda: srv.count(GET_REPO) == len(dids), timeout=30)  # every fetch is in flight
        relay.append(during)
        await apoll(lambda: daemon.last_seq == relay.head, timeout=30)
        summary = await backfill
        await apoll(lambda: daemon.committed_seq == relay.head, timeout=30)
        daemon.stop()
        await task

        assert summary["repos_ok"] == len(dids), summary
        for did in dids:
            records, rev = truth(world, did)
            stored = {(c, k): cid for c, k, cid in store.fetchall(
                "SELECT collection, rkey, cid FROM records WHERE did = ?", [did])}
            assert stored == records, did
            row = store.fetchall("SELECT rev, sync_state FROM repos WHERE did = ?", [did])[0]
            assert row == (rev, "synchronized"), did
            assert daemon.tracker.row(did).rev == rev
        store.close()


async def test_backfill_then_restart_keeps_the_reconciled_state(tmp_path: Path) -> None:
    """The reconcile and the replayed commits are one transaction with durable effects: a new
    daemon started on the same file sees exactly the repo, and new commits chain onto it."""
    world = World(12, n_dids=2, initial_records=(10, 10))
    dids = world.dids
    first = list(world.frames(40))
    served = {did: world.repo_car(did) for did in dids}
    later = list(world.frames(40))
    db = tmp_path / "r.duckdb"
    with FaultServer() as srv, LocalRelay(first) as relay:
        for ident in world.identities:
            srv.script(f"/{ident.did}", json_reply(did_document(ident, srv.url)))
        srv.script(GET_REPO, lambda seen: Reply(200, served[seen.query["did"]]))
        store = Store(db)
        daemon = Daemon(store, ConsumeConfig(relay=relay.url, cursor=0, flush_interval=0.05))
        task = asyncio.create_task(daemon.run(install_signal_handlers=False))
        await apoll(lambda: daemon.committed_seq == relay.head, timeout=30)
        await backfill_from_request(store, {"dids": dids}, sink=DaemonReconciler(daemon),
                                    config=BackfillConfig(plc_url=srv.url, allow_private_hosts=True))
        daemon.stop()
        await task
        store.close()

        relay.append(later)
        store = Store(db)
        daemon = Daemon(store, ConsumeConfig(relay=relay.url, flush_interval=0.05))
        task = asyncio.create_task(daemon.run(install_signal_handlers=False))
        await apoll(lambda: daemon.committed_seq == relay.head, timeout=30)
        daemon.stop()
        await task
        for did in dids:
            records, rev = truth(world, did)
            stored = {(c, k): cid for c, k, cid in store.fetchall(
                "SELECT collection, rkey, cid FROM records WHERE did = ?", [did])}
            assert stored == records
            # the chain after the backfill is intact: still synchronized
            assert store.fetchall("SELECT rev, sync_state FROM repos WHERE did = ?", [did])[0] == (rev, "synchronized")
        store.close()


async def test_two_backfills_of_one_did_at_once_end_like_one_after_the_other(tmp_path: Path) -> None:
    """Issue 9 item 1, made deterministic: the second getRepo answers slowly (a slow PDS, a real
    fault) and the DID commits while it is in flight. Run one after the other, the second attempt
    captures those commits and replays them; run at once, it must not roll them back."""
    world = World(13, n_dids=1, initial_records=(20, 20))
    (did,) = world.dids
    before = list(world.frames(30))
    served = world.repo_car(did)  # the repo as of `before`: what both fetches are served
    during = list(world.frames(30))  # the DID keeps committing while the second fetch is in flight
    fetches = 0

    def get_repo(seen: Any) -> Reply:
        nonlocal fetches
        fetches += 1
        return Reply(200, served, delay=0.0 if fetches == 1 else 1.5)

    with FaultServer() as srv, LocalRelay(before) as relay:
        for ident in world.identities:
            srv.script(f"/{ident.did}", json_reply(did_document(ident, srv.url)))
        srv.script(GET_REPO, get_repo)
        store = Store(tmp_path / "twice.duckdb")
        daemon = Daemon(store, ConsumeConfig(relay=relay.url, cursor=0, flush_interval=0.05))
        task = asyncio.create_task(daemon.run(install_signal_handlers=False))
        await apoll(lambda: daemon.committed_seq == relay.head, timeout=30)

        def one() -> Any:  # what each `skyfill backfill --dids X` asks the daemon's admin API for
            return asyncio.create_task(backfill_from_request(
                store, {"dids": [did]}, sink=DaemonReconciler(daemon),
                config=BackfillConfig(plc_url=srv.url, allow_private_hosts=True)))

        first, second = one(), one()
        await apoll(lambda: srv.count(GET_REPO) == 2, timeout=30)  # the second fetch is in flight
        relay.append(during)
        await apoll(lambda: daemon.committed_seq == relay.head, timeout=30)
        summaries = await asyncio.gather(first, second)
        await apoll(lambda: daemon.committed_seq == relay.head, timeout=30)
        daemon.stop()
        await task

        assert [s["repos_ok"] for s in summaries] == [1, 1], summaries
        records, rev = truth(world, did)
        stored = {(c, k): cid for c, k, cid in store.fetchall(
            "SELECT collection, rkey, cid FROM records WHERE did = ?", [did])}
        assert stored == records
        assert store.fetchall("SELECT rev, sync_state, backfill_status FROM repos WHERE did = ?", [did]) == [
            (rev, "synchronized", "ok")]
        assert len(daemon.captures) == 0  # no capture or turn left behind
        store.close()


# -- two backfills of one DID at once, through the running daemon, against the real PDS -----------


def _spawn_daemon(db: Path, net: LocalNetwork, cursor: int, plc_url: str) -> subprocess.Popen[bytes]:
    with open(db.with_suffix(".log"), "ab") as log:  # a file, not a pipe nobody drains
        return spawn_consume(db, net.pds_url, "--cursor", str(cursor), "--flush-interval", "0.05",
                             "--plc-url", plc_url, "--allow-private-hosts", stderr=log)


def _until(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    poll(predicate, timeout=timeout, what=what, interval=0.02)


class SlowPdsLink:
    """The real PDS behind a slow link: getRepo is answered with what the PDS serves when the
    request arrives, and every second answer is held back `hold` seconds (a slow network, a
    real fault). DID documents come from the real PLC with the PDS endpoint pointed here."""

    def __init__(self, srv: FaultServer, net: LocalNetwork, dids: list[str], *, hold: float) -> None:
        self.net = net
        self.hold = hold
        self.snapshots = 0  # getRepo answers taken from the PDS so far
        self._lock = threading.Lock()
        for did in dids:
            doc = httpx.get(f"{net.plc_url}/{did}", timeout=10).json()
            for service in doc["service"]:
                service["serviceEndpoint"] = srv.url
            srv.script(f"/{did}", json_reply(doc))
        srv.script(GET_REPO, self._get_repo)

    def _get_repo(self, seen: Any) -> Reply:
        car = httpx.get(f"{self.net.pds_url}{GET_REPO}", params={"did": seen.query["did"]}, timeout=30).content
        with self._lock:
            self.snapshots += 1
            n = self.snapshots
        return Reply(200, car, headers={"Content-Type": "application/vnd.ipld.car"},
                     delay=self.hold if n % 2 == 0 else 0.0)


def test_two_backfills_of_one_did_at_once_under_writes_equal_the_pds(
    pds_network: LocalNetwork, pds_client: PdsClient, make_account: Callable[..., PdsAccount], tmp_path: Path
) -> None:
    """Issue 9 item 1 end to end: two `skyfill backfill --dids X` started together through the
    running daemon while X writes on the real PDS must end like running them one after the
    other: the mirror equals getRepo. X writes while the second getRepo answer is on its way
    (after the PDS served it), which is when concurrent attempts lost those writes."""
    c = pds_client
    db = tmp_path / "twice.duckdb"
    x = make_account("twice")
    # History the firehose never shows the daemon, so every backfill has real work to do.
    c.apply_writes(x, [Create(POST, post_record(f"history {i}")) for i in range(100)])
    start = head_seq(c)
    with FaultServer() as srv:
        link = SlowPdsLink(srv, pds_network, [x.did], hold=3.0)
        proc = _spawn_daemon(db, pds_network, start, srv.url)
        try:
            info = announced(db, proc, log=db.with_suffix(".log"))
            backfill = [sys.executable, "-m", "skyfill", "backfill", "--db", str(db), "--dids", x.did,
                        "--plc-url", srv.url, "--allow-private-hosts", "--json"]
            live: list[RecordRef] = []
            for round_ in range(1, 4):
                pair = [subprocess.Popen(backfill, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                        for _ in range(2)]
                # The second snapshot is taken and held back: X writes now, and the daemon stores it.
                _until(lambda: link.snapshots == 2 * round_, "both getRepo snapshots")  # noqa: B023
                live.append(c.create_record(x, POST, post_record(f"written during round {round_}")))
                if len(live) > 1:
                    c.delete_record(x, POST, live[-2].rkey)
                tail = c.create_record(x, POST, post_record(f"round {round_} done"))
                seq = commit_seq(c, x.did, tail.commit.rev, since=start)
                _until(lambda: stored_cursor(info) >= seq, "the daemon to store the writes")  # noqa: B023
                for p in pair:
                    out, err = p.communicate(timeout=120)
                    assert p.returncode == 0, err.decode()
                    assert orjson.loads(out)["repos_ok"] == 1
            last = c.create_record(x, POST, post_record("the end"))
            target = commit_seq(c, x.did, last.commit.rev, since=start)
            _until(lambda: stored_cursor(info) >= target, "the daemon to catch up")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        finally:
            reap(proc)
    con = duckdb.connect(str(db), read_only=True)
    try:
        assert_mirror_equals(con, c, [x.did])
        row = con.execute("SELECT rev, sync_state, backfill_status FROM repos WHERE did = ?", [x.did]).fetchall()
        assert row == [(fetch_truth(c, x.did).rev, "synchronized", "ok")]
    finally:
        con.close()
