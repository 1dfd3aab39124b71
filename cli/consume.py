"""`skyfill consume` and `skyfill status`: flags -> frozen config -> components wired here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import click
import orjson

from skyfill.backfill.config import BackfillConfig
from .options import FiniteFloatRange, db_option, json_option, one_line, option
from skyfill.app.daemon_client import call_daemon, find_daemon, remove_announcement
from skyfill.errors import ConfigError, DatabaseLocked, FutureCursorError, SkyfillError, StorageError
from skyfill.storage import Store
from skyfill.storage.status import status_report

from skyfill.consumer.connection import subscribe_url

if TYPE_CHECKING:
    from skyfill.consumer.daemon import ConsumeConfig

__all__ = ["COMMANDS", "consume", "status"]

log = logging.getLogger(__name__)


def _check_relay(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--relay must give a ws(s) URL whose host and port parse (`ws://[::1` or `ws://h:x` do not)."""
    try:
        parts = urlsplit(subscribe_url(value, None))
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ConfigError as exc:
        raise click.BadParameter(one_line(exc)) from None
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not a valid URL: {exc}") from None
    if not parts.hostname:
        raise click.BadParameter(f"{value!r} names no host")
    return value


@click.command()
@db_option
@option("--relay", default="wss://bsky.network", show_default=True, callback=_check_relay,
        help="Relay or PDS host, or a full ws:// / wss:// subscribeRepos URL.")
@option("--cursor", type=click.IntRange(0, 2**63 - 1), default=None, help="Start from this seq instead of the stored cursor.")
@option("--collections", default="", help="Comma-separated NSIDs to store (app.bsky.feed.* wildcards). Default: all.")
@option("--metrics-port", type=click.IntRange(1, 65535), default=None, help="Serve Prometheus metrics on 127.0.0.1:PORT.")
@option("--admin-port", type=click.IntRange(0, 65535), default=0, show_default=True, help="Admin API port on 127.0.0.1 (0 = any free port).")
@option("--strict-cursor", is_flag=True, help="Exit instead of restarting from the live head on FutureCursor.")
@option("--backfill/--no-backfill", "run_backfill", default=False,
        help="Also backfill desynchronized and queued DIDs continuously.")
@option("--plc-url", default="https://plc.directory", show_default=True, help="PLC directory (with --backfill).")
@option("--allow-private-hosts", is_flag=True, help="Allow PDS endpoints on private/loopback addresses (tests).")
@option("--verify", is_flag=True,
        help="Check every #commit's signature (the DID's #atproto key, via --plc-url) and MST proof "
             "(its ops must turn the signed tree back into prevData); reject and count the rest.")
@option("--kafka-bootstrap", default=None, help="HOST:PORT of a Kafka broker to publish every change to.")
@option("--batch-events", type=click.IntRange(1, 1_000_000), default=5000, show_default=True, help="Events per DuckDB transaction (at most).")
@option("--flush-interval", type=FiniteFloatRange(0.01, 3600), default=0.5, show_default=True, help="Seconds before a partial batch is written.")
@option("--duckdb-memory-limit", default=None,
        help="Cap DuckDB's buffer pool (e.g. 512MB); default: DuckDB's own (80% of RAM).")
