"""Processes the benchmark parts start, so no measured code shares a GIL with a server.

`python -m bench.parts._workers <command> ...`; every command prints exactly one JSON line on
stdout (servers: their URLs once ready, then they serve until killed; drivers: the result).

    firehose FILE              serve the frames of FILE (see `write_frames`) over subscribeRepos
    repos SPEC                 generate the repos of a JSON spec and serve them (PDS + PLC)
    plc SEED N_DIDS            serve the DID documents of World(SEED, n_dids=N_DIDS) (PLC only)
    consume DB RELAY LAST_SEQ [BATCH [MEMORY_LIMIT]] [--verify PLC]
                               run consumer.Daemon from cursor 0 until LAST_SEQ is committed;
                               --verify: check every commit signature, keys resolved from PLC
    backfill DB PLC DID...     run the backfiller on a fresh DB; report peak RSS over the baseline
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["write_frames", "read_frames", "spawn", "run_json", "rss_bytes", "peak_rss_bytes"]

_LEN = struct.Struct("<I")


# -- frame files --------------------------------------------------------------------------------


def write_frames(path: Path, frames: Iterable[bytes]) -> tuple[int, int]:
    """Write length-prefixed frames; returns (count, payload bytes)."""
    n = size = 0
    with path.open("wb") as out:
        for frame in frames:
            out.write(_LEN.pack(len(frame)))
            out.write(frame)
            n += 1
            size += len(frame)
    return n, size


def read_frames(path: Path, limit: int | None = None) -> Iterator[bytes]:
    with path.open("rb") as src:
        n = 0
        while limit is None or n < limit:
            head = src.read(4)
            if len(head) < 4:
                return
            yield src.read(_LEN.unpack(head)[0])
            n += 1


# -- process helpers ----------------------------------------------------------------------------


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak RSS of this process image. Not getrusage's ru_maxrss: that survives exec, so a
    worker forked from a big parent would report the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # pragma: no cover - not Linux


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.parts._workers", *args]


@contextmanager
def spawn(*args: str, timeout: float = 600) -> Iterator[dict[str, Any]]:
    """Start a server command, yield its ready line (JSON), kill it on exit."""
    proc = subprocess.Popen(_cmd(*args), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = _first_line(proc.stdout, proc, timeout)
        yield json.loads(line)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _first_line(stream: IO[str], proc: subprocess.Popen[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    line = stream.readline()
    if not line:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        raise RuntimeError(f"worker {proc.args!r} exited ({proc.returncode}) before it was ready")
    return line


def run_json(*args: str, timeout: float = 900) -> dict[str, Any]:
    """Run a driver command to completion and return its JSON result line."""
    done = subprocess.run(_cmd(*args), stdout=subprocess.PIPE, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {args[0]} failed with exit code {done.returncode}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _ready(info: dict[str, Any]) -> None:
    print(json.dumps(info), flush=True)


# -- servers ------------------------------------------------------------------------------------


async def _serve_firehose(path: Path) -> None:
    from bench.servers import FirehoseServer

    frames = list(read_frames(path))
    async with FirehoseServer(frames) as srv:
        _ready({"url": srv.host_url, "frames": len(frames)})
        await asyncio.Event().wait()


def repo_spec(seed: int, sizes: list[int]) -> dict[str, Any]:
    return {"seed": seed, "sizes": sizes}


def _serve_repos(spec: dict[str, Any]) -> None:
    from tests.support.generate import generate_repo, make_identity
    from bench.servers import RepoServer

    rng = random.Random(spec["seed"])
    identities = [make_identity(rng) for _ in spec["sizes"]]
    peers = [i.did for i in identities]
    started = time.perf_counter()
    repos = {
        ident.did: generate_repo(rng.getrandbits(64), did=ident.did, key=ident.secret, n_records=n, peers=peers)
        for ident, n in zip(identities, spec["sizes"], strict=True)
    }
    gen_seconds = time.perf_counter() - started
    with RepoServer(repos, identities) as srv:
        _ready({
            "url": srv.url,
            "dids": peers,
            "records": dict(zip(peers, spec["sizes"], strict=True)),
            "car_bytes": {d: len(c) for d, c in repos.items()},
            "gen_seconds": gen_seconds,
        })
        while True:
            time.sleep(3600)


def _serve_plc(seed: int, n_dids: int) -> None:
    from tests.support.generate import World
    from bench.servers import RepoServer

    world = World(seed, n_dids=n_dids, retain_blocks=False)
    with RepoServer({}, world.identities) as srv:
        _ready({"url": srv.url, "dids": len(world.identities)})
        while True:
            time.sleep(3600)


# -- drivers ------------------------------------------------------------------------------------


async def _consume(
    db: str, relay: str, last_seq: int, batch_events: int, memory_limit: str | None, plc: str | None = None,
) -> dict[str, Any]:
    from skyfill.app.settings import default
    from skyfill.consumer.daemon import ConsumeConfig, Daemon
    from skyfill.storage import Store

    # DuckDB's buffer pool as `skyfill consume` sets it (Settings.duckdb_memory_limit) unless an
    # experiment gives another: without one DuckDB takes up to 80% of RAM and the peak RSS measured
    # is its cache, not the daemon's footprint
    store = Store(db, memory_limit=memory_limit or default("duckdb_memory_limit"))
    base_rss = rss_bytes()
    resolver = verifier = None
    if plc is not None:  # as `consume --verify`, minus the PLC rate limit (loopback)
        from skyfill.net.identity import Resolver
        from skyfill.net.pds import PdsClient
        from skyfill.consumer.verify import CommitVerifier

        client = PdsClient(per_host_rps=1e6, per_host_concurrency=32, max_retries=0)  # the Resolver trusts its PLC origin
        resolver = Resolver(plc_url=plc, client=client, store=store)
        verifier = CommitVerifier(resolver, concurrency=32)
    daemon = Daemon(store, ConsumeConfig(relay=relay, cursor=0, batch_events=batch_events), verifier=verifier)
    started = time.perf_counter()
    task = asyncio.create_task(daemon.run(install_signal_handlers=False))
    try:
        while daemon.committed_seq != last_seq:
            if task.done():
                task.result()
                raise RuntimeError(f"daemon stopped at {daemon.committed_seq}, wanted {last_seq}")
            await asyncio.sleep(0.005)
        seconds = time.perf_counter() - started
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 60)
        if verifier is not None:
            await verifier.aclose()
            await client.aclose()
    peak_rss = peak_rss_bytes()  # the daemon's peak, before the counts below (a scan of the whole store)
    records = store.fetchall("SELECT count(*) FROM records")[0][0]
    repos = store.fetchall("SELECT count(*) FROM repos")[0][0]
    store.close()
    return {
        "seconds": seconds,
        "peak_rss": peak_rss,
        "base_rss": base_rss,
        "records": records,
        "repos": repos,
        "counts": daemon.counts,
    }


async def _backfill(db: str, plc: str, dids: list[str], concurrency: int) -> dict[str, Any]:
    from skyfill.app.jobs import run_backfill
    from skyfill.backfill.config import BackfillConfig
    from skyfill.storage import Store

    store = Store(db)
    config = BackfillConfig(plc_url=plc, allow_private_hosts=True, per_host_rps=1e6, concurrency=concurrency,
                            per_host_concurrency=concurrency)
    base_rss = rss_bytes()
    started = time.perf_counter()
    summary = await run_backfill(store, dids=dids, config=config, progress=False)
    seconds = time.perf_counter() - started
    store.close()
    return {"seconds": seconds, "peak_rss": peak_rss_bytes(), "base_rss": base_rss, "summary": summary.to_json()}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    command, rest = args[0], args[1:]
    if command == "firehose":
        asyncio.run(_serve_firehose(Path(rest[0])))
    elif command == "repos":
        _serve_repos(json.loads(rest[0]))
    elif command == "plc":
        _serve_plc(int(rest[0]), int(rest[1]))
    elif command == "consume":
        plc = None
        if "--verify" in rest:
            at = rest.index("--verify")
            plc = rest[at + 1]
            rest = rest[:at] + rest[at + 2 :]
        batch = int(rest[3]) if len(rest) > 3 else 5000
        limit = rest[4] if len(rest) > 4 else None
        _ready(asyncio.run(_consume(rest[0], rest[1], int(rest[2]), batch, limit, plc)))
    elif command == "backfill":
        _ready(asyncio.run(_backfill(rest[0], rest[1], rest[3:], int(rest[2]))))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
