"""`peer`: @atproto/sync, the reference TypeScript firehose consumer, next to skyfill on the same frames.

One relay process streams World(seed, n_dids) frames and one PLC process serves the World's DID
documents; on them, in turn: skyfill's daemon (as in `ingest`: decoded, tracked, written to
DuckDB), skyfill with every commit signature checked (cold key cache), @atproto/sync's Firehose
unverified and verified (signature + MST proofs of every commit; bench/peer/peer.mjs), events run
through its MemoryRunner (per-DID order, PEER_CONCURRENCY in flight). The peer stores nothing,
so it is measured at its best: frames parsed and handed to a counting handler.

Each peer run is checked against the frames: every op of every commit and every #identity and
#account event must reach the handler, and the verified run must reject none (the generated
frames are valid); otherwise the part fails with the peer's rejection reasons.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import libipld

from tests.support.generate import World
from bench.harness import Context, Row, part
from bench.progress import step
from bench.peer import PeerInstall, installed

from ._workers import read_frames, run_json, spawn, write_frames

__all__ = ["peer", "peer_frames", "expected_events", "run_peer", "PEER_CONCURRENCY"]

_FULL_FRAMES = 20_000
_SMOKE_FRAMES = 500


def peer_frames(ctx: Context) -> int:
    return _SMOKE_FRAMES if ctx.sizes.smoke else _FULL_FRAMES


def expected_events(frames: Iterable[bytes]) -> Counter[str]:
    """What a consumer's handler should receive from `frames`: one event per commit op (by
    action), per #identity and per #account frame."""
    want: Counter[str] = Counter()
    for frame in frames:
        header, body = libipld.decode_dag_cbor_multi(frame)
        kind = header.get("t")
        if kind == "#commit":
            want.update(op["action"] for op in body["ops"])
        elif kind in ("#identity", "#account"):
            want[kind[1:]] += 1
    return want


# The MemoryRunner's in-flight events. Its default, unbounded, starts every buffered event at
# once: on 20,000 frames the CPU-bound verification of thousands of queued commits starved the
# event loop until 138 first-seen-DID resolutions hit even a 30 s timeout (176 events lost).
# 64 keeps 64 DIDs' resolutions overlapping and lost none; the peer is single-threaded either way.
PEER_CONCURRENCY = 64


def run_peer(peer: PeerInstall, relay: str, plc: str, last_seq: int, *, verify: bool,
             concurrency: int | None = PEER_CONCURRENCY, timeout: float = 900) -> dict[str, Any]:
    """One @atproto/sync run from the relay's first frame to `last_seq`; its JSON result.
    `concurrency`: the MemoryRunner's (None: its unbounded default)."""
    cmd = [str(peer.node), str(peer.script), "--service", relay, "--plc", plc, "--last-seq", str(last_seq),
           "--timeout", str(int(timeout))]
    if concurrency is not None:
        cmd += ["--concurrency", str(concurrency)]
    if verify:
        cmd.append("--verify")
    done = subprocess.run(cmd, cwd=peer.script.parent, capture_output=True, text=True, timeout=timeout + 30,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"@atproto/sync peer exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _check(result: dict[str, Any], want: Counter[str], label: str) -> int:
    """The number of events the peer handled; raises when it rejected or lost any."""
    got = Counter(result["events"])
    if result["errors"] or got != want:
        missing = {k: want[k] - got[k] for k in want if got[k] != want[k]}
        raise AssertionError(
            f"@atproto/sync {label}: {sum(want.values()) - sum(got.values())} of {sum(want.values())} events "
            f"not handled (by type: {missing}); errors by reason: {result['errors']}"
        )
    return sum(got.values())


@part("peer", order=45)
def peer(ctx: Context) -> list[Row]:
    install = installed()
    if install is None:
        raise RuntimeError("the @atproto/sync peer is not installed: run `make bench-peer-install`")
    n = peer_frames(ctx)
    with tempfile.TemporaryDirectory(prefix="skyfill-bench-peer-") as tmp:
        path = Path(tmp) / "frames.bin"
        world = World(ctx.seed, n_dids=ctx.sizes.n_dids, retain_blocks=False)
        count, _size = write_frames(path, world.frames(n))
        last_seq = world.last_seq
        want = expected_events(read_frames(path))
        with spawn("firehose", str(path)) as relay, spawn("plc", str(ctx.seed), str(ctx.sizes.n_dids)) as plc:
            step(f"peer: skyfill consumes {count:,} frames, plain then verified")
            sky = run_json("consume", str(Path(tmp) / "plain.duckdb"), relay["url"], str(last_seq))
            sky_verified = run_json("consume", str(Path(tmp) / "verified.duckdb"), relay["url"], str(last_seq),
                                    "--verify", plc["url"])
            step("peer: the @atproto/sync peer, plain then verified")
            plain = run_peer(install, relay["url"], plc["url"], last_seq, verify=False)
            verified = run_peer(install, relay["url"], plc["url"], last_seq, verify=True)
    rejected = {k: v for k, v in sky_verified["counts"].items() if k.startswith("error:")}
    if rejected or sky_verified["records"] != sky["records"]:
        raise AssertionError(f"skyfill's verified run rejected events or stored other rows: {rejected}")
    events = _check(plain, want, "unverified")
    _check(verified, want, "verified")
    sky_rate, sky_verified_rate = count / sky["seconds"], count / sky_verified["seconds"]
    peer_rate, peer_verified_rate = count / plain["seconds"], count / verified["seconds"]
    rows = [
        Row(f"peer.frames.{count}", float(count), "frames"),
        Row("peer.events_per_frame", events / count, "events"),
        Row("peer.sync.frames", peer_rate, "frames/s"),
        Row("peer.sync.events", events / plain["seconds"], "events/s"),
        Row("peer.sync.cpu", plain["cpu_seconds"], "s"),
        Row("peer.sync.peak_rss", plain["peak_rss"] / 1e6, "MB"),
        Row("peer.sync.verified.frames", peer_verified_rate, "frames/s"),
        Row("peer.sync.verified.events", events / verified["seconds"], "events/s"),
        Row("peer.sync.verified.cpu", verified["cpu_seconds"], "s"),
        Row("peer.sync.verified.peak_rss", verified["peak_rss"] / 1e6, "MB"),
        Row("peer.skyfill.frames", sky_rate, "frames/s"),
        Row("peer.skyfill.verified.frames", sky_verified_rate, "frames/s"),
        Row("peer.skyfill_vs_sync", sky_rate / peer_rate, "x"),
        Row("peer.skyfill_vs_sync.verified", sky_verified_rate / peer_verified_rate, "x"),
    ]
    # the reference client drops the connection when a heartbeat pong is late (a loaded machine):
    # it resumes from its cursor, and the time to do so is part of its figure
    for label, result in (("sync", plain), ("sync.verified", verified)):
        if result["replayed"]:
            rows.append(Row(f"peer.{label}.replayed_after_reconnect", float(result["replayed"]), "events"))
    return rows
