"""`skyfill gaps` and `skyfill backfill`: flags -> configs -> `skyfill.app.commands` -> output.

Every option also reads SKYFILL_<OPTION>. The work (through a running daemon, or on the file)
is in the application layer, shared with the admin API and `lambda_handler`.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import click
import orjson

from skyfill.app import commands
from skyfill.app.settings import parse_collections
from skyfill.backfill.backfiller import BackfillSummary
from skyfill.backfill.config import ALL, backfill_config, parse_dids, parse_window
from skyfill.backfill.gaps import Reason
from skyfill.errors import ConfigError, DatabaseLocked, SkyfillError

from .network import relay_option
from .options import backfill_options, db_option, json_option, one_line, option, plc_option, private_option, user_set

__all__ = ["COMMANDS", "gaps", "backfill"]

_LOCKED_HINT = "(is `skyfill consume` running on it?)"


def _emit(data: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(text)


@click.command("gaps")
@db_option
@option("--start", required=True, help="Window start: YYYY-MM-DD or ISO 8601 (UTC unless zoned).")
@option("--end", required=True, help="Window end (inclusive; a bare date means the end of that day).")
@option("--enqueue", type=click.Choice(["db", "kafka"]), is_flag=False, flag_value="db", default=None,
        help="Queue the DIDs: `db` (default; the DuckDB queue, idempotent) or `kafka` (requests on "
             "skyfill.backfill for `skyfill backfill-worker`s; needs --kafka-bootstrap).")
@option("--kafka-bootstrap", default=None, help="Kafka HOST:PORT (for --enqueue kafka).")
@option("--no-audit", is_flag=True, help="Downtime: flag DIDs active around it instead of asking PDSes.")
@option("--dids", "dids_spec", default=None, help="Extra DIDs to include: did1,did2 or @file.")
@option("--discover", "discover", is_flag=True,
        help="Enumerate the repos of --relay first (as `skyfill discover`): unseen and stale then cover the network.")
@relay_option
@option("--collections", "collections_spec", default=None,
        help="The collections the mirror should hold (NSIDs or prefixes with .*, comma-separated): DIDs "
             "backfilled with a narrower filter are flagged filter_changed.")
@plc_option
@private_option
@json_option
@click.pass_context
def gaps(
    ctx: click.Context, db: str, start: str, end: str, enqueue: str | None, kafka_bootstrap: str | None,
    no_audit: bool, dids_spec: str | None, discover: bool, relay: str, collections_spec: str | None,
    as_json: bool, **options: Any,
) -> None:
    """Which DIDs need a backfill for a window, and why."""
    try:
        collections = parse_collections(collections_spec) if collections_spec else ()
        window = parse_window(start, end)
        explicit = parse_dids(dids_spec) if dids_spec else []
        if explicit == ALL:
            raise ConfigError("--dids all makes no sense for gaps")
        config = backfill_config(options)
        if enqueue == "kafka" and not kafka_bootstrap:
            raise ConfigError("--enqueue kafka needs --kafka-bootstrap (or SKYFILL_KAFKA_BOOTSTRAP)")
    except ConfigError as exc:
        raise click.BadParameter(one_line(exc)) from exc
    try:
        result = commands.gaps(db, start=start, end=end, window=window, config=config,
                               daemon_options=user_set(ctx, options), audit=not no_audit, explicit_dids=explicit,
                               enqueue=enqueue, kafka_bootstrap=kafka_bootstrap,
                               discover_relay=relay if discover else None, collections=collections)
    except DatabaseLocked as exc:
        raise click.ClickException(f"{one_line(exc)} {_LOCKED_HINT}") from exc
    except SkyfillError as exc:
        raise click.ClickException(one_line(exc)) from exc
    lines = [f"gaps {result['start']} .. {result['end']}: {result['total']} DIDs"]
    if "discovery" in result:
        found = result["discovery"]
        lines.append(f"  discovered        {found['listed']} repos from {found['hosts']} host(s), "
                     f"{found['hosts_failed']} failed, {found['skipped']} entries skipped")
    lines += [f"  {reason.value:<17} {result['counts'][reason.value]}" for reason in Reason]
    for a, b in result["downtime"]:
        lines.append(f"  downtime span     {a} .. {b}{'' if result['audited'] else ' (not audited)'}")
    if result["enqueued"] is not None:
        where = "requests on Kafka" if enqueue == "kafka" else "new"
        lines.append(f"  enqueued          {result['enqueued']} {where}")
    _emit(result, as_json, "\n".join(lines))


@click.command("backfill")
@db_option
@option("--dids", "dids_spec", default=None, help="all | did1,did2 | @file (one DID a line).")
@option("--from-queue", is_flag=True, help="Work the backfill queue (rows whose retry time has come).")
@option("--collections", "collections_spec", default=None,
        help="Store only these collections (NSIDs or prefixes with .*, comma-separated); the filter is "
             "recorded per DID, so `gaps --collections` finds DIDs to backfill again when it widens.")
@plc_option
@backfill_options()
@private_option
@option("--kafka-bootstrap", default=None,
        help="Also publish each reconciliation (source backfill) to Kafka before committing it locally. "
             "With `skyfill consume` running, its own --kafka-bootstrap applies instead.")
@json_option
@click.pass_context
def backfill(
    ctx: click.Context, db: str, dids_spec: str | None, from_queue: bool, collections_spec: str | None,
    kafka_bootstrap: str | None, as_json: bool, **options: Any,
) -> None:
    """Fetch, verify and reconcile whole repos."""
    if (dids_spec is None) == (not from_queue):
        raise click.UsageError("give exactly one of --dids or --from-queue")
    try:
        dids = parse_dids(dids_spec) if dids_spec is not None else None
        config = backfill_config(options)
        if collections_spec:
            config = dataclasses.replace(config, collections=parse_collections(collections_spec))
    except ConfigError as exc:
        raise click.BadParameter(one_line(exc)) from exc
    try:
        summary = commands.backfill(db, dids=dids, from_queue=from_queue, config=config,
                                    daemon_options=user_set(ctx, options), kafka_bootstrap=kafka_bootstrap,
                                    progress=sys.stderr.isatty() and not as_json)
    except DatabaseLocked as exc:
        raise click.ClickException(f"{one_line(exc)} {_LOCKED_HINT}") from exc
    except SkyfillError as exc:
        raise click.ClickException(one_line(exc)) from exc
    _emit(summary.to_json(), as_json, _summary_text(summary))


def _summary_text(s: BackfillSummary) -> str:
    lines = [
        f"repos: {s.repos_ok} ok, {s.repos_failed} failed",
        *(f"  {outcome:<19} {n}" for outcome, n in sorted(s.failed.items())),
        f"records: {s.records_added} added, {s.records_updated} updated, {s.records_deleted} deleted, "
        f"{s.records_unchanged} unchanged",
        f"hosts parked: {s.hosts_parked}",
        f"elapsed: {s.elapsed:.1f} s",
    ]
    return "\n".join(lines)


COMMANDS = [gaps, backfill]
