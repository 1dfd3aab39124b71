"""The mirror oracle: what a DuckDB file must hold after a stream of frames, computed independently
of skyfill by folding each commit's ops in seq order, and an in-loop daemon run to a given seq."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import duckdb
import libipld

from tests.support.generate.firehose import World
from skyfill.consumer.daemon import ConsumeConfig, Daemon
from skyfill.storage import Store
from tests.support.relay import LocalRelay

__all__ = ["expected_mirror", "mirror_of", "world_frames", "frame_seqs", "consume_until"]


def expected_mirror(frames: list[bytes]) -> tuple[dict[tuple[str, str, str], str], dict[str, str]]:
    """(did, collection, rkey) -> cid and did -> rev, by folding the ops of every commit frame."""
    records: dict[tuple[str, str, str], str] = {}
    revs: dict[str, str] = {}
    for frame in frames:
        header, body = libipld.decode_dag_cbor_multi(frame)
        if header.get("t") != "#commit":
            continue
        for op in body["ops"]:
            collection, rkey = op["path"].split("/", 1)
            key = (body["repo"], collection, rkey)
            if op["action"] == "delete":
                records.pop(key, None)
            else:
                records[key] = libipld.encode_cid(op["cid"])
        revs[body["repo"]] = body["rev"]
    return records, revs


def mirror_of(db: Path) -> tuple[dict[tuple[str, str, str], str], dict[str, str]]:
    """What the DuckDB file at `db` holds, in the shape of `expected_mirror`."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        records = {(d, c, k): cid for d, c, k, cid in con.execute("SELECT did, collection, rkey, cid FROM records").fetchall()}
        revs = dict(con.execute("SELECT did, rev FROM repos WHERE rev IS NOT NULL").fetchall())
    finally:
        con.close()
    return records, revs


def world_frames(seed: int, n_dids: int, n_frames: int) -> list[bytes]:
    """`n_frames` signed firehose frames of a generated world (tests.support.generate)."""
    return list(World(seed, n_dids=n_dids, retain_blocks=False).frames(n_frames))


def frame_seqs(frames: list[bytes]) -> list[int]:
    """The seq of each frame."""
    return [libipld.decode_dag_cbor_multi(f)[1]["seq"] for f in frames]


async def consume_until(
    db: Path, relay: LocalRelay, seq: int, *, timeout: float = 60, verifier: object = None, **config: object
) -> Daemon:
    """Run a daemon in this event loop until `seq` is committed, then stop it cleanly."""
    store = Store(db)
    daemon = Daemon(store, ConsumeConfig(relay=relay.url, flush_interval=0.05, **config),  # type: ignore[arg-type]
                    verifier=verifier)  # type: ignore[arg-type]
    task = asyncio.create_task(daemon.run(install_signal_handlers=False))
    deadline = time.monotonic() + timeout
    try:
        while daemon.committed_seq != seq:
            if task.done():
                task.result()
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon stuck at {daemon.committed_seq}, wanted {seq}")
            await asyncio.sleep(0.02)
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 10)
        store.close()
    return daemon
