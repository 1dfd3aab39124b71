"""`skyfill discover` and `skyfill identities sync`: the whole network, enumerated and resolved in bulk."""

from __future__ import annotations

from typing import Any

import click
import orjson

from skyfill.app import commands
from skyfill.app.network import DEFAULT_DISCOVER_RELAY
from skyfill.backfill.config import backfill_config
from skyfill.errors import ConfigError, DatabaseLocked, SkyfillError

from .options import db_option, json_option, one_line, option, plc_option, private_option, rps_option

__all__ = ["COMMANDS", "discover", "identities", "relay_option", "collection_option"]

_LOCKED_HINT = "(is `skyfill consume` running on it? discovery needs the file to itself)"

relay_option = option(
    "--relay", "relay", default=DEFAULT_DISCOVER_RELAY, show_default=True, envvar="SKYFILL_DISCOVER_RELAY",
    help="A relay serving com.atproto.sync.listHosts (each host's listRepos is then listed), or a single "
         "PDS (its own listRepos is the list). https:// is assumed without a scheme.")
collection_option = option(
    "--collection", "collections", multiple=True, envvar="SKYFILL_DISCOVER_COLLECTIONS",
    help="List only repos with records in this collection (the relay's listReposByCollection); repeatable.")


def _run(call: Any) -> dict[str, Any]:
    try:
        result: dict[str, Any] = call()
    except DatabaseLocked as exc:
        raise click.ClickException(f"{one_line(exc)} {_LOCKED_HINT}") from exc
    except SkyfillError as exc:
        raise click.ClickException(one_line(exc)) from exc
    return result


def _echo(out: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    """The result as indented JSON, or the summary lines."""
    click.echo(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() if as_json else "\n".join(lines))


@click.command("discover")
@db_option
@relay_option
@collection_option
@option("--restart", is_flag=True, help="List everything again even if an unfinished run could resume.")
@option("--host-concurrency", type=click.IntRange(1, 1024), default=16, show_default=True,
        help="Hosts listed at once (each paced by --per-host-rps).")
@rps_option
@private_option
@json_option
def discover(db: str, relay: str, collections: tuple[str, ...], restart: bool, host_concurrency: int,
             as_json: bool, **options: Any) -> None:
    """Enumerate the repos of the network (or of one PDS) into the database.

    Paged and resumable: each page is stored with its cursor; a killed run goes on where it
    stopped. `skyfill gaps` then flags the listed repos never held (unseen) or behind (stale)."""
    try:
        config = backfill_config(options)
    except ConfigError as exc:
        raise click.BadParameter(one_line(exc)) from exc
    out = _run(lambda: commands.discover(db, relay=relay, config=config, collections=collections,
                                         restart=restart, host_concurrency=host_concurrency))
    _echo(out, as_json, [f"discover {out['relay']} ({out['mode']}{'' if out['fresh'] else ', resumed'}): "
             f"{out['listed']} repos listed in {out['pages']} page(s) from {out['hosts']} host(s)",
             f"  hosts done        {out['hosts_done']}",
             f"  hosts failed      {out['hosts_failed']}",
             f"  entries skipped   {out['skipped']}",
             *(f"  error  {host}: {error}" for host, error in sorted(out["errors"].items())[:20]),
             f"  elapsed           {out['elapsed']:.1f} s"])


@click.group("identities")
def identities() -> None:
    """DID documents in bulk."""


@identities.command("sync")
@db_option
@plc_option
@option("--max-pages", type=click.IntRange(1), default=None, help="Stop after this many pages (resumable).")
@private_option
@json_option
def sync(db: str, max_pages: int | None, as_json: bool, **options: Any) -> None:
    """Import every did:plc document from the PLC directory's /export stream.

    Resumable (the `after` cursor is stored with each page). A backfill then verifies signatures
    without one resolve request per DID; did:web and DIDs the export lacks are still resolved one by one."""
    try:
        config = backfill_config(options)
    except ConfigError as exc:
        raise click.BadParameter(one_line(exc)) from exc
    out = _run(lambda: commands.identities_sync(db, config=config, max_pages=max_pages))
    _echo(out, as_json, [f"identities sync {out['plc']}: {out['operations']} operations in {out['pages']} page(s)"
             f"{' (complete)' if out['complete'] else ''}",
             f"  stored            {out['stored']}",
             f"  refused           {out['refused']}",
             f"  DIDs in bulk      {out['folded_dids']}",
             *([f"  error             {out['error']}"] if out["error"] else []),
             f"  elapsed           {out['elapsed']:.1f} s"])


COMMANDS = [discover, identities]
