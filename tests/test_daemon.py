"""The consumer daemon end to end: a real local relay (WebSocket) -> `skyfill consume` -> a real DuckDB file.

Frames come from tests.support.generate.World: signed commits with intact chains. The expected mirror is
computed independently of skyfill by folding each frame's ops in seq order.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import libipld
import orjson
import pytest

from skyfill.consumer.daemon import ConsumeConfig, Daemon
from skyfill.errors import FutureCursorError
from skyfill.storage import Store

from .support.relay import LocalRelay, error_frame, info_frame
from .support.daemon import ROOT, announced, spawn_consume, stored_cursor
from .support.daemon import metrics as daemon_metrics
from .support.mirror import consume_until, expected_mirror, frame_seqs, mirror_of, world_frames
from .support.wait import apoll, free_port, poll

async def test_mirror_equals_the_fold_of_all_frames(tmp_path: Path) -> None:
    frames = world_frames(1, 40, 3000)
    with LocalRelay(frames) as relay:
        # Start with cursor 0 = the whole retained window, like a first run against a relay.
        await consume_until(tmp_path / "m.duckdb", relay, relay.head, cursor=0)
    assert mirror_of(tmp_path / "m.duckdb") == expected_mirror(frames)
    con = duckdb.connect(str(tmp_path / "m.duckdb"), read_only=True)
    (seq,) = con.execute("SELECT seq FROM cursors").fetchone()
    spans = con.execute("SELECT first_seq, last_seq, ended FROM coverage").fetchall()
    sample = con.execute("SELECT record FROM records WHERE collection = 'app.bsky.feed.like' LIMIT 1").fetchone()
    con.close()
    assert seq == relay.head
    assert spans == [(min(frame_seqs(frames)), relay.head, "clean")]
    like = orjson.loads(sample[0])
    assert like["$type"] == "app.bsky.feed.like" and like["subject"]["uri"].startswith("at://")


async def test_restart_resumes_from_stored_cursor_and_applies_nothing_twice(tmp_path: Path) -> None:
    frames = world_frames(2, 20, 1200)
    db = tmp_path / "r.duckdb"
    with LocalRelay(frames[:700]) as relay:
        await consume_until(db, relay, relay.head, cursor=0)
        relay.append(frames[700:])
        await consume_until(db, relay, relay.head)
        # The second run asked for exactly what came after the first run's stored cursor.
        assert relay.connections[-1].endswith(f"cursor={frame_seqs(frames[:700])[-1]}")
    assert mirror_of(db) == expected_mirror(frames)


async def test_bad_frames_are_counted_and_skipped(tmp_path: Path) -> None:
    frames = world_frames(3, 10, 300)
    junk = [b"\xa1not cbor at all", libipld.encode_dag_cbor({"op": 1, "t": "#commit"}), info_frame("OutdatedCursor", "old")]
    mixed = frames[:100] + junk + frames[100:]
    with LocalRelay(mixed) as relay:
        daemon = await consume_until(tmp_path / "b.duckdb", relay, relay.head, cursor=0)
    assert mirror_of(tmp_path / "b.duckdb") == expected_mirror(frames)
    errors = {k: v for k, v in daemon.counts.items() if k.startswith("error:")}
    assert sum(errors.values()) == 2, errors


async def test_future_cursor_restarts_from_live_head(tmp_path: Path) -> None:
    frames = world_frames(4, 10, 200)
    db = tmp_path / "f.duckdb"
    with LocalRelay(frames[:100]) as relay:
        await consume_until(db, relay, relay.head, cursor=0)
        port = relay.port
    # The relay comes back with its history gone and seqs far lower than our stored cursor
    # (a relay reset): it answers FutureCursor.
    renumbered = [_with_seq(f, i + 1) for i, f in enumerate(frames[100:])]
    with LocalRelay(port=port) as relay:
        store = Store(db)
        daemon = Daemon(store, ConsumeConfig(relay=relay.url, flush_interval=0.05))
        task = asyncio.create_task(daemon.run(install_signal_handlers=False))
        await apoll(lambda: any("cursor" not in c for c in relay.connections), what="a connection without a cursor")
        relay.append(renumbered)
        await apoll(lambda: daemon.committed_seq == len(renumbered), what="the renumbered frames committed")
        daemon.stop()
        await task
        store.close()
    assert relay.connections[0].endswith(f"cursor={frame_seqs(frames[:100])[-1]}")
    assert mirror_of(db) == expected_mirror(frames)
    con = duckdb.connect(str(db), read_only=True)
    spans = con.execute("SELECT ended FROM coverage ORDER BY id").fetchall()
    con.close()
    assert [s for (s,) in spans] == ["clean", "error", "clean"]


async def test_strict_cursor_refuses_to_skip_ahead(tmp_path: Path) -> None:
    frames = world_frames(5, 5, 50)
    db = tmp_path / "s.duckdb"
    with LocalRelay(frames) as relay:
        await consume_until(db, relay, relay.head, cursor=0)
        port = relay.port
    with LocalRelay(port=port) as relay:
        store = Store(db)
        daemon = Daemon(store, ConsumeConfig(relay=relay.url, strict_cursor=True))
        with pytest.raises(FutureCursorError):
            await asyncio.wait_for(daemon.run(install_signal_handlers=False), 10)
        store.close()


async def test_consumer_too_slow_reconnects_from_last_processed_event(tmp_path: Path) -> None:
    frames = world_frames(6, 10, 400)
    with LocalRelay(frames[:200]) as relay:
        store = Store(tmp_path / "t.duckdb")
        daemon = Daemon(store, ConsumeConfig(relay=relay.url, cursor=0, flush_interval=0.05))
        task = asyncio.create_task(daemon.run(install_signal_handlers=False))
        await apoll(lambda: daemon.last_seq == relay.head, what="the first half read")
        await asyncio.to_thread(relay.send_to_all, error_frame("ConsumerTooSlow", "too slow"), close=True)
        relay.append(frames[200:])
        await apoll(lambda: daemon.committed_seq == relay.head, what="every frame committed")
        daemon.stop()
        await task
        store.close()
        assert len(relay.connections) == 2
        assert relay.connections[1].endswith(f"cursor={frame_seqs(frames[:200])[-1]}")
    assert mirror_of(tmp_path / "t.duckdb") == expected_mirror(frames)


def _garbled(frame: bytes, seq: int) -> bytes:
    """A #commit frame with a readable seq whose `rev` is not a TID: bad input the parser names."""
    header, body = libipld.decode_dag_cbor_multi(frame)
    body["seq"] = seq
    body["rev"] = "not a tid"
    return libipld.encode_dag_cbor(header) + libipld.encode_dag_cbor(body)


