"""Backfills while `skyfill consume` holds the database: through the admin API, and by itself.

Real parts: the daemon is a subprocess on a real DuckDB file, a local relay streams signed
commits, a local HTTP server plays PLC and PDS (DID documents + repo CARs from the generator).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import orjson

from skyfill.protocol.repo import parse_repo
from tests.support.generate.firehose import World
from skyfill.app.daemon_client import call_daemon

from .support.faultserver import FaultServer
from .support.relay import LocalRelay

from .support.daemon import ROOT, announced, spawn_consume, stored_cursor
from .support.served import GET_REPO, break_chain
from .support.served import serve_firehose_world as _serve_world
from .support.wait import poll


def _spawn(db: Path, relay: LocalRelay, srv: FaultServer, *extra: str) -> subprocess.Popen[bytes]:
    return spawn_consume(db, relay.url, "--cursor", "0", "--flush-interval", "0.05", "--plc-url", srv.url,
                         "--allow-private-hosts", *extra)


def _records(db: Path, did: str) -> dict[tuple[str, str], str]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {(c, k): cid for c, k, cid in con.execute(
            "SELECT collection, rkey, cid FROM records WHERE did = ?", [did]).fetchall()}
    finally:
        con.close()


def test_backfill_cli_goes_through_the_running_daemon(tmp_path: Path) -> None:
    world = World(21, n_dids=4, initial_records=(15, 15))
    frames = list(world.frames(200))
    db = tmp_path / "d.duckdb"
    with FaultServer() as srv, LocalRelay(frames) as relay:
        _serve_world(srv, world)
        proc = _spawn(db, relay, srv)
        try:
            info = announced(db, proc)
            poll(lambda: stored_cursor(info) == relay.head, what="the stored cursor at the head", interval=0.1)
            out = subprocess.run(
                [sys.executable, "-m", "skyfill", "backfill", "--db", str(db), "--dids", ",".join(world.dids),
                 "--plc-url", srv.url, "--allow-private-hosts", "--json"],
                cwd=ROOT, capture_output=True, check=True,
            )
            summary = orjson.loads(out.stdout)
            assert summary["repos_ok"] == 4 and summary["repos_failed"] == 0, summary
            # the initial repo records the firehose never showed were added by the backfill
            assert summary["records"]["added"] > 0
            status = call_daemon(info, "/status")
            assert status["repos"]["by_sync_state"] == {"synchronized": 4}
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
    for did in world.dids:
        assert _records(db, did) == dict(parse_repo(world.repo_car(did), did=did, key=None).records)


def test_consume_backfill_repairs_a_broken_chain_by_itself(tmp_path: Path) -> None:
    world = World(22, n_dids=3, initial_records=(10, 10))
    victim = world.dids[0]
    relayed = break_chain(list(world.frames(150)), victim)
    db = tmp_path / "b.duckdb"
    with FaultServer() as srv, LocalRelay(relayed) as relay:
        _serve_world(srv, world)
        proc = _spawn(db, relay, srv, "--backfill")
        try:
            info = announced(db, proc)

            def repaired() -> bool:
                report = call_daemon(info, "/status")
                return (stored_cursor(info) == relay.head
                        and report["repos"]["by_sync_state"].get("desynchronized", 0) == 0
                        and report["repos"]["by_backfill_status"].get("ok", 0) >= 1)

            poll(repaired, timeout=90, what="the desynchronized repo repaired", interval=0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
    assert _repo_state(db, victim) == ("synchronized", "ok")
    assert _records(db, victim) == dict(parse_repo(world.repo_car(victim), did=victim, key=None).records)


def test_consume_backfill_uses_the_backfill_options_given(tmp_path: Path) -> None:
    """`consume --backfill --max-car-bytes 1024`: the daemon's own repair loop runs with the user's
    backfill options, not only --plc-url (before: its defaults, under which this repo fits)."""
    world = World(22, n_dids=3, initial_records=(10, 10))
    victim = world.dids[0]
    relayed = break_chain(list(world.frames(150)), victim)
    assert len(world.repo_car(victim)) > 1024
    db = tmp_path / "o.duckdb"
    with FaultServer() as srv, LocalRelay(relayed) as relay:
        _serve_world(srv, world)
        proc = _spawn(db, relay, srv, "--backfill", "--max-car-bytes", "1024")
        try:
            info = announced(db, proc)
            poll(lambda: call_daemon(info, "/status")["repos"]["by_backfill_status"].get("Failed", 0) >= 1,
                 timeout=90, what="the oversized repo marked Failed", interval=0.1)
            assert srv.count(GET_REPO) >= 1
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
    assert _repo_state(db, victim) == ("desynchronized", "Failed")


def _repo_state(db: Path, did: str) -> tuple[str, str] | None:
    """(sync_state, backfill_status) of `did`'s repos row."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("SELECT sync_state, backfill_status FROM repos WHERE did = ?", [did]).fetchone()
    finally:
        con.close()
