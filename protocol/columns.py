"""Records of one repo as parallel columns: what parsing a repo yields and a reconcile writes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["RecordColumns"]


@dataclass(slots=True)
class RecordColumns:
    """Column lists for records being written by a reconciliation (one DID)."""

    collection: list[str]
    rkey: list[str]
    cid: list[str]
    record: list[str | None]
    created_at: list[str | None]

    @classmethod
    def empty(cls) -> RecordColumns:
        return cls(collection=[], rkey=[], cid=[], record=[], created_at=[])

    @classmethod
    def concat(cls, parts: Sequence[RecordColumns]) -> RecordColumns:
        """The rows of `parts` in order (the one part itself when there is one)."""
        if len(parts) == 1:
            return parts[0]
        out = cls.empty()
        for p in parts:
            out.collection += p.collection
            out.rkey += p.rkey
            out.cid += p.cid
            out.record += p.record
            out.created_at += p.created_at
        return out

    @classmethod
    def gather(cls, picks: Sequence[tuple[RecordColumns, int]]) -> RecordColumns:
        """Row `i` of `src` for each (src, i) of `picks`, in that order."""
        return cls(
            collection=[src.collection[i] for src, i in picks],
            rkey=[src.rkey[i] for src, i in picks],
            cid=[src.cid[i] for src, i in picks],
            record=[src.record[i] for src, i in picks],
            created_at=[src.created_at[i] for src, i in picks],
        )
