"""`skyfill consume` and `skyfill status`: flags -> frozen config -> components wired here."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TYPE_CHECKING, Any

import click
import orjson

from skyfill.cli import db_option, json_option, option
from skyfill.daemon_client import call_daemon, find_daemon
from skyfill.errors import ConfigError, DatabaseLocked, SkyfillError
from storage import Store
from storage.status import status_report

from .connection import subscribe_url

if TYPE_CHECKING:
    from .daemon import ConsumeConfig

__all__ = ["COMMANDS", "consume", "status"]

log = logging.getLogger(__name__)


@click.command()
@db_option
@option("--relay", default="wss://bsky.network", show_default=True,
        help="Relay or PDS host, or a full ws:// / wss:// subscribeRepos URL.")
@option("--cursor", type=int, default=None, help="Start from this seq instead of the stored cursor.")
@option("--collections", default="", help="Comma-separated NSIDs to store (app.bsky.feed.* wildcards). Default: all.")
@option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on 127.0.0.1:PORT.")
@option("--admin-port", type=int, default=0, show_default=True, help="Admin API port on 127.0.0.1 (0 = any free port).")
@option("--strict-cursor", is_flag=True, help="Exit instead of restarting from the live head on FutureCursor.")
@option("--backfill/--no-backfill", "run_backfill", default=False,
        help="Also backfill desynchronized and queued DIDs continuously.")
@option("--plc-url", default="https://plc.directory", show_default=True, help="PLC directory (with --backfill).")
@option("--allow-private-hosts", is_flag=True, help="Allow PDS endpoints on private/loopback addresses (tests).")
@option("--verify", is_flag=True,
        help="Check every #commit's signature (the DID's #atproto key, via --plc-url) and MST proof "
             "(its ops must turn the signed tree back into prevData); reject and count the rest.")
@option("--kafka-bootstrap", default=None, help="HOST:PORT of a Kafka broker to publish every change to.")
@option("--batch-events", type=int, default=5000, show_default=True, help="Events per DuckDB transaction (at most).")
@option("--flush-interval", type=float, default=0.5, show_default=True, help="Seconds before a partial batch is written.")
@option("--duckdb-memory-limit", default=None,
        help="Cap DuckDB's buffer pool (e.g. 512MB); default: DuckDB's own (80% of RAM).")
def consume(
    db: str, relay: str, cursor: int | None, collections: str, metrics_port: int | None, admin_port: int,
    strict_cursor: bool, run_backfill: bool, plc_url: str, allow_private_hosts: bool,
    kafka_bootstrap: str | None, batch_events: int, flush_interval: float, duckdb_memory_limit: str | None, verify: bool,
) -> None:
    """Mirror the firehose (com.atproto.sync.subscribeRepos) into DuckDB."""
    from .daemon import ConsumeConfig

    try:
        subscribe_url(relay, None)
        from skyfill.syntax import collection_matcher, is_nsid

        patterns = tuple(p.strip() for p in collections.split(",") if p.strip())
        for p in patterns:
            if not (is_nsid(p) or (p.endswith(".*") and is_nsid(p[:-2] + ".x"))):
                raise ConfigError(f"--collections: {p!r} is not an NSID or an NSID prefix with .*")
        collection_matcher(patterns)
        if verify and not plc_url.startswith(("http://", "https://")):
            raise ConfigError(f"--verify needs an http(s) --plc-url, not {plc_url!r}")
        config = ConsumeConfig(
            relay=relay, cursor=cursor, collections=patterns, strict_cursor=strict_cursor,
            batch_events=batch_events, flush_interval=flush_interval, publish=kafka_bootstrap is not None,
        )
        store = Store(db, memory_limit=duckdb_memory_limit)
    except DatabaseLocked as exc:
        raise click.ClickException(f"{exc}\nIs another `skyfill consume` running on this file?") from exc
    except SkyfillError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        code = asyncio.run(_serve(store, config, db=db, metrics_port=metrics_port, admin_port=admin_port,
                                  run_backfill=run_backfill, plc_url=plc_url,
                                  allow_private_hosts=allow_private_hosts, kafka_bootstrap=kafka_bootstrap,
                                  verify=verify))
    finally:
        store.close()
    sys.exit(code)


async def _serve(
    store: Store, config: ConsumeConfig, *, db: str, metrics_port: int | None, admin_port: int,
    run_backfill: bool, plc_url: str, allow_private_hosts: bool, kafka_bootstrap: str | None,
    verify: bool = False,
) -> int:
    from skyfill import metrics

    from .admin import AdminServer
    from .daemon import Daemon, FutureCursorError
    from .service import Services

    if metrics_port is not None:
        metrics.serve(metrics_port)
    services = Services(store, plc_url=plc_url, allow_private_hosts=allow_private_hosts,
                        kafka_bootstrap=kafka_bootstrap)
    await services.start()
    resolver = None
    verifier = None
    if verify:
        from urllib.parse import urlsplit

        from backfill.identity import Resolver
        from backfill.pds import PdsClient

        from .verify import CommitVerifier

        # Keys of first-seen DIDs are fetched ahead of their events, many at once (see verify.py).
        client = PdsClient(allow_private_hosts=allow_private_hosts, trusted_hosts=[urlsplit(plc_url).hostname or ""],
                           per_host_concurrency=32, max_retries=2)
        resolver = Resolver(plc_url=plc_url, client=client, store=store)
        verifier = CommitVerifier(resolver, concurrency=32)
    daemon = Daemon(store, config, publish=services.publish, verifier=verifier)
    services.attach(daemon)
    admin = AdminServer(db=db, routes=services.routes(), port=admin_port)
    await admin.start()
    background = [asyncio.create_task(services.backfill_forever())] if run_backfill else []
    try:
        await daemon.run()
        return 0
    except FutureCursorError as exc:
        log.error(str(exc))
        return 3
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await admin.aclose()
        await services.aclose()
        if verifier is not None:
            await verifier.aclose()
            await client.aclose()


@click.command()
@db_option
@json_option
def status(db: str, as_json: bool) -> None:
    """Cursor, lag, repos by sync state and status, records by collection."""
    daemon = find_daemon(db)
    try:
        if daemon is not None:
            report = call_daemon(daemon, "/status", timeout=30)
        else:
            with Store(db, read_only=True) as store:
                report = status_report(store.conn)
    except DatabaseLocked as exc:
        raise click.ClickException(f"{exc} (and no daemon announcement found next to it)") from exc
    except SkyfillError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        _print_status(report)


def _print_status(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    cursors = ", ".join(f"{c['source']}={c['seq']}" for c in report["cursors"]) or "none"
    lag = report["lag_seconds"]
    console.print(f"[bold]cursor[/] {cursors}   [bold]lag[/] {'n/a' if lag is None else f'{lag:.1f}s'}"
                  f"   [bold]consumer[/] {'running' if report['consumer_running'] else 'stopped'}")
    repos = report["repos"]
    table = Table(title=f"repos: {repos['total']}")
    table.add_column("sync state")
    table.add_column("count", justify="right")
    for k, v in repos["by_sync_state"].items():
        table.add_row(k, str(v))
    for k, v in repos["by_status"].items():
        table.add_row(f"status {k}", str(v))
    for k, v in repos["by_backfill_status"].items():
        table.add_row(f"backfill {k}", str(v))
    console.print(table)
    records = report["records"]
    rt = Table(title=f"records: {records['total']}")
    rt.add_column("collection")
    rt.add_column("count", justify="right")
    for k, v in records["by_collection"].items():
        rt.add_row(k, str(v))
    console.print(rt)
    if report["backfill_queue"]:
        console.print("backfill queue: " + ", ".join(f"{k}={v}" for k, v in report["backfill_queue"].items()))


COMMANDS = [consume, status]
