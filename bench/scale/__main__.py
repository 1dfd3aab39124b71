"""`python -m bench.scale [--smoke] [--sizes 0,10m,100m] [--out PATH]`: the mirror at network scale.

For each size (records already in the store: 0 = an empty file), in one run and side by side:
the daemon ingesting the same firehose frames, a fresh backfill of the same generated repos,
bytes per live record and `detect_gaps` per reason (see measure.py); the JSONBench queries at
10M (bench/scale/jsonbench.py). Stores are built once (build.py) and cached under .cache/scale/.
Then the lake rows (bench/scale/lake.py): one and two `skyfill sink` processes into one DuckLake
(PostgreSQL catalog) and one into a DuckDB file, the same `--lake-records` pre-published records.
`--smoke` runs everything at tiny sizes in a couple of minutes (tests/test_bench_scale.py);
`--build-only` builds the cached stores and stops.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import duckdb

from bench.harness import Context, Row, Sizes, render, write_results
from bench.progress import HEARTBEAT_EVERY, running, set_every, step
from skyfill.storage import Store

from .build import CACHE_DIR, ensure_store, label
from .measure import Plan, SizeResult, measure_size, rows_for, servers

from . import jsonbench
from .lake import lake_rows, measure_lake

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "scale.json"
DEFAULT_SIZES = "0,10m,100m"
SMOKE_SIZES = "0,20k"
JSONBENCH_SIZE = 10_000_000
JSONBENCH_Q_TARGET_S = 0.5
JSONBENCH_SPEEDUP_TARGET = 5.0
SMOKE_POOL = 5_000
DEFAULT_LAKE_RECORDS = "1m"
SMOKE_LAKE_RECORDS = "5k"


def parse_size(text: str) -> int:
    text = text.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def _jsonbench_rows(db: Path, *, smoke: bool, say: Callable[[str], None] = print) -> list[Row]:
    """JSONBench's five queries on the mirror (seconds, best of 3) and the smallest speed-up over
    the same queries on a one-JSON-column table of the same records (built inside the copy; its
    queries run once: 20-60 s each at 10M, best of 3 would triple the bench).

    The copy is compacted first (not measured): a user's steady state is a compacted store, the
    background compaction folding the logs whenever they pass their threshold."""
    with Store(db) as store:
        done = store.compact()
    say(f"compacted the copy before JSONBench: {done}")
    with duckdb.connect(str(db)) as con:
        out = jsonbench.run(con, json_repeats=1)
    rows = [Row.at_most(f"scale.jsonbench.{q}", s, "s", None if smoke else JSONBENCH_Q_TARGET_S)
            for q, s in out["mirror"].items()]
    rows += [Row(f"scale.jsonbench.json.{q}", s, "s") for q, s in out["json"].items()]
    rows.append(Row.at_least("scale.jsonbench.vs_json", out["min_speedup"], "x",
                             None if smoke else JSONBENCH_SPEEDUP_TARGET))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes ({SMOKE_SIZES}); about two minutes")
    parser.add_argument("--sizes", help=f"records in the store per run (default {DEFAULT_SIZES})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=CACHE_DIR, help="where built stores are kept")
    parser.add_argument("--lake-records", help=f"records the sinks write into the lake and the file "
                        f"(default {DEFAULT_LAKE_RECORDS}, smoke {SMOKE_LAKE_RECORDS}; 0: no lake rows)")
    parser.add_argument("--lake-only", action="store_true", help="only the lake rows (no sizes, no servers)")
    parser.add_argument("--build-only", action="store_true", help="build (or keep) the cached stores, measure nothing")
    parser.add_argument("--progress-every", type=float, default=HEARTBEAT_EVERY, metavar="SECONDS",
                        help="seconds between the 'running' lines while a size is measured (stderr)")
    args = parser.parse_args(argv)
    sizes = [] if args.lake_only else [
        parse_size(s) for s in (args.sizes or (SMOKE_SIZES if args.smoke else DEFAULT_SIZES)).split(",")]
    say = step  # progress lines on stderr, [elapsed] first; the heartbeat names the latest (bench/progress.py)
    set_every(args.progress_every)
    pool = {"pool_size": SMOKE_POOL} if args.smoke else {}
    if args.build_only:
        for n in sizes:
            if n:
                with running(f"build {label(n)}"):
                    built = ensure_store(n, cache_dir=args.cache, progress=say, **pool)
                say(f"{built.path}: {built.records:,} records, {built.path.stat().st_size / 1e9:.2f} GB, "
                    + ("cached" if built.cached else f"built in {built.seconds:.0f}s"))
        return 0
    plan = Plan.for_run(smoke=args.smoke, seed=args.seed)
    jsonbench_at = min(sizes, key=lambda n: abs(n - (sizes[-1] if args.smoke else JSONBENCH_SIZE)), default=0)
    results: list[SizeResult] = []
    errors: list[str] = []
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="skyfill-scale-") as tmp, ExitStack() as stack:
        srv = stack.enter_context(servers(plan, Path(tmp), say)) if sizes else None
        for n in sizes:
            assert srv is not None
            result = SizeResult(label(n), n)
            try:
                with running(f"size {result.label}"):
                    cached = None
                    if n:
                        built = ensure_store(n, cache_dir=args.cache, progress=say, **pool)
                        result.build_seconds = built.seconds
                        cached = built.path
                        say(f"[{result.label}] store {'cached' if built.cached else 'built'}: {built.path}")
                    extra: Callable[[Path], list[Row]] | None = None
                    if n and n == jsonbench_at:
                        extra = partial(_jsonbench_rows, smoke=args.smoke, say=say)
                    results.append(measure_size(result, cached, srv, say, extra))
            except Exception as exc:  # report and go on with the other sizes
                errors.append(f"size {result.label}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
                rows.append(Row(f"scale.{result.label}.error", math.nan, "", None, False))
                say(f"[{result.label}] FAILED: {type(exc).__name__}: {exc}")
        if srv is not None:
            rows = rows_for(results, srv, smoke=args.smoke) + rows
    lake_n = parse_size(args.lake_records or (SMOKE_LAKE_RECORDS if args.smoke else DEFAULT_LAKE_RECORDS))
    if lake_n:
        try:
            with running(f"lake {label(lake_n)}"):
                rows += lake_rows(measure_lake(lake_n, say))
        except Exception as exc:  # report and keep the other rows
            errors.append(f"lake: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            rows.append(Row("lake.error", math.nan, "", None, False))
            say(f"[lake] FAILED: {type(exc).__name__}: {exc}")
    say("done")
    ctx = Context(sizes=Sizes.for_run(smoke=args.smoke), seed=args.seed)
    render(rows, title="skyfill bench-scale" + (" (smoke)" if args.smoke else ""))
    write_results(args.out, rows, ctx, errors)
    for err in errors:
        print(err, file=sys.stderr)
    print(f"results: {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
