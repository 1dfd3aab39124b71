"""A backfill inside the running daemon while the firehose keeps writing the same repo.

Real parts only: a local relay (WebSocket) streams signed commits, a local HTTP server plays
PLC and PDS and serves the repo CAR slowly, the daemon writes a real DuckDB file. The truth is
the generator's own repo after the last commit.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from backfill.repo import parse_repo
from backfill.api import backfill_from_request
from bench.generate.firehose import World
from bench.generate.identity import did_document
from consumer.daemon import ConsumeConfig, Daemon
from consumer.resync import DaemonSink
from storage import Store

from .faultserver import FaultServer, Reply, json_reply
from .relay import LocalRelay

GET_REPO = "/xrpc/com.atproto.sync.getRepo"


def truth(world: World, did: str) -> tuple[dict[tuple[str, str], str], str]:
    snap = parse_repo(world.repo_car(did), did=did, key=None)
    assert snap.rev is not None
    return dict(snap.records), snap.rev


async def wait_for(predicate, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


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
        await wait_for(lambda: daemon.committed_seq == relay.head)

        backfill = asyncio.create_task(
            backfill_from_request(store, {"dids": dids}, sink=DaemonSink(daemon), plc_url=srv.url,
                                  allow_private_hosts=True)
        )
        await wait_for(lambda: srv.count(GET_REPO) == len(dids))  # every fetch is in flight
        relay.append(during)
        await wait_for(lambda: daemon.last_seq == relay.head)
        summary = await backfill
        await wait_for(lambda: daemon.committed_seq == relay.head)
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
        await wait_for(lambda: daemon.committed_seq == relay.head)
        await backfill_from_request(store, {"dids": dids}, sink=DaemonSink(daemon), plc_url=srv.url,
                                    allow_private_hosts=True)
        daemon.stop()
        await task
        store.close()

        relay.append(later)
        store = Store(db)
        daemon = Daemon(store, ConsumeConfig(relay=relay.url, flush_interval=0.05))
        task = asyncio.create_task(daemon.run(install_signal_handlers=False))
        await wait_for(lambda: daemon.committed_seq == relay.head)
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
