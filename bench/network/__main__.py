"""`python -m bench.network [--smoke] [--small H:REPOS] [--large H:REPOS] [--out PATH]` (make bench-network).

1. Calibration: the real backfill against ONE unlimited simulated host, twice (repos of the
   simulated size mix; repos of the network's mean size, 375 records): the client's seconds per
   repo and per record (bench/network/projection.py).
2. Two simulated networks (small, large: H hosts, one in four reference-like, the rest
   bsky-like): discover -> identities sync -> gaps -> backfill --from-queue, each a `skyfill`
   process (bench/network/run.py), rows per phase; the simulator counts requests beyond a limit.
3. The formula (projection.py) predicts each network's backfill time; the measured/predicted
   ratio is `network.formula_check.<size>`. Then the full network's projection (40M repos, 15B
   records, ~100 hosts at 10 getRepo/s), with what bounds it.
Rows go to bench/results/network.json in the {name, value, unit, target, ok} shape.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from bench.harness import Row, render
from bench.progress import HEARTBEAT_EVERY, running, set_every
from tests.support.kafka import KafkaBroker

from .calibrate import calibration_run
from .kafka_mode import KafkaResult, run_kafka
from .projection import (
    FULL_NETWORK,
    Calibration,
    predict_backfill,
    project,
    project_kafka,
)
from .run import RunResult, run_listing, run_pipeline
from .sim import BSKY, NetworkSpec, SimNetwork

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "network.json"
NETWORK_MEAN_RECORDS = 375          # 15B records / 40M repos
EFFICIENCY_TARGET = 0.9
HOURS_TARGET = 12.0


def _size(text: str) -> tuple[int, int]:
    hosts, repos = text.split(":")
    return int(hosts), int(repos)


def _measure(workdir: Path, hosts: int, repos: int, seed: int) -> RunResult:
    with SimNetwork(NetworkSpec.mixed(hosts, repos, seed=seed)).running() as net:
        return run_pipeline(net, workdir)


def _phase_rows(label: str, r: RunResult) -> list[Row]:
    return [
        Row(f"network.discover.listings_per_s.{label}", r.listings_per_s, "listings/s"),
        Row(f"network.discover.seconds.{label}", r.times.discover, "s"),
        Row(f"network.identities.per_s.{label}", r.identities_per_s, "identities/s"),
        Row(f"network.identities.seconds.{label}", r.times.identities, "s"),
        Row(f"network.gaps.seconds.{label}", r.times.gaps, "s"),
        Row(f"network.backfill.seconds.{label}", r.times.backfill, "s"),
        Row(f"network.backfill.get_repo_per_s.{label}", r.get_repo_per_s, "getRepo/s"),
        Row(f"network.backfill.records_per_s.{label}", r.records_per_s, "records/s"),
        Row.at_least(f"network.efficiency.{label}", r.get_repo_per_s / r.sum_limits, "ratio", None),
        Row.at_most(f"network.mirror_mismatches.{label}", r.mirror_mismatches, "DIDs", 0),
        Row.at_most(f"network.max_host_get_repo_per_s.{label}", r.max_host_per_s, "getRepo/s", 10),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.network", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the test), no targets")
    parser.add_argument("--small", type=_size, default=None, help="HOSTS:REPOS (default 8:400)")
    parser.add_argument("--large", type=_size, default=None, help="HOSTS:REPOS (default 16:800)")
    parser.add_argument("--calibrate", type=int, default=None, help="repos per calibration run (default 200)")
    parser.add_argument("--kafka-workers", default=None,
                        help="worker counts of the Kafka mode on the small network, e.g. 1,2 ('' = skip; "
                             "default 1,2, none with --smoke)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--progress-every", type=float, default=HEARTBEAT_EVERY, metavar="SECONDS",
                        help="seconds between the 'running' lines inside a step (stderr)")
    args = parser.parse_args(argv)
    set_every(args.progress_every)
    smoke = args.smoke
    small = args.small or ((2, 12) if smoke else (8, 400))
    large = args.large or ((3, 24) if smoke else (16, 800))
    n_cal = args.calibrate or (10 if smoke else 200)
    mean_n = 40 if smoke else NETWORK_MEAN_RECORDS
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-network-") as tmp:
        work = Path(tmp)
        with running(f"calibration: {n_cal} repos of the size mix, {max(5, n_cal // 5)} of {mean_n} records"):
            cal_mix = calibration_run(work, n_cal, None, args.seed)
            cal_big = calibration_run(work, max(5, n_cal // 5), mean_n, args.seed + 7)
        n_list = 500 if smoke else 20_000
        with (running(f"listing calibration: discover + identities sync of {n_list} repos"),
              SimNetwork(NetworkSpec((BSKY,) * 4, n_list, seed=args.seed + 9, fixed_records=1)).running() as net):
            listings_per_s, identities_per_s = run_listing(net, work)
        runs: dict[str, RunResult] = {}
        for label, (hosts, repos) in (("small", small), ("large", large)):
            with running(f"{label}: {hosts} hosts, {repos} repos"):
                runs[label] = _measure(work, hosts, repos, args.seed + (0 if label == "small" else 1))
        kafka_counts = [int(n) for n in (args.kafka_workers if args.kafka_workers is not None
                                         else ("" if smoke else "1,2")).split(",") if n]
        kafka: dict[int, KafkaResult] = {}
        for n in kafka_counts:
            with (running(f"kafka: {n} worker(s) + sink, {small[0]} hosts, {small[1]} repos"),
                  SimNetwork(NetworkSpec.mixed(*small, seed=args.seed)).running() as net,
                  KafkaBroker() as broker):
                kafka[n] = run_kafka(net, work, broker.bootstrap, workers=n)
    cal = Calibration.fit(
        (cal_mix.records / cal_mix.repos, cal_mix.backfill_s / cal_mix.repos),
        (mean_n, cal_big.backfill_s / cal_big.repos),
        listings_per_s=listings_per_s, identities_per_s=identities_per_s,
    )
    rows = [
        Row("network.calibration.ms_per_repo", cal.s_per_repo * 1e3, "ms"),
        Row("network.calibration.us_per_record", cal.s_per_record * 1e6, "µs"),
        Row("network.calibration.get_repo_per_s", cal_mix.get_repo_per_s, "getRepo/s"),
        Row("network.calibration.listings_per_s", listings_per_s, "listings/s"),
        Row("network.calibration.identities_per_s", identities_per_s, "identities/s"),
    ]
    checks = {}
    for label, r in runs.items():
        rows += _phase_rows(label, r)
        predicted = predict_backfill(cal, repos=r.repos, records=r.records, host_bound_s=r.host_bound_s)
        checks[label] = {"measured_s": r.backfill_s, "predicted_s": predicted, "host_bound_s": r.host_bound_s,
                         "client_bound_s": cal.client_seconds(r.repos, r.records)}
        rows.append(Row(f"network.formula_check.{label}", r.backfill_s / predicted if predicted else math.nan,
                        "measured/predicted"))
    big = runs["large"]
    target = None if smoke else EFFICIENCY_TARGET
    rows += [
        Row.at_least("network.efficiency", big.get_repo_per_s / big.sum_limits, "ratio", target),
        Row.at_most("network.over_limit_requests", sum(r.over_limit for r in runs.values())
                    + cal_mix.over_limit + cal_big.over_limit, "requests", 0),
        Row("network.peak_rss_mb", max(r.peak_rss_mb for r in runs.values()), "MB"),
    ]
    single = project(cal)
    rows += [
        Row("network.projected_hours.host_bound", single.host_bound_s / 3600, "h"),
        Row("network.projected_hours.client_bound", single.client_bound_s / 3600, "h"),
        Row("network.projected_hours.discovery", single.discovery_s / 3600, "h"),
        Row("network.projected_hours.identities", single.identities_s / 3600, "h"),
        Row("network.projected_hours.single_process", single.total_s / 3600, "h"),
    ]
    p4 = single
    for n, k in kafka.items():
        rows += [
            Row(f"network.kafka.workers_{n}.repos_per_s", k.repos_per_s, "repos/s"),
            Row(f"network.kafka.workers_{n}.sink_records_per_s", k.sink_records_per_s, "records/s"),
            Row.at_most(f"network.kafka.workers_{n}.over_limit_requests", k.over_limit, "requests", 0),
            Row.at_most(f"network.kafka.workers_{n}.mirror_mismatches", k.mirror_mismatches, "DIDs", 0),
            Row(f"network.kafka.workers_{n}.peak_rss_mb", k.peak_rss_mb, "MB"),
        ]
    if 1 in kafka:
        # one worker's cost per repo (its working store + publishing), divided over 4 workers;
        # the sink's records/s (its wall time, start-up included) bounds the mirror's side
        k1 = kafka[1]
        worker_s_per_repo = k1.workers_s / k1.repos
        p4 = project_kafka(cal, worker_s_per_repo=worker_s_per_repo, sink_records_per_s=k1.sink_records_per_s,
                           workers=4)
        rows += [Row("network.projected_hours.kafka.workers_bound", p4.client_bound_s / 3600, "h"),
                 Row("network.projected_hours.kafka.sink_bound", p4.sink_bound_s / 3600, "h")]
    rows.append(Row.at_most("network.projected_hours.workers_4", p4.total_s / 3600, "h",
                            None if smoke else HOURS_TARGET))
    if smoke:
        rows = [Row(r.name, r.value, r.unit) for r in rows]
    elapsed = time.perf_counter() - started
    render(rows, title=f"bench-network ({elapsed / 60:.1f} min)")
    assumptions = (
        f"full network: {FULL_NETWORK.repos:.0f} repos, {FULL_NETWORK.records:.0f} records on {FULL_NETWORK.hosts} "
        f"hosts (evenly), each paced at {FULL_NETWORK.pace} getRepo/s (95% of 10/s); PLC export "
        f"{FULL_NETWORK.plc_operations:.0f} operations (one per DID, a lower bound); client costs measured here "
        f"(a = {cal.s_per_repo * 1e3:.1f} ms/repo, b = {cal.s_per_record * 1e6:.1f} µs/record, one store writer)"
    )
    print(assumptions)
    print(f"bound: {p4.bound}")
    for label, c in checks.items():
        print(f"formula check {label}: measured {c['measured_s']:.1f} s, predicted {c['predicted_s']:.1f} s "
              f"(host-bound {c['host_bound_s']:.1f} s, client-bound {c['client_bound_s']:.1f} s)")
    doc = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "smoke": smoke, "seed": args.seed, "python": platform.python_version(), "machine": platform.machine(),
        "elapsed_s": round(elapsed, 1),
        "sizes": {"small": {"hosts": small[0], "repos": small[1]}, "large": {"hosts": large[0], "repos": large[1]},
                  "calibration_repos": n_cal},
        "projection": {"assumptions": assumptions, "bound": p4.bound, "workers_4": asdict(p4),
                       "single_process": asdict(single), "checks": checks,
                       "calibration": asdict(cal)},
        "runs": {k: {"hosts": r.hosts, "repos": r.repos, "records": r.records, "times": asdict(r.times),
                     "over_limit": r.over_limit, "peak_rss_mb": r.peak_rss_mb, **r.details}
                 for k, r in {**runs, "calibration_mix": cal_mix, "calibration_mean": cal_big}.items()},
        "kafka": {n: asdict(k) for n, k in kafka.items()},
        "rows": [{**asdict(r), "value": None if math.isnan(r.value) else r.value} for r in rows],
        "errors": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
