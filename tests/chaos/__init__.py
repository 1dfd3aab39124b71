"""`make chaos`: fault trials of the real `skyfill consume` against the local reference PDS.

    python -m tests.chaos                 # every trial, full size (<= 15 min on 2 cores)
    python -m tests.chaos --quick         # fewer kills, shorter freezes
    python -m tests.chaos --only kill9    # one trial (repeatable, or comma-separated)

Trials (tests/chaos/trials.py): kill9, relay_freeze, broker_freeze, disk_full,
concurrent_backfills. Each prints one line of figures; the runner prints a final table and exits
non-zero if any trial failed (any record lost, extra or stale counts as a failure).
Not part of `make test`; tests/test_chaos_smoke.py runs one kill so this cannot rot.
"""

from tests.chaos.runner import main, run_trials, table
from tests.chaos.trials import TRIALS, Context, TrialResult, kill9

__all__ = ["TRIALS", "Context", "TrialResult", "kill9", "main", "run_trials", "table"]
