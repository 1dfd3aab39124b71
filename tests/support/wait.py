"""Polling instead of fixed sleeps, and free loopback ports."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

__all__ = ["free_port", "poll", "apoll"]


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
