"""The ad-hoc commands (`skyfill status|gaps|backfill`): through a running daemon when one holds
the database (DuckDB lets one process write a file), on the file itself otherwise.

A lake (`--db ducklake:...`) has many writers and readers: `status` reads it directly even while a
daemon writes it, and opening it proves nothing about a daemon's announcement (so it stays).

Each takes configs already built from the user's options. `daemon_options` are the backfill
options the user set explicitly (a flat mapping, `skyfill.backfill.config.OPTIONS` names): only
those go to a running daemon, whose own settings fill in the rest.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

from skyfill.backfill.backfiller import BackfillSummary
from skyfill.backfill.config import BackfillConfig
from skyfill.errors import ConfigError, SkyfillError, StorageError
from skyfill.storage import Store, schema_version_of
from skyfill.storage.lake import is_lake
from skyfill.storage.status import status_report

from .daemon_client import call_daemon, find_daemon, remove_announcement
from .jobs import run_backfill, run_gaps
from .network import run_discover, run_identities_sync
from .status_html import page_html

__all__ = ["open_store", "status", "status_html", "gaps", "backfill", "migrate", "compact", "discover", "identities_sync"]


def open_store(db: str) -> Store:
    """Open `db` for writing; holding it proves any daemon announcement beside it stale."""
    store = Store(db)
    if is_lake(db):  # any number of processes open a lake: a daemon may well be writing it
        return store
    try:
        remove_announcement(db)
    except SkyfillError:
        store.close()
        raise
    return store


def status(db: str) -> dict[str, Any]:
    """Cursor, lag, repos by state, records by collection (`storage.status.status_report`)."""
    daemon = None if is_lake(db) else find_daemon(db)
    if daemon is not None:
        return call_daemon(daemon, "/status", timeout=30)
    with Store(db, read_only=True) as store:
        if not is_lake(db):
            remove_announcement(db)  # we hold the file: an announcement beside it is stale
        try:
            return status_report(store)
        except StorageError as exc:
            raise StorageError(f"cannot read {db}: {exc}") from exc.__cause__


def status_html(db: str, *, since: str | None = None, until: str | None = None) -> str:
    """The status page (status_html.py) for [since, until] (default: the last 24 h): from the running
    daemon when one holds `db` (with its ingest history), else from the file."""
    query = {k: v for k, v in (("since", since), ("until", until)) if v}
    daemon = find_daemon(db)
    if daemon is not None:
        return str(call_daemon(daemon, "/status/page", query, timeout=60)["html"])
    with Store(db, read_only=True) as store:
        remove_announcement(db)
        try:
            return asyncio.run(page_html(store, query, source=db))
        except StorageError as exc:
            raise StorageError(f"cannot read {db}: {exc}") from exc.__cause__


def migrate(db: str) -> dict[str, Any]:
    """Open `db` for writing, which migrates an older layout (storage/migrate.py)."""
    with open_store(db) as store:
        return {"db": db, "schema_version": schema_version_of(store)}


def compact(db: str, *, full: bool = False, retention_seconds: float = 86400.0) -> dict[str, Any]:
    """Fold the version logs into the bases now (a running daemon does it on its own); `full`
    also rewrites the base in key order (see `Store.compact`). On a lake, then DuckLake's file
    upkeep with `retention_seconds` (`Store.upkeep_lake`)."""
    with open_store(db) as store:
        compaction = store.compact(full=full)
        upkeep = store.upkeep_lake(retention_seconds=retention_seconds) if store.lake else None
    result = compaction.records
    report: dict[str, Any] = {"db": db, "log_rows": 0, "purges": 0, "seconds": 0.0} if result is None else {
        "db": db, "log_rows": result.log_rows, "purges": result.purges, "base_deleted": result.base_deleted,
        "base_inserted": result.base_inserted, "seconds": round(result.seconds, 3)}
    if store.lake:
        report["pruned"] = compaction.pruned
    if upkeep is not None:
        report.update(dataclasses.asdict(upkeep))
    return report


def gaps(
    db: str, *, start: str, end: str, window: tuple[datetime, datetime], config: BackfillConfig,
    daemon_options: Mapping[str, Any], audit: bool = True, explicit_dids: Sequence[str] = (),
    enqueue: str | None = None, kafka_bootstrap: str | None = None, discover_relay: str | None = None,
    collections: Sequence[str] = (),
) -> dict[str, Any]:
    """`jobs.run_gaps` for `window` (`start`/`end` as the user wrote them, for a daemon to parse)."""
    daemon = find_daemon(db)
    if daemon is not None and (discover_relay or collections):
        raise ConfigError("gaps --discover/--collections work on the file: stop `skyfill consume` first, "
                          "or run `skyfill discover` while it is stopped")
    if daemon is not None:  # the daemon holds the file: let it do the work
        return call_daemon(daemon, "/gaps", {
            "start": start, "end": end, "enqueue": enqueue, "kafka_bootstrap": kafka_bootstrap,
            "audit": audit, "dids": list(explicit_dids), **daemon_options,
        })
    lo, hi = window
    with open_store(db) as store:
        return asyncio.run(run_gaps(store, start=lo, end=hi, config=config, audit=audit,
                                    explicit_dids=explicit_dids, enqueue=enqueue or False,
                                    kafka_bootstrap=kafka_bootstrap, discover_relay=discover_relay,
                                    collections=collections))


def backfill(
    db: str, *, dids: Sequence[str] | Literal["all"] | None, from_queue: bool, config: BackfillConfig,
    daemon_options: Mapping[str, Any], kafka_bootstrap: str | None = None, progress: bool = False,
) -> BackfillSummary:
    """`jobs.run_backfill`; through a running daemon's writer (and its own Kafka publisher, if any)."""
    daemon = find_daemon(db)
    if daemon is not None and config.collections:
        raise ConfigError("backfill --collections works on the file: stop `skyfill consume` first")
    if daemon is not None:  # the daemon holds the file: reconcile through its writer
        data = call_daemon(daemon, "/backfill", {"dids": dids, "from_queue": from_queue, **daemon_options})
        return BackfillSummary.from_json(data)
    with open_store(db) as store:
        return asyncio.run(run_backfill(store, dids=dids, from_queue=from_queue, config=config, progress=progress,
                                        kafka_bootstrap=kafka_bootstrap))


def discover(
    db: str, *, relay: str, config: BackfillConfig, collections: Sequence[str] = (), restart: bool = False,
    host_concurrency: int = 16,
) -> dict[str, Any]:
    """`network.run_discover` on the file (discovery writes a lot: it needs the file to itself)."""
    with open_store(db) as store:
        summary = asyncio.run(run_discover(store, relay=relay, config=config, collections=collections,
                                           restart=restart, host_concurrency=host_concurrency))
    return summary.to_json()


def identities_sync(db: str, *, config: BackfillConfig, max_pages: int | None = None) -> dict[str, Any]:
    """`network.run_identities_sync` on the file."""
    with open_store(db) as store:
        summary = asyncio.run(run_identities_sync(store, config=config, max_pages=max_pages))
    return summary.to_json()
