"""The one-shot jobs: gap detection, a backfill, the daemon's repair round, the Kafka sink and
backfill worker. Plain async functions over a Store and frozen configs, so the CLI, the daemon's
admin API, `lambda_handler`, benchmarks and tests all call exactly the same code.

These live in the application layer because they join siblings: a backfill that publishes to Kafka
(skyfill.publish) or enqueues requests there; skyfill.backfill itself never imports skyfill.publish.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Literal

from skyfill.backfill.backfiller import (
    BackfillSummary,
    Reconciler,
    StoreReconciler,
    open_backfiller,
    recover_queue,
)
from skyfill.backfill.config import ALL, BackfillConfig
from skyfill.backfill.gaps import PdsAuditor, detect_gaps
from skyfill.errors import ConfigError
from skyfill.publish import BackfillWorker, KafkaPublisher, Sink, SinkStats, Topics, backfill_one_from, enqueue_backfill
from skyfill.storage import Store
from skyfill.storage.queries import not_terminal

from .network import run_discover

__all__ = [
    "run_gaps",
    "run_backfill",
    "all_dids",
    "backfill_queue_once",
    "run_sink",
    "run_backfill_worker",
    "stop_on_signals",
]


async def run_gaps(
    store: Store,
    *,
    start: datetime,
    end: datetime,
    config: BackfillConfig,
    audit: bool = True,
    explicit_dids: Iterable[str] = (),
    enqueue: bool | str = False,
    kafka_bootstrap: str | None = None,
    discover_relay: str | None = None,
    collections: Sequence[str] = (),
) -> dict[str, Any]:
    """Detect gaps for [start, end]; with `enqueue`, queue them for a backfill.

    `discover_relay`: enumerate the repos of that relay (or single PDS) first (`skyfill discover`),
    so `unseen` and `stale` cover the network; `collections`: what the mirror should hold now
    (`filter_changed`).

    `enqueue`: False/None (report only), True or "db" (the DuckDB queue, idempotent: `enqueued`
    counts new rows), "kafka" (one request per DID on skyfill.backfill at `kafka_bootstrap`, for
    `skyfill backfill-worker`s: `enqueued` counts acknowledged requests).
    Returns the report as JSON-ready data: counts per reason, downtime stretches, DIDs with
    their reasons, and `enqueued` (None without `enqueue`).
    """
    mode = _enqueue_mode(enqueue)
    if mode == "kafka" and not kafka_bootstrap:
        raise ConfigError("--enqueue kafka needs --kafka-bootstrap")
    discovery = await run_discover(store, relay=discover_relay, config=config) if discover_relay else None
    if audit:
        async with open_backfiller(store, config=config, progress=False) as bf:
            auditor = PdsAuditor(bf.client, bf.resolver)
            report = await detect_gaps(store, start=start, end=end, audit=auditor, explicit_dids=explicit_dids,
                                       collections=collections)
    else:
        report = await detect_gaps(store, start=start, end=end, audit=None, explicit_dids=explicit_dids,
                                   collections=collections)
    out = report.to_json(with_dids=True)
    if discovery is not None:
        out["discovery"] = discovery.to_json()
    if mode == "kafka":
        assert kafka_bootstrap is not None
        out["enqueued"] = await enqueue_backfill(kafka_bootstrap, report.reasons_by_did,
                                                 hosts=await asyncio.to_thread(store.known_pds, list(report.reasons_by_did)))
    elif mode == "db":
        out["enqueued"] = await asyncio.to_thread(store.enqueue, report.reasons_by_did)
    else:
        out["enqueued"] = None
    return out


def _enqueue_mode(enqueue: bool | str | None) -> str | None:
    if enqueue is True:
        return "db"
    if enqueue in (False, None, ""):
        return None
    if enqueue not in ("db", "kafka"):
        raise ConfigError(f"enqueue must be db or kafka, not {enqueue!r}")
    return str(enqueue)


def all_dids(store: Store, *, start: datetime | None = None, end: datetime | None = None) -> list[str]:
    """Every DID the store knows, minus terminal outcomes (naming one explicitly retries it);
    with a window, only DIDs active in it (first seen by `end`, last event at or after `start`)."""
    sql = f"SELECT did FROM repos WHERE {not_terminal()}"
    params: list[Any] = []
    if start is not None:
        sql += " AND last_event_at >= ?"
        params.append(start)
    if end is not None:
        sql += " AND first_seen_at <= ?"
        params.append(end)
    return [r[0] for r in store.fetchall(sql + " ORDER BY did", params)]


async def run_backfill(
    store: Store,
    *,
    dids: Sequence[str] | Literal["all"] | None,
    config: BackfillConfig,
    from_queue: bool = False,
    sink: Reconciler | None = None,
    progress: bool | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    kafka_bootstrap: str | None = None,
) -> BackfillSummary:
    """Backfill the named DIDs, every known DID (`"all"`, optionally limited to a window), or the queue.

    With `kafka_bootstrap` (and no `sink`), every reconciliation's changes are published
    (`source: backfill`) and acknowledged before the local transaction commits.
    """
    if from_queue == (dids is not None):
        raise ConfigError("give either DIDs or from_queue")
    if kafka_bootstrap is not None and sink is None:
        async with KafkaPublisher(kafka_bootstrap) as publisher:
            sink = StoreReconciler(store, publish=publisher.publish, collections=config.collections)
            return await run_backfill(store, dids=dids, config=config, from_queue=from_queue, sink=sink,
                                      progress=progress, start=start, end=end)
    async with open_backfiller(store, config=config, sink=sink, progress=progress) as bf:
        if from_queue:
            await asyncio.to_thread(recover_queue, store)
            return await bf.run_queue()
        assert dids is not None
        targets = await asyncio.to_thread(all_dids, store, start=start, end=end) if dids == ALL else list(dids)
        return await bf.run(targets)


async def backfill_queue_once(store: Store, *, sink: Reconciler, config: BackfillConfig) -> BackfillSummary:
    """One round of the daemon's own repair loop: queue every desynchronized DID, then work the queue."""
    desynced = await asyncio.to_thread(store.unqueued_desynchronized)
    if desynced:
        await asyncio.to_thread(store.enqueue, {d: ["desynchronized"] for d in desynced})
    async with open_backfiller(store, config=config, sink=sink, progress=False) as bf:
        return await bf.run_queue()