def _stored(db: Path) -> tuple[int, list[tuple[int, int, str]]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        (seq,) = con.execute("SELECT seq FROM cursors").fetchone()
        spans = con.execute("SELECT first_seq, last_seq, ended FROM coverage ORDER BY id").fetchall()
    finally:
        con.close()
    return seq, spans


async def test_a_bad_frame_with_a_lower_seq_never_moves_the_cursor_back(tmp_path: Path) -> None:
    """Issue 9 item 6: a malformed frame claiming seq 3 after seq N was obeyed: cursor and
    coverage were stored as 3, and a restart replayed everything after 3."""
    frames = world_frames(10, 10, 300)
    seqs = frame_seqs(frames)
    db = tmp_path / "back.duckdb"
    with LocalRelay(frames + [_garbled(frames[0], 3)]) as relay:
        store = Store(db)
        daemon = Daemon(store, ConsumeConfig(relay=relay.url, cursor=0, flush_interval=0.05))
        task = asyncio.create_task(daemon.run(install_signal_handlers=False))
        # the garbled frame, the last one sent, was read
        await apoll(lambda: task.done() or daemon.counts.get("error:bad_tid", 0) >= 1, what="the garbled frame")
        assert daemon.counts.get("error:bad_tid", 0) >= 1, "the daemon stopped before the garbled frame"
        daemon.stop()
        await asyncio.wait_for(task, 10)
        store.close()
    assert _stored(db) == (seqs[-1], [(seqs[0], seqs[-1], "clean")])
    assert mirror_of(db) == expected_mirror(frames)


async def test_a_seq_beyond_bigint_is_a_bad_frame_and_later_batches_are_written(tmp_path: Path) -> None:
    """Issue 9 item 6: a frame with seq >= 2**63 made its batch's write fail, and no batch was
    committed after it. It is bad input: counted, skipped, and the stream goes on."""
    frames = world_frames(11, 10, 600)
    seqs = frame_seqs(frames)
    db = tmp_path / "huge.duckdb"
    relayed = frames[:200] + [_with_seq(frames[200], 2**63), _with_seq(frames[201], 2**64 - 1)] + frames[200:]
    with LocalRelay(relayed) as relay:
        daemon = await consume_until(db, relay, seqs[-1], cursor=0, batch_events=50)
    assert sum(v for k, v in daemon.counts.items() if k.startswith("error:")) == 2, daemon.counts
    assert mirror_of(db) == expected_mirror(frames)
    assert _stored(db) == (seqs[-1], [(seqs[0], seqs[-1], "clean")])


# -- the real process: signals, kill -9, the admin API ---------------------------------------


def _spawn(db: Path, relay: LocalRelay, *extra: str) -> subprocess.Popen[bytes]:
    return spawn_consume(db, relay.url, "--flush-interval", "0.05", "--batch-events", "200", *extra)


def test_sigterm_flushes_stores_cursor_and_exits_zero(tmp_path: Path) -> None:
    frames = world_frames(7, 20, 2000)
    junk = [b"\xa1not cbor"]
    db = tmp_path / "sig.duckdb"
    port = free_port()
    with LocalRelay(frames[:1000] + junk + frames[1000:]) as relay:
        proc = _spawn(db, relay, "--cursor", "0", "--metrics-port", str(port), "--duckdb-memory-limit", "200MB")
        info = announced(db, proc)
        poll(lambda: stored_cursor(info) == relay.head, timeout=60, what="the stored cursor at the head", interval=0.1)
        metrics = daemon_metrics(port)
        assert metrics["skyfill_firehose_last_seq"] == relay.head
        assert metrics['skyfill_firehose_events_total{type="commit"}'] > 1000
        assert metrics['skyfill_firehose_errors_total{kind="cbor"}'] == 1
        assert metrics["skyfill_storage_batch_write_seconds_count"] >= 1
        assert "skyfill_firehose_lag_seconds" in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    assert not (tmp_path / "sig.duckdb.daemon.json").exists()
    assert mirror_of(db) == expected_mirror(frames)


def test_kill_9_mid_stream_then_restart_loses_nothing(tmp_path: Path) -> None:
    frames = world_frames(8, 60, 12000)
    db = tmp_path / "k.duckdb"
    with LocalRelay(frames) as relay:
        proc = _spawn(db, relay, "--cursor", "0")
        info = announced(db, proc)
        poll(lambda: stored_cursor(info) >= frame_seqs(frames)[3000], timeout=60, what="a third of the stream stored",
             interval=0.02)
        proc.kill()  # SIGKILL: no flush, no goodbye
        proc.wait(timeout=10)
        # a stale announcement is left behind; the next run must ignore it and take over
        proc = _spawn(db, relay)
        info = announced(db, proc)
        poll(lambda: stored_cursor(info) == relay.head, timeout=90, what="the stored cursor at the head", interval=0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    assert mirror_of(db) == expected_mirror(frames)
    con = duckdb.connect(str(db), read_only=True)
    ended = [e for (e,) in con.execute("SELECT ended FROM coverage ORDER BY id").fetchall()]
    con.close()
    assert ended == ["crashed", "clean"]


def test_status_gaps_and_enqueue_while_consume_runs(tmp_path: Path) -> None:
    frames = world_frames(9, 15, 500)
    db = tmp_path / "live.duckdb"
    with LocalRelay(frames) as relay:
        proc = _spawn(db, relay, "--cursor", "0")
        try:
            info = announced(db, proc)
            poll(lambda: stored_cursor(info) == relay.head, timeout=30, what="the stored cursor at the head", interval=0.1)
            cli = [sys.executable, "-m", "skyfill"]
            out = subprocess.run([*cli, "status", "--db", str(db), "--json"], cwd=ROOT, capture_output=True, check=True)
            report = orjson.loads(out.stdout)
            assert report["cursors"][0]["seq"] == relay.head
            assert report["records"]["total"] == len(expected_mirror(frames)[0])
            assert report["consumer_running"] is True
            out = subprocess.run(
                [*cli, "gaps", "--db", str(db), "--start", "2025-05-31", "--end", "2025-06-02", "--no-audit",
                 "--json", "--enqueue"],
                cwd=ROOT, capture_output=True, check=True,
            )
            gaps = orjson.loads(out.stdout)
            # every DID seen is active in the window and was never backfilled
            assert gaps["counts"]["never_backfilled"] == len(expected_mirror(frames)[1])
            assert gaps["enqueued"] == gaps["total"]
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0


def _with_seq(frame: bytes, seq: int) -> bytes:
    header, body = libipld.decode_dag_cbor_multi(frame)
    body["seq"] = seq
    return libipld.encode_dag_cbor(header) + libipld.encode_dag_cbor(body)
