"""Storage failures are operator events (issue 9 item 2): a full disk under `skyfill consume`.

Real parts: the daemon is the real `skyfill consume` process, a local relay streams real frames,
and the DuckDB file lives on a real 30 MB filesystem (a size-limited tmpfs, mounted here as
root) that the test fills with a ballast file, so DuckDB's own writes get ENOSPC. Where mount is
not permitted (not root), the same scenario runs with the daemon's file size limit lowered
(RLIMIT_FSIZE, raised again from outside with prlimit): its writes fail with EFBIG instead,
a real write failure of the same path through DuckDB. Each test says which one it used.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest

from skyfill.consumer.daemon import ConsumeConfig, Daemon
from skyfill.errors import StorageError
from skyfill.storage import Store

from .support.relay import LocalRelay
from .support.daemon import announced, metrics, reap, spawn_consume, stored_cursor
from .support.mirror import consume_until, expected_mirror, mirror_of, world_frames
from .support.wait import apoll, free_port, poll


@contextlib.contextmanager
def small_filesystem(where: Path, size: str = "30m") -> Iterator[str]:
    """A size-limited tmpfs at `where`; yields "tmpfs", or "fsize" when mounting is not permitted."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = False
    if shutil.which("mount") and not os.environ.get("SKYFILL_TEST_NO_MOUNT"):  # set it to try the fallback
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                 capture_output=True).returncode == 0
    try:
        yield "tmpfs" if mounted else "fsize"
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(where)], check=True)


