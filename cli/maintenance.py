"""`skyfill migrate` and `skyfill compact`: maintenance of the database file itself."""

from __future__ import annotations

import click
import orjson

from skyfill.app import commands
from skyfill.errors import DatabaseLocked, SkyfillError

from .options import FiniteFloatRange, db_option, one_line, option

__all__ = ["COMMANDS", "migrate", "compact"]


@click.command()
@db_option
def migrate(db: str) -> None:
    """Bring a database written by an older skyfill to the current layout.

    Any writable open migrates (the daemon, backfill, ...); this does only that, for files that
    are opened read-only afterwards (`skyfill status`). One transaction: an interrupted migration
    leaves the file as it was."""
    try:
        report = commands.migrate(db)
    except DatabaseLocked as exc:
        raise click.ClickException(f"{one_line(exc)} (a running daemon has already migrated it)") from exc
    except SkyfillError as exc:
        raise click.ClickException(one_line(exc)) from exc
    click.echo(orjson.dumps(report).decode())


@click.command()
@db_option
@option("--full", is_flag=True,
        help="Also rewrite the whole base in (did, collection, rkey) order: per-DID reads stay fast "
             "after many compactions. Minutes at 10^8 records; twice the base's disk space meanwhile.")
@option("--retention", type=FiniteFloatRange(0), default=86400.0, show_default=True,
        help="On a DuckLake: snapshots older than this many seconds are expired, and their files, the "
             "files merged away and orphaned files (a killed writer's) older than it are deleted. "
             "Keep it above the longest write transaction: a running writer's files are orphans until it commits.")
def compact(db: str, full: bool, retention: float) -> None:
    """Fold the record log into the deduplicated base now.

    Writes only ever append; a compaction folds what they appended, in the background, every
    250,000 rows. Run this after a large backfill, before copying the file or querying it hard.
    On a DuckLake it takes the lake's compaction lease (writers hold their commits meanwhile), then
    merges small Parquet files, expires old snapshots and deletes unreferenced files."""
    try:
        report = commands.compact(db, full=full, retention_seconds=retention)
    except DatabaseLocked as exc:
        raise click.ClickException(f"{one_line(exc)} (the running daemon compacts on its own)") from exc
    except SkyfillError as exc:
        raise click.ClickException(one_line(exc)) from exc
    click.echo(orjson.dumps(report).decode())


COMMANDS = [migrate, compact]
