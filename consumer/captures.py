"""Captures: the firehose commits of a DID applied while an in-daemon backfill fetches its repo.

The daemon appends every applied commit of a captured DID (and notes a chain break); the
resync (consumer/resync.py) takes the capture when it reconciles, replays the commits newer
than the fetched rev, and hands the DID's turn on. The ordering rules are in resync.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from skyfill.protocol.events import Account, Commit, Identity, Sync

__all__ = ["Capture", "Captures"]


@dataclass(slots=True, eq=False)
class Capture:
    """Firehose commits of one DID seen while its repo is being fetched, for one attempt."""

    owner: asyncio.Task[Any] | None
    commits: list[Commit] = field(default_factory=list)
    desynced: bool = False


@dataclass(slots=True)
class _Turn:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # attempts holding or waiting for the lock; the entry goes at 0


class Captures:
    """The daemon's open captures, at most one per DID (see "One attempt per DID at a time" in
    consumer/resync.py).

    An attempt is identified by its asyncio task: the backfiller runs begin, commit and abort
    of one attempt in one task, so a late `abort` of attempt A never closes attempt B's capture.
    """

    def __init__(self) -> None:
        self.active: dict[str, Capture] = {}  # read by the daemon for every applied event
        self._turns: dict[str, _Turn] = {}

    def __len__(self) -> int:
        return len(self.active) + len(self._turns)

    async def open(self, did: str) -> Capture:
        """Wait for this DID's turn, then start capturing its commits."""
        turn = self._turns.get(did)
        if turn is None:
            turn = self._turns[did] = _Turn()
        turn.users += 1
        try:
            await turn.lock.acquire()
        except BaseException:
            self._leave(did, turn)
            raise
        capture = self.active[did] = Capture(owner=asyncio.current_task())
        return capture

    def note(self, event: Commit | Sync | Identity | Account, *, chain_broke: bool) -> None:
        """An event the daemon applied: keep it if its DID is being captured. A chain break (or a
        #sync) means the captured commits are not the whole story."""
        capture = self.active.get(event.did)
        if capture is not None:
            if isinstance(event, Commit):
                capture.commits.append(event)
            if chain_broke or isinstance(event, Sync):
                capture.desynced = True

    def close(self, did: str) -> Capture | None:
        """Stop the calling attempt's capture of `did` and hand the turn on; None if it holds none."""
        capture = self.active.get(did)
        if capture is None or capture.owner is not asyncio.current_task():
            return None
        del self.active[did]
        turn = self._turns[did]
        turn.lock.release()
        self._leave(did, turn)
        return capture

    def _leave(self, did: str, turn: _Turn) -> None:
        turn.users -= 1
        if turn.users == 0:
            del self._turns[did]
