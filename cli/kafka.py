"""`skyfill sink` and `skyfill backfill-worker`."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import click

from .options import db_option, one_line, option
from skyfill.errors import SkyfillError

from skyfill.publish.messages import BACKFILL_TOPIC, RECORDS_TOPIC, REPOS_TOPIC, Topics

__all__ = ["COMMANDS", "sink", "backfill_worker"]

bootstrap_option = option("--kafka-bootstrap", required=True, help="Kafka bootstrap HOST:PORT.")


def _run(main: Callable[[asyncio.Event], Awaitable[Any]]) -> Any:
    """Run until done or SIGINT/SIGTERM; the signal lets the current step finish and commit."""

    async def wrapper() -> Any:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await main(stop)

    try:
        return asyncio.run(wrapper())
    except SkyfillError as exc:
        raise click.ClickException(one_line(exc)) from exc


@click.command("sink")
@bootstrap_option
@db_option
@option("--group-id", envvar="SKYFILL_SINK_GROUP_ID", default="skyfill-sink", show_default=True, help="Consumer group (one per mirror).")
@option("--records-topic", default=RECORDS_TOPIC, show_default=True)
@option("--repos-topic", default=REPOS_TOPIC, show_default=True)
@option("--exit-when-idle", is_flag=True, help="Stop once the topics are drained.")
def sink(kafka_bootstrap: str, db: str, group_id: str, records_topic: str, repos_topic: str,
         exit_when_idle: bool) -> None:
    """Build a DuckDB mirror from the skyfill topics alone (at-least-once, idempotent by rev)."""
    from skyfill.storage import Store

    from skyfill.publish.sink import Sink

    async def main(stop: asyncio.Event) -> None:
        with Store(db) as store:
            async with Sink(store, kafka_bootstrap, group_id=group_id,
                            topics=Topics(records=records_topic, repos=repos_topic)) as s:
                stats = await s.run(stop=stop, exit_when_idle=exit_when_idle)
        click.echo(f"applied {stats.applied}, skipped {stats.skipped} (older), invalid {stats.invalid}")

    _run(main)


@click.command("backfill-worker")
@bootstrap_option
@db_option
@option("--group-id", envvar="SKYFILL_BACKFILL_GROUP_ID", default="skyfill-backfill", show_default=True, help="Consumer group shared by all workers.")
@option("--topic", default=BACKFILL_TOPIC, show_default=True, help="Topic of backfill requests.")
@option("--concurrency", default=8, show_default=True, type=click.IntRange(1, 1024), help="Requests in flight per worker.")
@option("--plc-url", default=None, help="PLC directory (default: the backfiller's).")
@option("--allow-private-hosts", is_flag=True, help="Allow loopback/private PDS hosts (local networks).")
@option("--records-topic", default=RECORDS_TOPIC, show_default=True, help="Where results go (for the sink).")
@option("--repos-topic", default=REPOS_TOPIC, show_default=True)
@option("--exit-when-idle", is_flag=True, help="Stop once the request topic is drained.")
def backfill_worker(kafka_bootstrap: str, db: str, group_id: str, topic: str, concurrency: int,
                    plc_url: str | None, allow_private_hosts: bool, records_topic: str, repos_topic: str,
                    exit_when_idle: bool) -> None:
    """Join the backfill consumer group: fetch, verify, publish each requested repo, then commit.

    Results go to the records/repos topics as whole-repo snapshots (`source: backfill`) for a
    shared `skyfill sink`; --db is this worker's working store (bookkeeping), not a mirror.
    """
    from skyfill.backfill.backfiller import StoreReconciler, open_backfiller
    from skyfill.backfill.config import BackfillConfig
    from skyfill.storage import Store

    from skyfill.publish.producer import KafkaPublisher
    from skyfill.publish.worker import BackfillWorker, backfill_one_from

    extra: dict[str, Any] = {"plc_url": plc_url} if plc_url else {}
    try:
        config = BackfillConfig(concurrency=concurrency, allow_private_hosts=allow_private_hosts, **extra)
    except SkyfillError as exc:
        raise click.BadParameter(one_line(exc)) from exc

    async def main(stop: asyncio.Event) -> None:
        with Store(db) as store:
            async with KafkaPublisher(kafka_bootstrap, records_topic=records_topic,
                                      repos_topic=repos_topic) as publisher:
                sink = StoreReconciler(store, publish=publisher.publish, snapshot=True)
                async with open_backfiller(store, config=config, sink=sink, progress=False) as backfiller:
                    worker = BackfillWorker(kafka_bootstrap, backfill_one_from(backfiller), topic=topic,
                                            group_id=group_id, concurrency=concurrency)
                    async with worker:
                        done = await worker.run(stop=stop, exit_when_idle=exit_when_idle)
        click.echo(f"backfilled {done} requested repos")

    _run(main)


COMMANDS = [sink, backfill_worker]
