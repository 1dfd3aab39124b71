"""What `python -m bench.scale` measures on one store: ingest, backfill, bytes per record, gaps.

Ingest and backfill run the project's real code in a fresh process each (`bench.parts._workers`:
`consume` runs `consumer.daemon.Daemon` from cursor 0 to the last seq of a local firehose;
`backfill` runs `app.jobs.run_backfill` against a local PDS + PLC serving generated repos), on a
copy of the cached store so the cache never changes; the copy's time is printed, never measured.
Gap detection runs on that copy before anything is written to it; bytes per record is the cached
file's size (checkpointed when it was built) over its live records.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from bench.harness import Row
from bench.parts._workers import repo_spec, run_json, spawn, write_frames
from skyfill.backfill.gaps import detect_gaps
from skyfill.storage import Store
from tests.support.generate import World

from .build import END_MICROS

__all__ = ["Plan", "Servers", "SizeResult", "servers", "measure_size", "rows_for", "live_records"]

GAP_WINDOW = timedelta(days=1)
_Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Plan:
    """What every size gets: the same frames, the same repos."""

    seed: int
    n_dids: int          # DIDs of the firehose World
    frames: int          # frames the daemon ingests
    repo_sizes: tuple[int, ...]   # records per backfilled repo
    smoke: bool

    @classmethod
    def for_run(cls, *, smoke: bool, seed: int = 1) -> Plan:
        if smoke:
            return cls(seed, 50, 2_000, (800, 400) + tuple(60 + (i * 37) % 200 for i in range(6)), True)
        large = (60_000, 40_000, 30_000, 20_000)
        small = tuple(500 + (i * 977) % 4_200 for i in range(36))
        return cls(seed, 1_000, 20_000, large + small, False)


@dataclass(frozen=True, slots=True)
class Servers:
    relay: str
    last_seq: int
    frames: int
    pds: str               # PDS + PLC of the backfilled repos
    dids: tuple[str, ...]
    records: int           # records in those repos


@contextmanager
def servers(plan: Plan, tmp: Path, say: _Say) -> Iterator[Servers]:
    """A firehose process with the plan's frames and a PDS process with its repos, for every size."""
    world = World(plan.seed, n_dids=plan.n_dids, retain_blocks=False)
    path = tmp / "frames.bin"
    count, _ = write_frames(path, world.frames(plan.frames))
    say(f"{count:,} frames drawn (World seed {plan.seed}, {plan.n_dids} DIDs)")
    # another seed than the World's: the backfilled DIDs must be new to every store
    spec = repo_spec(plan.seed + 1000, list(plan.repo_sizes))
    with ExitStack() as stack:
        relay = stack.enter_context(spawn("firehose", str(path)))
        pds = stack.enter_context(spawn("repos", json.dumps(spec)))
        say(f"{len(pds['dids'])} repos ({sum(plan.repo_sizes):,} records) generated in {pds['gen_seconds']:.0f}s")
        yield Servers(relay["url"], world.last_seq, count, pds["url"], tuple(pds["dids"]), sum(plan.repo_sizes))


@dataclass(slots=True)
class SizeResult:
    label: str
    n_records: int
    live_records: int = 0
    file_bytes: int = 0
    build_seconds: float = 0.0
    copy_seconds: float = 0.0
    ingest: dict[str, Any] = field(default_factory=dict)
    backfill: dict[str, Any] = field(default_factory=dict)
    gaps: dict[str, float] = field(default_factory=dict)
    gap_counts: dict[str, int] = field(default_factory=dict)
    extra: list[Row] = field(default_factory=list)   # e.g. the JSONBench rows


def live_records(con: duckdb.DuckDBPyConnection) -> int:
    """Live records of a store (one row per live record in the `records` view)."""
    return int(con.execute("SELECT count(*) FROM records").fetchall()[0][0])


def gap_timings(path: Path) -> tuple[dict[str, float], dict[str, int]]:
    """`detect_gaps` over the last day of the store's event times, no PDS audit; seconds per reason."""
    end = datetime.fromtimestamp(END_MICROS / 1e6, tz=UTC)
    with Store(path, read_only=True) as store:
        report = asyncio.run(detect_gaps(store, start=end - GAP_WINDOW, end=end, audit=None, now=end))
    return dict(report.timings), dict(report.counts)


def copy_store(src: Path | None, dst: Path) -> float:
    """Copy the cached store (and its WAL, if any) to dst; returns seconds. None: no file (empty store)."""
    started = time.perf_counter()
    if src is not None:
        shutil.copyfile(src, dst)
        wal = Path(str(src) + ".wal")
        if wal.exists():
            shutil.copyfile(wal, Path(str(dst) + ".wal"))
    return time.perf_counter() - started


