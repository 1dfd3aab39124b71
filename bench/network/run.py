"""The real pipeline against a SimNetwork, as a user runs it: `skyfill` subprocesses.

    skyfill discover --relay SIM -> skyfill identities sync --plc-url SIM
      -> skyfill gaps --enqueue db (unseen) -> skyfill backfill --from-queue

Each phase is timed (wall time of the command, start-up included); the backfill's peak RSS is
its /proc VmHWM (polled; the high-water mark of that process image only). The getRepo rate is
taken from the simulator: getRepo answered / (last getRepo - first getRepo), which leaves the
process start-up out. At the end the mirror is compared with the simulated repos: every DID's
data root (the MST root the signed commit names) and record count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from bench.progress import step
from skyfill.net.ratelimit import PACE_MARGIN
from skyfill.protocol.car import cid_to_str

from .sim import SimNetwork

__all__ = [
    "WINDOW",
    "PhaseTimes",
    "RunResult",
    "mirror_mismatches",
    "run_command",
    "run_listing",
    "run_pipeline",
    "skyfill_bin",
    "vm_hwm",
]

WINDOW = ["--start", "2026-01-01", "--end", "2026-01-02", "--no-audit"]


def skyfill_bin() -> str:
    """The `skyfill` script next to this interpreter (the worktree's venv)."""
    return str(Path(sys.executable).with_name("skyfill"))


@dataclass(slots=True)
class PhaseTimes:
    discover: float = 0.0
    identities: float = 0.0
    gaps: float = 0.0
    backfill: float = 0.0


@dataclass(slots=True)
class RunResult:
    hosts: int
    repos: int
    records: int
    times: PhaseTimes
    listed: int
    identities: int
    enqueued: int
    repos_ok: int
    records_added: int
    get_repo: int                 # getRepo answered 200 or 4xx (429s excluded)
    get_window: float             # seconds from the first to the last getRepo
    over_limit: int               # requests beyond a host's limit, every phase
    max_host_per_s: int           # most getRepo one host answered in one wall-clock second
    peak_rss_mb: float
    mirror_mismatches: int        # DIDs whose stored data root or record count differs
    host_bound_s: float           # max over hosts of repos_on_host / its rate (the client's pace)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def backfill_s(self) -> float:
        """The backfill command's own elapsed time (its start-up excluded)."""
        return float(self.details["backfill_elapsed_s"])

    @property
    def get_repo_per_s(self) -> float:
        return self.get_repo / self.backfill_s if self.backfill_s > 0 else 0.0

    @property
    def sum_limits(self) -> float:
        return float(self.details["sum_limits"])

    @property
    def listings_per_s(self) -> float:
        """Listings stored per second of the discover command's own run (start-up excluded)."""
        return self.listed / max(1e-6, float(self.details["discover_elapsed_s"]))

    @property
    def identities_per_s(self) -> float:
        return self.identities / max(1e-6, float(self.details["identities_elapsed_s"]))

    @property
    def records_per_s(self) -> float:
        return self.records_added / self.backfill_s if self.backfill_s > 0 else 0.0


def run_command(args: list[str], *, timeout: float, rss: bool = False) -> tuple[float, dict[str, Any], float]:
    """(seconds, the --json answer, peak RSS MB) of one skyfill command."""
    env = {**os.environ, "SKYFILL_LOG_LEVEL": "warning"}
    step("skyfill " + " ".join(a for a in args[:2] if not a.startswith("-")))  # the heartbeat names it
    start = time.perf_counter()
    proc = subprocess.Popen([skyfill_bin(), "--log-level", "warning", *args, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    if rss:
        while proc.poll() is None:
            peak = max(peak, vm_hwm(proc.pid))
            time.sleep(0.2)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"skyfill {args[0]} timed out after {timeout:.0f} s: {err[-2000:]}") from None
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"skyfill {' '.join(args[:2])} exited {proc.returncode}: {err[-3000:]}")
    return seconds, json.loads(out), peak / 1024


def vm_hwm(pid: int) -> int:
    """VmHWM in KiB (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_pipeline(net: SimNetwork, workdir: Path, *, per_host_rps: float = 10.0, concurrency: int = 32,
                 timeout: float = 900.0) -> RunResult:
    """discover -> identities sync -> gaps --enqueue -> backfill --from-queue against `net` (running)."""
    db = str(workdir / f"network-{len(net.host_specs)}h-{len(net.repos)}.duckdb")
    common = ["--db", db, "--allow-private-hosts"]
    times = PhaseTimes()
    net.reset_counters()
    over = 0
    times.discover, disc, _ = run_command(["discover", "--relay", net.relay_url, "--per-host-rps", str(per_host_rps),
                                    *common], timeout=timeout)
    times.identities, ids, _ = run_command(["identities", "sync", "--plc-url", net.plc_url, *common], timeout=timeout)
    times.gaps, gaps, _ = run_command(["gaps", *WINDOW, "--enqueue", "db", *common], timeout=timeout)
    over += net.over_limit
    net.reset_counters()
    times.backfill, bf, rss = run_command(["backfill", "--from-queue", "--plc-url", net.plc_url, "--concurrency",
                                    str(concurrency), "--per-host-rps", str(per_host_rps), *common],
                                   timeout=timeout, rss=True)
    over += net.over_limit
    rates = [min(per_host_rps, PACE_MARGIN * s.rate) for s in net.host_specs]
    host_bound = max(net.repos_on(i) / rates[i] for i in range(len(rates)))
    mismatches = mirror_mismatches(net, db)
    return RunResult(
        hosts=len(net.host_specs), repos=len(net.repos), records=net.total_records, times=times,
        listed=int(disc.get("listed", 0)), identities=int(ids.get("stored", 0)),
        enqueued=int(gaps.get("enqueued", 0) or 0), repos_ok=int(bf.get("repos_ok", 0)),
        records_added=int(bf.get("records", {}).get("added", 0)), get_repo=net.get_repo_count(),
        get_window=max(0.0, net.last_get - net.first_get), over_limit=over, max_host_per_s=net.max_per_second(),
        peak_rss_mb=rss, mirror_mismatches=mismatches, host_bound_s=host_bound,
        details={"discover_elapsed_s": float(disc.get("elapsed", 0.0)),
                 "identities_elapsed_s": float(ids.get("elapsed", 0.0)), "sum_limits": sum(s.rate for s in net.host_specs), "client_rates": sum(rates),
                 "backfill_elapsed_s": float(bf.get("elapsed_s", 0.0)), "failed": bf.get("failed", {}),
                 "gaps_unseen": (gaps.get("counts") or {}).get("unseen")},
    )


def run_listing(net: SimNetwork, workdir: Path, *, timeout: float = 900.0) -> tuple[float, float]:
    """(listings/s, identities/s) of `discover` and `identities sync` alone, each by the command's
    own elapsed time: at a size where the per-run fixed costs no longer dominate."""
    db = str(workdir / f"listing-{len(net.repos)}.duckdb")
    common = ["--db", db, "--allow-private-hosts"]
    _, disc, _ = run_command(["discover", "--relay", net.relay_url, *common], timeout=timeout)
    _, ids, _ = run_command(["identities", "sync", "--plc-url", net.plc_url, *common], timeout=timeout)
    return (float(disc["listed"]) / max(1e-6, float(disc["elapsed"])),
            float(ids["stored"]) / max(1e-6, float(ids["elapsed"])))


def mirror_mismatches(net: SimNetwork, db: str) -> int:
    """DIDs whose stored data root or live record count differs from the simulated repo."""
    with duckdb.connect(db, read_only=True) as con:
        roots = dict(con.execute("SELECT did, data_cid FROM repos").fetchall())
        counts = dict(con.execute("SELECT did, count(*) FROM records GROUP BY did").fetchall())
    bad = 0
    for did, repo in net.repos.items():
        if roots.get(did) != cid_to_str(repo.template.data) or counts.get(did, 0) != repo.records:
            bad += 1
    return bad