def consume(
    db: str, relay: str, cursor: int | None, collections: str, metrics_port: int | None, admin_port: int,
    strict_cursor: bool, run_backfill: bool, plc_url: str, allow_private_hosts: bool,
    kafka_bootstrap: str | None, batch_events: int, flush_interval: float, duckdb_memory_limit: str | None, verify: bool,
) -> None:
    """Mirror the firehose (com.atproto.sync.subscribeRepos) into DuckDB."""
    from skyfill.consumer.daemon import ConsumeConfig

    try:
        from skyfill.protocol.syntax import collection_matcher, is_nsid

        patterns = tuple(p.strip() for p in collections.split(",") if p.strip())
        for p in patterns:
            if not (is_nsid(p) or (p.endswith(".*") and is_nsid(p[:-2] + ".x"))):
                raise ConfigError(f"--collections: {p!r} is not an NSID or an NSID prefix with .*")
        collection_matcher(patterns)
        if verify or run_backfill:  # the PLC directory is used: check its URL now
            BackfillConfig(plc_url=plc_url, allow_private_hosts=allow_private_hosts)
        config = ConsumeConfig(
            relay=relay, cursor=cursor, collections=patterns, strict_cursor=strict_cursor,
            batch_events=batch_events, flush_interval=flush_interval, publish=kafka_bootstrap is not None,
        )
        store = Store(db, memory_limit=duckdb_memory_limit)
    except DatabaseLocked as exc:
        raise click.ClickException(f"{one_line(exc)} (is another `skyfill consume` running on this file?)") from exc
    except SkyfillError as exc:
        raise click.ClickException(one_line(exc)) from exc
    try:
        code = asyncio.run(_serve(store, config, db=db, metrics_port=metrics_port, admin_port=admin_port,
                                  run_backfill=run_backfill, plc_url=plc_url,
                                  allow_private_hosts=allow_private_hosts, kafka_bootstrap=kafka_bootstrap,
                                  verify=verify))
    except SkyfillError as exc:
        raise click.ClickException(one_line(exc)) from exc
    finally:
        store.close()
    sys.exit(code)


async def _serve(
    store: Store, config: ConsumeConfig, *, db: str, metrics_port: int | None, admin_port: int,
    run_backfill: bool, plc_url: str, allow_private_hosts: bool, kafka_bootstrap: str | None,
    verify: bool = False,
) -> int:
    from skyfill import metrics

    from skyfill.app.admin import AdminServer
    from skyfill.consumer.daemon import Daemon
    from skyfill.app.service import Services

    if metrics_port is not None:
        try:
            metrics.serve(metrics_port)
        except OSError as exc:
            raise ConfigError(f"--metrics-port: cannot listen on 127.0.0.1:{metrics_port}: {exc.strerror or exc}") from exc
    async with contextlib.AsyncExitStack() as stack:
        services = Services(store, plc_url=plc_url, allow_private_hosts=allow_private_hosts,
                            kafka_bootstrap=kafka_bootstrap)
        await services.start()
        stack.push_async_callback(services.aclose)
        verifier = None
        if verify:
            from skyfill.net.identity import Resolver
            from skyfill.net.pds import PdsClient

            from skyfill.consumer.verify import CommitVerifier

            # Keys of first-seen DIDs are fetched ahead of their events, many at once (see verify.py).
            client = PdsClient(allow_private_hosts=allow_private_hosts, per_host_concurrency=32, max_retries=2)
            stack.push_async_callback(client.aclose)
            resolver = Resolver(plc_url=plc_url, client=client, store=store)
            verifier = CommitVerifier(resolver, concurrency=32)
            stack.push_async_callback(verifier.aclose)
        daemon = Daemon(store, config, publish=services.publish, verifier=verifier)
        services.attach(daemon)
        admin = AdminServer(db=db, routes=services.routes(), port=admin_port)
        await admin.start()
        stack.push_async_callback(admin.aclose)
        background = [asyncio.create_task(services.backfill_forever())] if run_backfill else []
        try:
            await daemon.run()
            return 0
        except FutureCursorError as exc:
            log.error(str(exc))
            return 3
        except SkyfillError as exc:  # a write that failed for good, or a frame over the hard cap: logged when it happened, this is the exit's line
            log.error(f"exiting: {exc}")
            return 4
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)


@click.command()
@db_option
@json_option
def status(db: str, as_json: bool) -> None:
    """Cursor, lag, repos by sync state and status, records by collection."""
    try:
        daemon = find_daemon(db)
        if daemon is not None:
            report = call_daemon(daemon, "/status", timeout=30)
        else:
            with Store(db, read_only=True) as store:
                remove_announcement(db)  # we hold the file: an announcement beside it is stale
                try:
                    report = status_report(store)
                except StorageError as exc:
                    raise StorageError(f"cannot read {db}: {exc}") from exc.__cause__
    except DatabaseLocked as exc:
        raise click.ClickException(f"{one_line(exc)} (and no live daemon announced next to it)") from exc
    except SkyfillError as exc:
        raise click.ClickException(one_line(exc)) from exc
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
