"""`make fuzz`: thousands of mutated frames and CARs; every input must end in a counted error
or a correct effect, never a crash, hang or unbounded memory.

    python -m tests.fuzz [--frames N] [--cars N] [--seed S]
"""

from __future__ import annotations

import argparse
import sys
import time

from . import cars, frames


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument("--frames", type=int, default=20_000, help="mutated frames to try")
    parser.add_argument("--cars", type=int, default=3_000, help="mutated CARs to try")
    parser.add_argument("--seed", type=int, default=int(time.time()), help="random seed (printed, to replay a run)")
    args = parser.parse_args(argv)
    print(f"fuzz seed {args.seed}", flush=True)
    failed = False
    for name, target, n in (("frames", frames, args.frames), ("cars", cars, args.cars)):
        started = time.perf_counter()
        stats = target.run(n, args.seed)
        elapsed = time.perf_counter() - started
        print(f"\n{name}: {n} inputs in {elapsed:.1f} s", flush=True)
        for key, value in sorted(stats.items(), key=lambda kv: str(kv[0])):
            print(f"  {key}: {value}")
        failed = failed or bool(stats.get("failures"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
