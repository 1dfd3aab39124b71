"""Runs the chaos trials on one local network and prints the figures table."""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.chaos._harness import ChaosError
from tests.chaos.trials import FIXES_IN_FLIGHT, TRIALS, Context, TrialResult
from tests.support.network import LocalNetwork

__all__ = ["main", "run_trials", "table"]


def say(text: str = "") -> None:
    print(text, flush=True)


def run_trials(ctx: Context, names: Sequence[str],
               trials: dict[str, Callable[[Context], TrialResult]] = TRIALS) -> list[TrialResult]:
    results = []
    for name in names:
        say(f"== {name}{' (quick)' if ctx.quick else ''}")
        t0 = time.monotonic()
        try:
            res = trials[name](ctx)
        except ChaosError as exc:  # a condition never reached: a failure with its reason
            res = TrialResult(name)
            res.fail(str(exc))
        except Exception as exc:  # the trial itself broke: report it, keep running the others
            res = TrialResult(name)
            res.fail(f"trial error {type(exc).__name__}: {exc}")
            (ctx.workdir / f"{name}.traceback").write_text(traceback.format_exc())
        res.fix_elsewhere = FIXES_IN_FLIGHT.get(name)
        res.seconds = time.monotonic() - t0
        say(res.line())
        results.append(res)
    return results


def table(results: Sequence[TrialResult]) -> str:
    head = ("trial", "result", "kills", "restarts", "resume med s", "resume max s", "lost", "extra", "stale",
            "wrong rev", "seconds")
    rows = [head]
    resumes: list[float] = []
    totals = [0, 0, 0, 0, 0, 0]
    for r in results:
        v = r.verdict
        counts = (v.lost, v.extra, v.stale, v.wrong_rev) if v else None
        resumes += r.resumes
        totals[0] += r.kills
        totals[1] += r.restarts
        for i, n in enumerate(counts or (0, 0, 0, 0)):
            totals[2 + i] += n
        rows.append((
            r.name, r.status, str(r.kills), str(r.restarts),
            f"{statistics.median(r.resumes):.2f}" if r.resumes else "-",
            f"{max(r.resumes):.2f}" if r.resumes else "-",
            *((str(n) for n in counts) if counts else ("-",) * 4),
            f"{r.seconds:.0f}",
        ))
    failed = sum(r.status == "FAIL" for r in results)
    rows.append((
        "total", f"{failed} failed" if failed else "all pass", str(totals[0]), str(totals[1]),
        f"{statistics.median(resumes):.2f}" if resumes else "-", f"{max(resumes):.2f}" if resumes else "-",
        *(str(n) for n in totals[2:]), f"{sum(r.seconds for r in results):.0f}",
    ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, lines[1])
    return "\n".join(lines)


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer kills, shorter freezes")
    parser.add_argument("--only", action="append", default=[], metavar="TRIAL",
                        help=f"run only these trials ({', '.join(TRIALS)}); repeatable or comma-separated")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, databases)")
    args = parser.parse_args(list(argv))
    names = [n.strip() for arg in args.only for n in arg.split(",") if n.strip()] or list(TRIALS)
    unknown = [n for n in names if n not in TRIALS]
    if unknown:
        parser.error(f"unknown trial(s) {', '.join(unknown)}; choose from {', '.join(TRIALS)}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    workdir = Path(tempfile.mkdtemp(prefix="skyfill-chaos-"))
    say(f"chaos: seed {seed}, work directory {workdir}{' (kept)' if args.keep else ''}")
    t0 = time.monotonic()
    with LocalNetwork() as net, net.client() as client:
        say(f"   PDS {net.pds_url}   PLC {net.plc_url}   (ready in {net.start_seconds:.1f} s)")
        ctx = Context(net=net, client=client, workdir=workdir, rng=random.Random(seed), quick=args.quick)
        results = run_trials(ctx, names)
    say()
    say(table(results))
    say(f"\nchaos: {time.monotonic() - t0:.0f} s, seed {seed}")
    for r in results:
        if r.status == "FAIL" and r.fix_elsewhere:
            say(f"note: {r.name} failed; its fix is expected from branch {r.fix_elsewhere}")
    failed = any(r.status == "FAIL" for r in results)
    if args.keep or failed:
        say(f"logs and databases kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0
