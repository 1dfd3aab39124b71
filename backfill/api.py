"""JSON request bodies (the daemon's admin API, the CLI talking to it) -> the backfill cores.

A body carries the same options as the command line, as plain JSON values:
    gaps:      {"start", "end", "enqueue" (bool, "db" or "kafka"), "kafka_bootstrap", "audit", "dids",
                "plc_url", "allow_private_hosts"}
    backfill:  {"dids" | "from_queue", "concurrency", "per_host_rps", "verify", "max_car_bytes",
                "max_attempts", "plc_url", "allow_private_hosts"}
Absent options take the daemon's own settings.
"""

from __future__ import annotations

import asyncio
from typing import Any

from skyfill.errors import ConfigError
from storage import Store

from .backfiller import ReconcileSink, open_backfiller
from .cli import run_backfill, run_gaps
from .config import ALL, BackfillConfig, parse_dids, parse_window

__all__ = ["gaps_from_request", "backfill_from_request", "backfill_queue_once", "config_from_request"]

_CONFIG_KEYS = ("plc_url", "concurrency", "per_host_rps", "verify", "allow_private_hosts", "max_car_bytes",
                "max_attempts")


def config_from_request(body: dict[str, Any], *, plc_url: str, allow_private_hosts: bool) -> BackfillConfig:
    options: dict[str, Any] = {"plc_url": plc_url, "allow_private_hosts": allow_private_hosts}
    options.update({k: body[k] for k in _CONFIG_KEYS if body.get(k) is not None})
    try:
        return BackfillConfig(**options)
    except TypeError as exc:
        raise ConfigError(f"bad backfill options: {exc}") from exc


async def gaps_from_request(
    store: Store, body: dict[str, Any], *, plc_url: str, allow_private_hosts: bool
) -> dict[str, Any]:
    start, end = parse_window(str(body.get("start", "")), str(body.get("end", "")))
    explicit = parse_dids(body["dids"]) if body.get("dids") else []
    if explicit == ALL:
        raise ConfigError("dids=all makes no sense for gaps")
    config = config_from_request(body, plc_url=plc_url, allow_private_hosts=allow_private_hosts)
    return await run_gaps(store, start=start, end=end, config=config, audit=bool(body.get("audit", True)),
                          explicit_dids=explicit, enqueue=_enqueue(body.get("enqueue")),
                          kafka_bootstrap=body.get("kafka_bootstrap") or None)


def _enqueue(value: Any) -> bool | str:
    return value if isinstance(value, str) else bool(value)


async def backfill_from_request(
    store: Store, body: dict[str, Any], *, sink: ReconcileSink, plc_url: str, allow_private_hosts: bool
) -> dict[str, Any]:
    from_queue = bool(body.get("from_queue", False))
    dids = parse_dids(body["dids"]) if body.get("dids") is not None else None
    config = config_from_request(body, plc_url=plc_url, allow_private_hosts=allow_private_hosts)
    summary = await run_backfill(store, dids=dids, config=config, from_queue=from_queue, sink=sink, progress=False)
    return summary.to_json()


async def backfill_queue_once(
    store: Store, *, sink: ReconcileSink, plc_url: str, allow_private_hosts: bool
) -> dict[str, Any]:
    """One round of the daemon's own repair loop: queue every desynchronized DID, then work the queue."""
    desynced = await asyncio.to_thread(
        store.fetchall,
        "SELECT did FROM repos WHERE sync_state = 'desynchronized' AND active AND did NOT IN "
        "(SELECT did FROM backfill_queue WHERE state IN ('pending', 'in_progress'))",
    )
    if desynced:
        await asyncio.to_thread(store.enqueue, {d: ["desynchronized"] for (d,) in desynced})
    config = BackfillConfig(plc_url=plc_url, allow_private_hosts=allow_private_hosts)
    async with open_backfiller(store, config=config, sink=sink, progress=False) as bf:
        return (await bf.run_queue()).to_json()
