"""The consumer daemon's settings."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ConsumeConfig"]


@dataclass(frozen=True, slots=True)
class ConsumeConfig:
    relay: str = "wss://bsky.network"
    cursor: int | None = None               # overrides the stored cursor
    collections: tuple[str, ...] = ()
    strict_cursor: bool = False
    batch_events: int = 5000                # seal a batch after this many events ...
    flush_interval: float = 0.5             # ... or this many seconds
    publish: bool = False                   # keep the unreduced change log for a publisher
    # per-DID rows the tracker keeps in memory (least recently used evicted; a miss is a point read)
    tracker_capacity: int = 200_000
