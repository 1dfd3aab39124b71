"""`python -m bench.scale.lake_sink OUT.json SINK-ARGS...`: `skyfill sink SINK-ARGS...` in this process.

The real command (the click group of `skyfill`, `sink` and its flags), run until SIGTERM; on the way
out it writes what only the process itself can count to OUT.json: the store's transaction retries
after a DuckLake conflict (skyfill_store_txn_retries_total), the messages the sink applied and
skipped, its CPU seconds (user + sys, getrusage) and its exit status. bench/scale/lake.py runs one
or two of these per lake.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

from skyfill import metrics
from skyfill.cli import main as skyfill_main

__all__ = ["main"]


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    return float(metrics.REGISTRY.get_sample_value(name, labels or {}) or 0.0)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    out, sink_args = Path(args[0]), args[1:]
    status, error = 0, None
    try:
        skyfill_main.main(args=["sink", *sink_args], prog_name="skyfill", standalone_mode=False)
    except SystemExit as exc:  # click's own exits (bad flags)
        status = exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # reported in OUT.json and by the exit status; the bench fails the run
        status, error = 1, f"{type(exc).__name__}: {exc}"
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.write_text(json.dumps({
        "status": status,
        "error": error,
        "retries": _sample("skyfill_store_txn_retries_total"),
        "applied": _sample("skyfill_kafka_sink_messages_total", {"result": "applied"}),
        "skipped": _sample("skyfill_kafka_sink_messages_total", {"result": "skipped"}),
        "cpu_user": usage.ru_utime,
        "cpu_sys": usage.ru_stime,
        "peak_rss": usage.ru_maxrss * 1024,
    }))
    return status


if __name__ == "__main__":
    sys.exit(main())
