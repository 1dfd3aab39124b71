"""`python -m bench.peer install`: install the pinned @atproto/sync peer into .cache/sync-peer."""

from __future__ import annotations

import sys
import time

from . import CACHE_DIR, install, installed


def main(argv: list[str]) -> int:
    if argv != ["install"]:
        print("usage: python -m bench.peer install", file=sys.stderr)
        return 2
    started = time.monotonic()
    fresh = installed() is None
    install()
    verb = "installed" if fresh else "already installed"
    print(f"@atproto/sync peer {verb} in {CACHE_DIR} ({time.monotonic() - started:.1f}s)")
    return 0


sys.exit(main(sys.argv[1:]))
