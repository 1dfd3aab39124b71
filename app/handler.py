"""`lambda_handler(event, context)`: the original pipeline's entry point, on skyfill's parts.

Events:
    {}                                                  backfill every DID the store knows
    {"mode": "backfill", "dids": "all" | "did1,did2" | ["did1", ...] | "did1",
     "start_date": "YYYY-MM-DD", "end_date": "YYYY-MM-DD"}      (dates optional: limit "all"
                                                         to DIDs active in that window)
    {"mode": "determine_dids_to_backfill", "start_date": ..., "end_date": ...}
                                                        run the gap detector and enqueue

Configuration comes only from the environment (this function is the boundary): SKYFILL_DB,
SKYFILL_PLC_URL, SKYFILL_ALLOW_PRIVATE_HOSTS, SKYFILL_CONCURRENCY, SKYFILL_PER_HOST_RPS,
SKYFILL_NO_VERIFY, SKYFILL_MAX_ATTEMPTS, SKYFILL_MAX_CAR_BYTES, SKYFILL_NO_AUDIT.

Returns {"status": "success", "mode": ..., ...counts} or {"status": "error", "message": ...};
never raises.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from skyfill.backfill.config import ALL, OPTIONS, BackfillConfig, backfill_config, parse_dids, parse_flag, parse_when
from skyfill.errors import ConfigError, SkyfillError
from skyfill.storage import Store

from .jobs import run_backfill, run_gaps
from .settings import DEFAULT_DB

__all__ = ["lambda_handler", "config_from_env"]

log = logging.getLogger(__name__)

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_MODES = ("backfill", "determine_dids_to_backfill")


def _env_name(option: str) -> str:
    return "SKYFILL_" + option.upper()


def config_from_env(env: Mapping[str, str]) -> BackfillConfig:
    """The backfiller's options from SKYFILL_<OPTION> variables (the CLI's names), through the
    same builder as every other source; an unset or empty variable keeps the default."""
    options = {name: env.get(_env_name(name)) for name in OPTIONS if name != "verify"}
    return backfill_config(options, text=True, label=_env_name)


def _date(event: Mapping[str, Any], key: str, *, required: bool) -> str | None:
    value = event.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{key} is required (YYYY-MM-DD)")
        return None
    if not isinstance(value, str) or not _DATE.match(value):
        raise ConfigError(f"{key} must be YYYY-MM-DD, got {value!r}")
    parse_when(value)  # a real calendar date
    return value


def lambda_handler(event: Any, context: Any) -> dict[str, Any]:
    mode: Any = None
    try:
        if event is None:
            event = {}
        if not isinstance(event, Mapping):
            raise ConfigError("the event must be a JSON object")
        mode = event.get("mode") or "backfill"
        if mode not in _MODES:
            raise ConfigError(f"unknown mode {mode!r}; expected one of {', '.join(_MODES)}")
        env = os.environ
        config = config_from_env(env)
        db = env.get("SKYFILL_DB") or DEFAULT_DB
        if mode == "determine_dids_to_backfill":
            start, end = _date(event, "start_date", required=True), _date(event, "end_date", required=True)
            assert start is not None and end is not None
            lo, hi = parse_when(start), parse_when(end, end_of_day=True)
            if hi < lo:
                raise ConfigError("end_date is before start_date")
            audit = not parse_flag(env.get("SKYFILL_NO_AUDIT", ""), "SKYFILL_NO_AUDIT")
            with Store(db) as store:
                result = asyncio.run(run_gaps(store, start=lo, end=hi, config=config, audit=audit, enqueue=True))
            return {"status": "success", "mode": mode, "total": result["total"], "counts": result["counts"],
                    "enqueued": result["enqueued"], "downtime": result["downtime"]}

        dids_value = event.get("dids", ALL)
        if not isinstance(dids_value, (str, list)):
            raise ConfigError("dids must be 'all', a comma-separated string, a list or one DID")
        dids = parse_dids(dids_value)
        start_s, end_s = _date(event, "start_date", required=False), _date(event, "end_date", required=False)
        lo = parse_when(start_s) if start_s else None
        hi = parse_when(end_s, end_of_day=True) if end_s else None
        if lo is not None and hi is not None and hi < lo:
            raise ConfigError("end_date is before start_date")
        with Store(db) as store:
            summary = asyncio.run(run_backfill(store, dids=dids, config=config, progress=False, start=lo, end=hi))
        return {"status": "success", "mode": mode, **summary.to_json()}
    except SkyfillError as exc:
        log.warning("lambda_handler failed", extra={"ctx": {"mode": mode, "error": str(exc)}})
        return {"status": "error", "message": str(exc)}
    except Exception as exc:  # the contract: never raise to the caller
        log.exception("lambda_handler crashed", extra={"ctx": {"mode": mode}})
        return {"status": "error", "message": f"internal error: {exc!r}"}
