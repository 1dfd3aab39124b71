"""`skyfill export`: flags -> `skyfill.app.export.run_export` -> a summary."""

from __future__ import annotations

import sys

import click
import orjson

from skyfill.app.export import DEFAULT_MEMORY_LIMIT, run_export
from skyfill.backfill.config import parse_when
from skyfill.errors import ConfigError, DatabaseLocked, SkyfillError

from .options import db_option, json_option, one_line, option

__all__ = ["COMMANDS", "export"]


@click.command("export")
@option("--parquet", "directory", required=True, type=click.Path(file_okay=False),
        help="Output folder: DIR/collection=<nsid>/date=<YYYY-MM-DD>/*.parquet (hive partitioning).")
@option("--collections", multiple=True, metavar="NSID",
        help="Only these collections (repeat the option or separate with commas; default: every collection).")
@option("--since", default=None, metavar="ISO",
        help="Only records whose export time is at or after this (YYYY-MM-DD or ISO 8601, UTC unless zoned).")
@option("--overwrite", is_flag=True,
        help="Write into a non-empty DIR: the collection=<nsid> folders of the exported collections are "
             "replaced, anything else in DIR is left. Without it a non-empty DIR is refused.")
@option("--memory-limit", default=DEFAULT_MEMORY_LIMIT, show_default=True, help="DuckDB memory limit.")
@db_option
@json_option
def export(directory: str, collections: tuple[str, ...], since: str | None, overwrite: bool, memory_limit: str,
           db: str, as_json: bool) -> None:
    """Export the live records as Parquet, partitioned by collection and date.

    A record's date (and what --since compares) is its event time when it has one, else its
    claimed createdAt, else when skyfill indexed it. Columns: did, rkey, cid, rev, record (JSON
    text), created_at, event_at, indexed_at; collection and date come from the folder names.
    Reads the file read-only: stop a `skyfill consume` holding it first, or export a copy.
    """
    try:
        since_at = parse_when(since) if since is not None else None
    except ConfigError as exc:
        raise click.BadParameter(one_line(exc), param_hint="--since") from exc
    try:
        wanted = [c for value in collections for c in value.split(",") if c]
        summary = run_export(db, directory, collections=wanted, since=since_at, overwrite=overwrite,
                             progress=sys.stderr.isatty() and not as_json, memory_limit=memory_limit)
    except DatabaseLocked as exc:
        raise click.ClickException(f"{one_line(exc)} (is `skyfill consume` running on it?)") from exc
    except SkyfillError as exc:
        raise click.ClickException(one_line(exc)) from exc
    if as_json:
        click.echo(orjson.dumps(summary.to_json(), option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(f"exported {summary.rows} records in {summary.files} files to {summary.directory} "
               f"({summary.seconds:.1f} s, {summary.rows_per_s:,.0f} records/s)")
    for collection, rows in summary.collections.items():
        click.echo(f"  {collection:<28} {rows}")


COMMANDS = [export]