# -- Kafka consumers -------------------------------------------------------------------------------


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT/SIGTERM (on the running loop): the current step finishes and commits."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run_sink(
    db: str, bootstrap: str, *, group_id: str, topics: Topics, exit_when_idle: bool = False,
    stop: asyncio.Event | None = None,
) -> SinkStats:
    """Build the DuckDB mirror `db` from the skyfill topics alone (`skyfill sink`); without `stop`,
    until SIGINT/SIGTERM."""
    stop = stop or stop_on_signals()
    with Store(db) as store:
        async with Sink(store, bootstrap, group_id=group_id, topics=topics) as sink:
            return await sink.run(stop=stop, exit_when_idle=exit_when_idle)


async def run_backfill_worker(
    db: str, bootstrap: str, *, config: BackfillConfig, topic: str, group_id: str, topics: Topics,
    exit_when_idle: bool = False, stop: asyncio.Event | None = None,
) -> int:
    """Join the backfill consumer group (`skyfill backfill-worker`); returns the requests done.
    Results go to `topics` as whole-repo snapshots; `db` is the worker's working store. Without
    `stop`, until SIGINT/SIGTERM."""
    stop = stop or stop_on_signals()
    with Store(db) as store:
        async with KafkaPublisher(bootstrap, records_topic=topics.records, repos_topic=topics.repos) as publisher:
            sink = StoreReconciler(store, publish=publisher.publish, snapshot=True)
            async with open_backfiller(store, config=config, sink=sink, progress=False) as backfiller:
                worker = BackfillWorker(bootstrap, backfill_one_from(backfiller), topic=topic, group_id=group_id,
                                        concurrency=config.concurrency, per_host=config.per_host_concurrency,
                                        hosts_of=backfiller.hosts_of, parked_hosts=backfiller.client.parked_hosts)
                async with worker:
                    return await worker.run(stop=stop, exit_when_idle=exit_when_idle)
