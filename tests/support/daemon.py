"""`skyfill consume` as a real process: spawn it, wait for its admin API announcement, read its cursor."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import httpx

from skyfill.app.daemon_client import call_daemon, find_daemon

from .wait import poll

__all__ = ["ROOT", "spawn_consume", "announced", "stored_cursor", "metrics", "reap"]

ROOT = Path(__file__).resolve().parents[2]


def spawn_consume(db: Path, relay_url: str, *args: str, stderr: int | IO[Any] | None = subprocess.PIPE,
                  env: dict[str, str] | None = None,
                  preexec_fn: Callable[[], None] | None = None) -> subprocess.Popen[bytes]:
    """`python -m skyfill consume --db DB --relay URL ARGS...` from the repository root, JSON logs on."""
    return subprocess.Popen(
        [sys.executable, "-m", "skyfill", "consume", "--db", str(db), "--relay", relay_url, *args],
        cwd=ROOT, env={**os.environ, "SKYFILL_LOG_JSON": "1", **(env or {})},
        stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=preexec_fn,
    )


def announced(db: Path, proc: subprocess.Popen[bytes], *, log: Path | None = None,
              timeout: float = 30) -> dict[str, Any]:
    """The daemon's announcement (admin API address) once `proc` has written it; its stderr (a pipe or
    `log`) is the failure message if it exits first."""
    found: list[dict[str, Any]] = []

    def ready() -> bool:
        if proc.poll() is not None:
            if log is not None:
                raise AssertionError(log.read_text())
            raise AssertionError(proc.stderr.read().decode() if proc.stderr else "the daemon exited")
        info = find_daemon(db)
        if info is not None and info["pid"] == proc.pid:
            found.append(info)
            return True
        return False

    poll(ready, timeout=timeout, what="the daemon to announce itself")
    return found[0]


def stored_cursor(info: dict[str, Any]) -> int:
    """The running daemon's stored cursor (0 before its first flush)."""
    cursors = call_daemon(info, "/status", timeout=10)["cursors"]
    return int(cursors[0]["seq"]) if cursors else 0


def metrics(port: int) -> dict[str, float]:
    """The daemon's Prometheus metrics, sample name (with labels) -> value."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill `proc` if a failed test left it running (a `finally:` step)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
