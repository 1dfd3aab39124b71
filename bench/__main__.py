"""`python -m bench [--smoke] [--seed N] [--out PATH] [parts...]`: run benchmark parts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .harness import Context, Sizes, discover, render, run_parts, write_results
from .progress import HEARTBEAT_EVERY, say, set_every

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"


def main(argv: list[str] | None = None) -> int:
    parts = discover()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"parts to run (default: all): {', '.join(parts)}")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; runs in seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--list", action="store_true", help="list the parts and exit")
    parser.add_argument("--progress-every", type=float, default=HEARTBEAT_EVERY, metavar="SECONDS",
                        help="seconds between the 'running' lines inside a part (stderr)")
    args = parser.parse_args(argv)
    set_every(args.progress_every)
    if args.list:
        print("\n".join(parts))
        return 0
    unknown = [p for p in args.parts if p not in parts]
    if unknown:
        parser.error(f"unknown part(s): {', '.join(unknown)}; known: {', '.join(parts)}")
    names = args.parts or list(parts)
    ctx = Context(sizes=Sizes.for_run(smoke=args.smoke), seed=args.seed)
    say(f"bench: {len(names)} part(s): {', '.join(names)}" + (" (smoke)" if args.smoke else ""))
    rows, errors = run_parts(names, ctx)
    render(rows, title="skyfill bench" + (" (smoke)" if args.smoke else ""))
    write_results(args.out, rows, ctx, errors)
    for err in errors:
        print(err, file=sys.stderr)
    print(f"results: {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
