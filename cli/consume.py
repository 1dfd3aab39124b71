"""`skyfill consume` and `skyfill status`: flags -> Settings -> `skyfill.app.application.serve`."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.table import Table

from skyfill.app import commands
from skyfill.app.application import serve
from skyfill.app.settings import check_relay, daemon_settings, default
from skyfill.errors import ConfigError, DatabaseLocked, SkyfillError

from .options import (
    FiniteFloatRange,
    backfill_options,
    db_option,
    json_option,
    one_line,
    option,
    plc_option,
    private_option,
)

__all__ = ["COMMANDS", "consume", "status"]


def _check_relay(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return check_relay(value)
    except ConfigError as exc:
        raise click.BadParameter(one_line(exc)) from None


@click.command()
@db_option
@option("--relay", default=default("relay"), show_default=True, callback=_check_relay,
        help="Relay or PDS host, or a full ws:// / wss:// subscribeRepos URL.")
@option("--cursor", type=click.IntRange(0, 2**63 - 1), default=None, help="Start from this seq instead of the stored cursor.")
@option("--collections", default="", help="Comma-separated NSIDs to store (app.bsky.feed.* wildcards). Default: all.")
@option("--metrics-port", type=click.IntRange(1, 65535), default=None,
        help="Serve the status page (/) and Prometheus metrics (/metrics) on 127.0.0.1:PORT.")
@option("--admin-port", type=click.IntRange(0, 65535), default=default("admin_port"), show_default=True,
        help="Admin API port on 127.0.0.1 (0 = any free port).")
@option("--strict-cursor", is_flag=True, help="Exit instead of restarting from the live head on FutureCursor.")
@option("--backfill/--no-backfill", "run_backfill", default=False,
        help="Also backfill desynchronized and queued DIDs continuously (with the backfill options below).")
@option("--verify", is_flag=True,
        help="Check every #commit's signature (the DID's #atproto key, via --plc-url) and MST proof "
             "(its ops must turn the signed tree back into prevData); reject and count the rest.")
@option("--kafka-bootstrap", default=None, help="HOST:PORT of a Kafka broker to publish every change to.")
@option("--batch-events", type=click.IntRange(1, 1_000_000), default=default("batch_events"), show_default=True,
        help="Events per DuckDB transaction (at most).")
@option("--flush-interval", type=FiniteFloatRange(0.01, 3600), default=default("flush_interval"), show_default=True,
        help="Seconds before a partial batch is written.")
@option("--duckdb-memory-limit", default=None,
        help="Cap DuckDB's buffer pool (e.g. 2GB); default 256MB (large queries spill to disk).")
@plc_option
@private_option
@backfill_options(verify=False)
def consume(**options: Any) -> None:
    """Mirror the firehose (com.atproto.sync.subscribeRepos) into DuckDB.

    Every backfill the daemon runs (--backfill, and `skyfill backfill` while it runs) uses the
    backfill options given here (--plc-url ... --max-attempts); it always verifies signatures."""
    try:
        settings = daemon_settings(options)
    except ConfigError as exc:
        raise click.ClickException(one_line(exc)) from exc
    try:
        code = asyncio.run(serve(settings))
    except DatabaseLocked as exc:
        raise click.ClickException(f"{one_line(exc)} (is another `skyfill consume` running on this file?)") from exc
    except SkyfillError as exc:
        raise click.ClickException(one_line(exc)) from exc
    sys.exit(code)


@click.command()
@db_option
@json_option
@option("--html", "html_file", type=click.Path(dir_okay=False, writable=True), default=None,
        help="Write the status page (coverage timeline, ingest, repos, backfill: one offline HTML file) to FILE.")
@option("--since", default=None, help="With --html: the window's start (ISO 8601, a date, or a span before "
        "now like 6h, 7d). Default: 24 h before --until.")
@option("--until", default=None, help="With --html: the window's end (ISO 8601, a date, or now). Default: now.")
def status(db: str, as_json: bool, html_file: str | None, since: str | None, until: str | None) -> None:
    """Cursor, lag, repos by sync state and status, records by collection; --html FILE: the status page."""
    if html_file is None and (since or until):
        raise click.UsageError("--since/--until go with --html FILE")
    try:
        if html_file is not None:
            html = commands.status_html(db, since=since, until=until)
        else:
            report = commands.status(db)
    except DatabaseLocked as exc:
        raise click.ClickException(f"{one_line(exc)} (and no live daemon announced next to it)") from exc
    except SkyfillError as exc:
        raise click.ClickException(one_line(exc)) from exc
    if html_file is not None:
        try:
            Path(html_file).write_text(html, encoding="utf-8")
        except OSError as exc:
            raise click.ClickException(f"cannot write {html_file}: {exc.strerror or exc}") from exc
        click.echo(html_file)
        return
    if as_json:
        click.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        _print_status(report)


def _print_status(report: dict[str, Any]) -> None:
    console = Console()
    cursors = ", ".join(f"{c['source']}={c['seq']}" for c in report["cursors"]) or "none"
    lag = report["lag_seconds"]
    console.print(f"[bold]cursor[/] {cursors}   [bold]lag[/] {'n/a' if lag is None else f'{lag:.1f}s'}"
                  f"   [bold]consumer[/] {'running' if report['consumer_running'] else 'stopped'}")
    repos = report["repos"]
    console.print(_counts(f"repos: {repos['total']}", "sync state", [
        *repos["by_sync_state"].items(),
        *((f"status {k}", v) for k, v in repos["by_status"].items()),
        *((f"backfill {k}", v) for k, v in repos["by_backfill_status"].items()),
    ]))
    records = report["records"]
    console.print(_counts(f"records: {records['total']}", "collection", records["by_collection"].items()))
    if report["backfill_queue"]:
        console.print("backfill queue: " + ", ".join(f"{k}={v}" for k, v in report["backfill_queue"].items()))


COMMANDS = [consume, status]


def _counts(title: str, label: str, rows: Iterable[tuple[str, Any]]) -> Table:
    table = Table(title=title)
    table.add_column(label)
    table.add_column("count", justify="right")
    for k, v in rows:
        table.add_row(k, str(v))
    return table
