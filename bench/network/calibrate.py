"""Only the calibration of `python -m bench.network`: ms per repo and µs per record, and the projection.

    .venv/bin/python -m bench.network.calibrate [--repos 200] [--hosts 8] [--per-host-rps 100000]

The calibration measures the client and its store, not a pacer: its hosts publish no limit, so
the client is told a per-host rate no run reaches, over several hosts (4 repos in flight each).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .projection import Calibration, project
from .run import RunResult, run_pipeline
from .sim import OPEN, NetworkSpec, SimNetwork

NETWORK_MEAN_RECORDS = 375
UNPACED_HOSTS = 8
UNPACED_RPS = 100_000.0


def calibration_run(workdir: Path, repos: int, fixed: int | None, seed: int, *,
                    hosts: int = UNPACED_HOSTS, per_host_rps: float = UNPACED_RPS) -> RunResult:
    """One backfill of `repos` repos (`fixed` records each, else the size mix) from unlimited hosts."""
    spec = NetworkSpec((OPEN,) * hosts, repos, seed=seed, fixed_records=fixed)
    with SimNetwork(spec).running() as net:
        return run_pipeline(net, workdir, per_host_rps=per_host_rps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.network.calibrate")
    parser.add_argument("--repos", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hosts", type=int, default=UNPACED_HOSTS, help="unlimited hosts (each gets 4 repos in flight)")
    parser.add_argument("--per-host-rps", type=float, default=UNPACED_RPS,
                        help="the client's pace per host (the hosts publish no policy, so the client paces them "
                             "at this rate: 10/s would bound the calibration at ~105 ms/repo)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-cal-") as tmp:
        work = Path(tmp)
        runs = [calibration_run(work, n, fixed, seed, hosts=args.hosts, per_host_rps=args.per_host_rps)
                for n, fixed, seed in ((args.repos, None, args.seed),
                                       (max(5, args.repos // 5), NETWORK_MEAN_RECORDS, args.seed + 7))]
    mix, big = runs
    for label, r in (("mix", mix), ("mean", big)):
        print(f"{label}: {r.repos} repos, {r.records} records, backfill {r.backfill_s:.2f} s "
              f"({r.backfill_s / r.repos * 1e3:.1f} ms/repo), ok {r.repos_ok}, mismatches {r.mirror_mismatches}")
    cal = Calibration.fit((mix.records / mix.repos, mix.backfill_s / mix.repos),
                          (NETWORK_MEAN_RECORDS, big.backfill_s / big.repos), listings_per_s=20_661,
                          identities_per_s=2_708)
    p = project(cal)
    print(f"calibration: {cal.s_per_repo * 1e3:.1f} ms per repo + {cal.s_per_record * 1e6:.1f} µs per record")
    print(f"projection (listings 20,661/s, identities 2,708/s as measured): client-bound {p.client_bound_s / 3600:,.0f} h,"
          f" total {p.total_s / 3600:,.0f} h, bound: {p.bound}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
