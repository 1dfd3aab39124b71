"""`skyfill sink` and `skyfill backfill-worker`: flags -> configs -> `skyfill.app.jobs`."""

from __future__ import annotations

import asyncio
from typing import Any

import click

from skyfill.app.jobs import run_backfill_worker, run_sink
from skyfill.backfill.config import backfill_config
from skyfill.errors import ConfigError, SkyfillError
from skyfill.publish import BACKFILL_TOPIC, RECORDS_TOPIC, REPOS_TOPIC, Topics

from .options import db_option, one_line, option, plc_option, private_option

__all__ = ["COMMANDS", "sink", "backfill_worker"]

bootstrap_option = option("--kafka-bootstrap", required=True, help="Kafka bootstrap HOST:PORT.")


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
    try:
        stats = asyncio.run(run_sink(db, kafka_bootstrap, group_id=group_id, exit_when_idle=exit_when_idle,
                                     topics=Topics(records=records_topic, repos=repos_topic)))
    except SkyfillError as exc:
        raise click.ClickException(one_line(exc)) from exc
    click.echo(f"applied {stats.applied}, skipped {stats.skipped} (older), invalid {stats.invalid}")


@click.command("backfill-worker")
@bootstrap_option
@db_option
@option("--group-id", envvar="SKYFILL_BACKFILL_GROUP_ID", default="skyfill-backfill", show_default=True, help="Consumer group shared by all workers.")
@option("--topic", default=BACKFILL_TOPIC, show_default=True, help="Topic of backfill requests.")
@option("--concurrency", default=8, show_default=True, type=click.IntRange(1, 1024), help="Requests in flight per worker.")
@plc_option
@private_option
@option("--records-topic", default=RECORDS_TOPIC, show_default=True, help="Where results go (for the sink).")
@option("--repos-topic", default=REPOS_TOPIC, show_default=True)
@option("--exit-when-idle", is_flag=True, help="Stop once the request topic is drained.")
def backfill_worker(kafka_bootstrap: str, db: str, group_id: str, topic: str, records_topic: str, repos_topic: str,
                    exit_when_idle: bool, **options: Any) -> None:
    """Join the backfill consumer group: fetch, verify, publish each requested repo, then commit.

    Results go to the records/repos topics as whole-repo snapshots (`source: backfill`) for a
    shared `skyfill sink`; --db is this worker's working store (bookkeeping), not a mirror.
    """
    try:
        config = backfill_config(options)
    except ConfigError as exc:
        raise click.BadParameter(one_line(exc)) from exc
    try:
        done = asyncio.run(run_backfill_worker(db, kafka_bootstrap, config=config, topic=topic, group_id=group_id,
                                               exit_when_idle=exit_when_idle,
                                               topics=Topics(records=records_topic, repos=repos_topic)))
    except SkyfillError as exc:
        raise click.ClickException(one_line(exc)) from exc
    click.echo(f"backfilled {done} requested repos")


COMMANDS = [sink, backfill_worker]