class DiskFull:
    """Make the daemon's writes fail, then give the room back."""

    def __init__(self, how: str, where: Path) -> None:
        self.how = how
        self.where = where
        self.proc: subprocess.Popen[bytes] | None = None

    def preexec(self) -> Callable[[], None] | None:
        if self.how != "fsize":
            return None

        def limit() -> None:  # writes past the limit fail with EFBIG (SIGXFSZ ignored) instead
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

        return limit

    def fill(self) -> None:
        if self.how == "tmpfs":
            with open(self.where / "ballast", "wb") as f:
                chunk = b"\0" * (1 << 20)
                try:
                    while True:
                        f.write(chunk)
                        f.flush()
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
            assert shutil.disk_usage(self.where).free < (1 << 20)
        else:
            assert self.proc is not None
            size = max(p.stat().st_size for p in self.where.glob("*.duckdb*"))
            resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))

    def free(self) -> None:
        if self.how == "tmpfs":
            (self.where / "ballast").unlink()
        elif self.proc is not None and self.proc.poll() is None:  # a new process starts unlimited
            resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def _spawn(db: Path, relay: LocalRelay, log: Path, disk: DiskFull, *extra: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as err:  # outside the small filesystem: the log must survive it
        proc = spawn_consume(db, relay.url, "--flush-interval", "0.05", "--batch-events", "200", *extra,
                             stderr=err, preexec_fn=disk.preexec())
    disk.proc = proc
    return proc


def _until(predicate: Callable[[], bool], what: str, timeout: float = 90) -> None:
    poll(predicate, timeout=timeout, what=what, interval=0.1)


def _lines(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text().splitlines():
        assert line.startswith("{"), f"not a structured log line: {line!r}"  # never a bare traceback
        out.append(orjson.loads(line))
    return out


def _coverage(db: Path) -> list[str]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return [e for (e,) in con.execute("SELECT ended FROM coverage ORDER BY id").fetchall()]
    finally:
        con.close()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[DiskFull]:
    where = tmp_path / "small"
    with small_filesystem(where) as how:
        yield DiskFull(how, where)


def test_disk_full_is_reported_retried_and_resumed_when_space_returns(disk: DiskFull, tmp_path: Path) -> None:
    frames = world_frames(31, 50, 6000)
    before, after = frames[:2000], frames[2000:]
    db = disk.where / "full.duckdb"
    log = tmp_path / "daemon.log"
    port = free_port()
    with LocalRelay(before) as relay:
        proc = _spawn(db, relay, log, disk, "--cursor", "0", "--metrics-port", str(port))
        try:
            info = announced(db, proc, log=log)
            _until(lambda: stored_cursor(info) == relay.head, "the first frames to be stored")
            stored = relay.head
            disk.fill()
            relay.append(after)
            _until(lambda: metrics(port).get("skyfill_store_healthy") == 0, "skyfill_store_healthy 0")
            # A small batch may still fit in what the filler left: the durable cursor can be a
            # little past `stored`, and the error line names exactly that durable cursor.
            first_head = stored
            stored = stored_cursor(info)
            assert first_head <= stored < relay.head
            failed = [e for e in _lines(log) if e["msg"].startswith("storage write failed")]
            assert len(failed) == 1, failed
            assert failed[0]["level"] == "error" and failed[0]["cursor"] == stored
            assert failed[0]["kind"] == ("no_space" if disk.how == "tmpfs" else "io"), failed[0]
            # Still alive, still answering, nothing stored past the outage; the lag gauge moves on.
            lag = metrics(port)["skyfill_firehose_lag_seconds"]
            _until(lambda: metrics(port)["skyfill_firehose_lag_seconds"] > lag, "the lag gauge to grow")
            assert proc.poll() is None and stored_cursor(info) == stored
            assert metrics(port)["skyfill_storage_committed_seq"] == stored
            errors = sum(v for k, v in metrics(port).items() if k.startswith("skyfill_storage_errors_total"))
            assert errors >= 1

            disk.free()
            _until(lambda: stored_cursor(info) == relay.head, "the daemon to resume by itself")
            assert metrics(port)["skyfill_store_healthy"] == 1
            assert [e for e in _lines(log) if e["msg"] == "storage recovered"]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        finally:
            reap(proc)
    assert mirror_of(db) == expected_mirror(frames)
    assert _coverage(db) == ["clean"]  # one span: the outage skipped no event
    print(f"disk full made with: {disk.how}")


def test_sigterm_during_the_outage_exits_non_zero_in_one_line_and_a_restart_loses_nothing(
    disk: DiskFull, tmp_path: Path
) -> None:
    frames = world_frames(32, 50, 4000)
    before, after = frames[:1500], frames[1500:]
    db = disk.where / "stop.duckdb"
    log = tmp_path / "daemon.log"
    port = free_port()
    with LocalRelay(before) as relay:
        proc = _spawn(db, relay, log, disk, "--cursor", "0", "--metrics-port", str(port))
        try:
            info = announced(db, proc, log=log)
            _until(lambda: stored_cursor(info) == relay.head, "the first frames to be stored")
            stored = relay.head
            disk.fill()
            relay.append(after)
            _until(lambda: metrics(port).get("skyfill_store_healthy") == 0, "skyfill_store_healthy 0")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 4
        finally:
            reap(proc)
        lines = _lines(log)  # every line structured: no traceback anywhere
        assert lines[-1]["level"] == "error" and lines[-1]["msg"].startswith("exiting: stopped while storage was failing")
        assert "\n" not in lines[-1]["msg"] and "exc" not in lines[-1]

        disk.free()
        proc = _spawn(db, relay, log, disk)  # resumes at the stored cursor
        try:
            info = announced(db, proc, log=log)
            assert stored_cursor(info) >= stored
            _until(lambda: stored_cursor(info) == relay.head, "the restart to catch up")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        finally:
            reap(proc)
    assert mirror_of(db) == expected_mirror(frames)
    # The first span could not be closed while the disk was full: the restart closed it.
    assert _coverage(db) in (["error", "clean"], ["crashed", "clean"])
    print(f"disk full made with: {disk.how}")


async def test_an_invalidated_database_stops_the_daemon_in_one_line_with_the_cursor_intact(tmp_path: Path) -> None:
    """DuckDB invalidates a database whose checkpoint hits a full disk; nothing can be written
    on it again in this process. The test makes DuckDB checkpoint on the full tmpfs itself (the
    daemon's own checkpoint would need a 64 MB WAL, more than this disk holds): a real fatal
    error of the real file. The daemon must stop with one line, and a restart lose nothing."""
    where = tmp_path / "small"
    with small_filesystem(where) as how:
        if how != "tmpfs":
            pytest.skip("needs a real full filesystem (mount as root) for DuckDB's checkpoint to fail")
        disk = DiskFull(how, where)
        # Few frames after the failure: the daemon stops reading, and a relay still pushing
        # thousands of frames into a full socket makes its own shutdown slow.
        frames = world_frames(33, 30, 1300)
        before, after = frames[:1000], frames[1000:]
        db = where / "fatal.duckdb"
        with LocalRelay(before) as relay:
            store = Store(db)
            daemon = Daemon(store, ConsumeConfig(relay=relay.url, cursor=0, flush_interval=0.05, batch_events=200))
            task = asyncio.create_task(daemon.run(install_signal_handlers=False))
            await apoll(lambda: task.done() or daemon.committed_seq == relay.head, what="the first frames stored")
            assert daemon.committed_seq == relay.head, "the daemon stopped before storing the first frames"
            stored = relay.head
            disk.fill()
            with pytest.raises(StorageError, match="No space left on device"):
                await asyncio.to_thread(store.fetchall, "CHECKPOINT")
            relay.append(after)
            with pytest.raises(StorageError) as failed:
                await asyncio.wait_for(task, 60)
            assert "invalidated" in str(failed.value) and "\n" not in str(failed.value)
            assert f"resume from cursor {stored}" in str(failed.value)
            assert daemon.committed_seq == stored
            store.close()
            disk.free()
            daemon = await consume_until(db, relay, relay.head)
        assert mirror_of(db) == expected_mirror(frames)
        assert _coverage(db)[-1] == "clean" and _coverage(db)[0] in ("error", "crashed")