def measure_size(result: SizeResult, cached: Path | None, srv: Servers, say: _Say,
                 extra: Callable[[Path], list[Row]] | None = None) -> SizeResult:
    """Fill `result` for one store (cached: the cached file; None: an empty store)."""
    if cached is not None:
        result.file_bytes = cached.stat().st_size
        with duckdb.connect(str(cached), read_only=True) as con:
            result.live_records = live_records(con)
        say(f"[{result.label}] {result.live_records:,} live records, {result.file_bytes / 1e9:.2f} GB "
            f"({result.file_bytes / max(1, result.live_records):.0f} B/record)")
    with tempfile.TemporaryDirectory(prefix="skyfill-scale-", dir=_tmp_dir(cached)) as tmp:
        db = Path(tmp) / "store.duckdb"
        if cached is None:
            Store(db).close()
        else:
            result.copy_seconds = copy_store(cached, db)
            say(f"[{result.label}] copied the store in {result.copy_seconds:.0f}s (not measured)")
        say(f"[{result.label}] gaps: timing each reason")
        t0 = time.perf_counter()
        result.gaps, result.gap_counts = gap_timings(db)
        say(f"[{result.label}] gaps: " + ", ".join(f"{k} {v:.2f}s" for k, v in result.gaps.items())
            + f" ({time.perf_counter() - t0:.0f}s)")
        say(f"[{result.label}] ingest: the daemon consumes {srv.frames:,} frames")
        result.ingest = run_json("consume", str(db), srv.relay, str(srv.last_seq), timeout=3600)
        say(f"[{result.label}] ingest: {srv.frames / result.ingest['seconds']:,.0f} frames/s, "
            f"peak RSS {result.ingest['peak_rss'] / 1e6:.0f} MB ({result.ingest['seconds']:.1f}s)")
        say(f"[{result.label}] backfill: {len(srv.dids):,} repos, {srv.records:,} records")
        result.backfill = run_json("backfill", str(db), srv.pds, "4", *srv.dids, timeout=3600)
        summary = result.backfill["summary"]
        if summary["repos_failed"] or summary["records"]["added"] != srv.records:
            raise AssertionError(f"[{result.label}] backfill of {srv.records} records: {summary}")
        say(f"[{result.label}] backfill: {srv.records / result.backfill['seconds']:,.0f} records/s "
            f"({result.backfill['seconds']:.1f}s)")
        if extra is not None:
            say(f"[{result.label}] extra measurements (JSONBench)")
            result.extra = extra(db)
    return result


def _tmp_dir(cached: Path | None) -> str | None:
    """Copies go next to the cache (same filesystem, no /tmp size limit)."""
    return None if cached is None else str(cached.parent)


def rows_for(results: list[SizeResult], srv: Servers, *, smoke: bool) -> list[Row]:
    """The scale.* rows; `vs_empty` compares with the size-0 result when there is one."""
    targets = not smoke
    empty = next((r for r in results if r.n_records == 0), None)
    out: list[Row] = []
    for r in results:
        fps = srv.frames / r.ingest["seconds"]
        rps = srv.records / r.backfill["seconds"]
        out.append(Row(f"scale.ingest.frames_per_s.{r.label}", fps, "frames/s"))
        if empty is not None and r is not empty:
            out.append(Row.at_least(f"scale.ingest.vs_empty.{r.label}", fps / (srv.frames / empty.ingest["seconds"]),
                                    "x", 0.8 if targets else None))
        out.append(Row.at_most(f"scale.ingest.peak_rss_mb.{r.label}", r.ingest["peak_rss"] / 1e6, "MB",
                               500.0 if targets else None))
        out.append(Row(f"scale.backfill.records_per_s.{r.label}", rps, "records/s"))
        if empty is not None and r is not empty:
            out.append(Row.at_least(f"scale.backfill.vs_empty.{r.label}",
                                    rps / (srv.records / empty.backfill["seconds"]), "x", 0.8 if targets else None))
        if r.live_records:
            out.append(Row.at_most(f"scale.bytes_per_record.{r.label}", r.file_bytes / r.live_records, "B",
                                   100.0 if targets else None))
        for reason, seconds in r.gaps.items():
            out.append(Row.at_most(f"scale.gaps.{reason}.{r.label}", seconds, "s", 1.0 if targets else None))
        if r.build_seconds:
            out.append(Row(f"scale.build.seconds.{r.label}", r.build_seconds, "s"))
        out.extend(r.extra)
    return out
