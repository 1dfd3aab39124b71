"""Typed firehose events: small frozen values produced by pure parse functions (frames.py).

CIDs are carried as their base32 string form; record bodies as JSON text in the atproto JSON
form (`{"$link": ...}`, `{"$bytes": ...}`), ready to store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["Op", "Commit", "Sync", "Identity", "Account", "Info", "StreamError", "Event"]


# Op and Commit are built once or more per frame, so they are NamedTuples: as immutable as a
# frozen dataclass, ~2.5x cheaper to construct (a frozen dataclass's __init__ goes through
# object.__setattr__ once per field). The rarer events stay frozen dataclasses.


class Op(NamedTuple):
    action: str                 # "create" | "update" | "delete"
    collection: str
    rkey: str
    cid: str | None             # the new record CID; None for delete
    prev: str | None            # the previous record CID (sync 1.1), when sent
    record: str | None          # record JSON; None for delete or when filtered out by collection
    created_at: str | None      # the record's createdAt when it is a valid atproto datetime


class Commit(NamedTuple):
    seq: int
    time: str
    did: str
    rev: str
    since: str | None
    commit_cid: str
    data_cid: str | None        # MST root from the signed commit block in `blocks`
    prev_data: str | None       # sync 1.1 `prevData`
    ops: tuple[Op, ...]
    too_big: bool
    commit_block: bytes | None  # raw signed commit block, for optional signature checks


@dataclass(frozen=True, slots=True)
class Sync:
    seq: int
    time: str
    did: str
    rev: str
    commit_cid: str
    data_cid: str
    commit_block: bytes


@dataclass(frozen=True, slots=True)
class Identity:
    seq: int
    time: str
    did: str
    handle: str | None


@dataclass(frozen=True, slots=True)
class Account:
    seq: int
    time: str
    did: str
    active: bool
    status: str | None


@dataclass(frozen=True, slots=True)
class Info:
    name: str                   # e.g. "OutdatedCursor"
    message: str | None


@dataclass(frozen=True, slots=True)
class StreamError:
    """An error frame (header op -1): FutureCursor, ConsumerTooSlow, ... The server closes after it."""

    error: str
    message: str | None


Event = Commit | Sync | Identity | Account | Info | StreamError
