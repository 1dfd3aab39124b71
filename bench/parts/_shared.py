"""Data the parts share within one run (drawn once per run through `ctx.memo`)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from typing import Any

from tests.support.generate import GeneratedIdentity, World, generate_repo, make_identity
from bench.harness import Context

__all__ = ["frames", "repo", "walk_records"]


def frames(ctx: Context) -> list[bytes]:
    """The first `sizes.frames` frames of the run's firehose (a prefix of what `gen` times)."""

    def draw() -> list[bytes]:
        world = World(ctx.seed, n_dids=ctx.sizes.n_dids, retain_blocks=False)
        return list(world.frames(ctx.sizes.frames))

    return ctx.memo("frames", draw)


def repo(ctx: Context) -> tuple[GeneratedIdentity, bytes]:
    def build() -> tuple[GeneratedIdentity, bytes]:
        ident = make_identity(random.Random(ctx.seed))
        return ident, generate_repo(ctx.seed, did=ident.did, key=ident.secret, n_records=ctx.sizes.repo_records)

    return ctx.memo("repo", build)


def walk_records(nodes: Mapping[bytes, Any], root: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(key, record cid) in key order from decoded MST nodes ({cid bytes: node dict})."""
    stack: list[tuple[Any, int, bytes]] = [(nodes[root], -1, b"")]
    while stack:
        node, i, prev = stack.pop()
        entries = node["e"]
        if i == -1:
            sub = node["l"]
        else:
            e = entries[i]
            prev = prev[: e["p"]] + e["k"]
            yield prev, e["v"]
            sub = e["t"]
        if i + 1 < len(entries):
            stack.append((node, i + 1, prev))
        if sub is not None:
            stack.append((nodes[sub], -1, b""))
