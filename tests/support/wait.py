"""Polling instead of fixed sleeps, and free loopback ports."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections.abc import Callable

__all__ = ["free_port", "poll", "apoll"]


# Under pytest-xdist each worker hands out ports from its own block below the kernel's ephemeral
# range (32768+ on Linux), so two workers never pick the same port, and no port a server binds to 0
# for (or an outgoing connection) can take one handed out here before its server listens.
_BLOCK_BASE = 20_000
_BLOCK_SIZE = 1_000
_next_in_block: list[int] = []


def _worker_index() -> int | None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ... in xdist workers only
    return int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else None


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback port nobody listens on right now (in an xdist worker: from that worker's block)."""
    index = _worker_index()
    if index is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    base = _BLOCK_BASE + (index % 12) * _BLOCK_SIZE  # 12 blocks end at 32000, below 32768
    if not _next_in_block:
        # a random start: runs of the suite at the same time on one machine rarely overlap
        _next_in_block.append(random.randrange(_BLOCK_SIZE))
    for _ in range(_BLOCK_SIZE):
        port = base + _next_in_block[0] % _BLOCK_SIZE
        _next_in_block[0] += 1
        if _bindable(port):
            return port
    raise RuntimeError(f"no free port in {base}..{base + _BLOCK_SIZE - 1}")


def poll(predicate: Callable[[], object], *, timeout: float = 60, what: str = "the condition",
         interval: float = 0.05) -> None:
    """Return as soon as `predicate()` is true; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


async def apoll(predicate: Callable[[], object], *, timeout: float = 60, what: str = "the condition",
                interval: float = 0.02) -> None:
    """`poll` for a test running in the event loop: the loop keeps running while it waits."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(interval)
