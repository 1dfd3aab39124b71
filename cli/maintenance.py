"""`skyfill migrate` and `skyfill compact`: maintenance of the database file itself."""

from __future__ import annotations

import click
import orjson

from skyfill.app import commands
from skyfill.errors import DatabaseLocked, SkyfillError

from .options import db_option, one_line, option

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
def compact(db: str, full: bool) -> None:
    """Fold the record log into the deduplicated base now.

    Writes only ever append; a compaction folds what they appended, in the background, every
    250,000 rows. Run this after a large backfill, before copying the file or querying it hard."""
    try:
        report = commands.compact(db, full=full)
    except DatabaseLocked as exc:
        raise click.ClickException(f"{one_line(exc)} (the running daemon compacts on its own)") from exc
    except SkyfillError as exc:
        raise click.ClickException(one_line(exc)) from exc
    click.echo(orjson.dumps(report).decode())


COMMANDS = [migrate, compact]
