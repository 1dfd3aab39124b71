"""`skyfill gaps` and `skyfill backfill`.

The work is in `run_gaps` / `run_backfill` (plain async functions over a Store and a frozen
BackfillConfig), so the daemon's admin API and `lambda_handler` call exactly what the CLI calls.
The click commands only parse options (each also read from SKYFILL_<OPTION>) and print.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Literal

import click
import orjson
from click.core import ParameterSource

from .options import FiniteFloatRange, db_option, json_option, one_line, option
from skyfill.app.daemon_client import call_daemon, find_daemon, remove_announcement
from skyfill.errors import ConfigError, DatabaseLocked, SkyfillError
from skyfill.storage import Store
from skyfill.storage.queries import not_terminal

from skyfill.backfill.backfiller import BackfillSummary, Reconciler, open_backfiller, recover_queue
from skyfill.backfill.config import ALL, DEFAULT_PLC_URL, BackfillConfig, parse_dids, parse_window
from skyfill.backfill.gaps import PdsAuditor, Reason, detect_gaps

__all__ = ["COMMANDS", "run_gaps", "run_backfill", "all_dids", "gaps", "backfill"]



# -- the cores -----------------------------------------------------------------------------


async def run_gaps(
    store: Store,
    *,
    start: datetime,
    end: datetime,
    config: BackfillConfig,
    audit: bool = True,
    explicit_dids: Iterable[str] = (),
    enqueue: bool | str = False,
    kafka_bootstrap: str | None = None,
) -> dict[str, Any]:
    """Detect gaps for [start, end]; with `enqueue`, queue them for a backfill.

    `enqueue`: False/None (report only), True or "db" (the DuckDB queue, idempotent: `enqueued`
    counts new rows), "kafka" (one request per DID on skyfill.backfill at `kafka_bootstrap`, for
    `skyfill backfill-worker`s: `enqueued` counts acknowledged requests).
    Returns the report as JSON-ready data: counts per reason, downtime stretches, DIDs with
    their reasons, and `enqueued` (None without `enqueue`).
    """
    mode = _enqueue_mode(enqueue)
    if mode == "kafka" and not kafka_bootstrap:
        raise ConfigError("--enqueue kafka needs --kafka-bootstrap")
    if audit:
        async with open_backfiller(store, config=config, progress=False) as bf:
            auditor = PdsAuditor(bf.client, bf.resolver)
            report = await detect_gaps(store, start=start, end=end, audit=auditor, explicit_dids=explicit_dids)
    else:
        report = await detect_gaps(store, start=start, end=end, audit=None, explicit_dids=explicit_dids)
    out = report.to_json(with_dids=True)
    if mode == "kafka":
        from skyfill.publish import enqueue_backfill

        assert kafka_bootstrap is not None
        out["enqueued"] = await enqueue_backfill(kafka_bootstrap, report.reasons_by_did)
    elif mode == "db":
        out["enqueued"] = await asyncio.to_thread(store.enqueue, report.reasons_by_did)
    else:
        out["enqueued"] = None
    return out


def _enqueue_mode(enqueue: bool | str | None) -> str | None:
    if enqueue is True:
        return "db"
    if enqueue in (False, None, ""):
        return None
    if enqueue not in ("db", "kafka"):
        raise ConfigError(f"enqueue must be db or kafka, not {enqueue!r}")
    return str(enqueue)


def all_dids(store: Store, *, start: datetime | None = None, end: datetime | None = None) -> list[str]:
    """Every DID the store knows, minus terminal outcomes (naming one explicitly retries it);
    with a window, only DIDs active in it (first seen by `end`, last event at or after `start`)."""
    sql = f"SELECT did FROM repos WHERE {not_terminal()}"
    params: list[Any] = []
    if start is not None:
        sql += " AND last_event_at >= ?"
        params.append(start)
    if end is not None:
        sql += " AND first_seen_at <= ?"
        params.append(end)
    return [r[0] for r in store.fetchall(sql + " ORDER BY did", params)]


async def run_backfill(
    store: Store,
    *,
    dids: Sequence[str] | Literal["all"] | None,
    config: BackfillConfig,
    from_queue: bool = False,
    sink: Reconciler | None = None,
    progress: bool | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    kafka_bootstrap: str | None = None,
) -> BackfillSummary:
    """Backfill the named DIDs, every known DID (`"all"`, optionally limited to a window), or the queue.

    With `kafka_bootstrap` (and no `sink`), every reconciliation's changes are published
    (`source: backfill`) and acknowledged before the local transaction commits.
    """
    if from_queue == (dids is not None):
        raise ConfigError("give either DIDs or from_queue")
    if kafka_bootstrap is not None and sink is None:
        from skyfill.publish import KafkaPublisher

        from skyfill.backfill.backfiller import StoreReconciler

        async with KafkaPublisher(kafka_bootstrap) as publisher:
            return await run_backfill(store, dids=dids, config=config, from_queue=from_queue,
                                      sink=StoreReconciler(store, publish=publisher.publish), progress=progress,
                                      start=start, end=end)
    async with open_backfiller(store, config=config, sink=sink, progress=progress) as bf:
        if from_queue:
            await asyncio.to_thread(recover_queue, store)
            return await bf.run_queue()
        assert dids is not None
        targets = await asyncio.to_thread(all_dids, store, start=start, end=end) if dids == ALL else list(dids)
        return await bf.run(targets)


# -- click ---------------------------------------------------------------------------------


def _open(db: str) -> Store:
    """Open `db` for writing; holding it proves any daemon announcement beside it stale."""
    try:
        store = Store(db)
    except DatabaseLocked as exc:
        raise click.ClickException(f"{one_line(exc)} (is `skyfill consume` running on it?)") from exc
    try:
        remove_announcement(db)
    except SkyfillError:
        store.close()
        raise
    return store


def _user_set(ctx: click.Context, params: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """The options the user gave (flag, environment, ...), as request fields; the rest are left to
    the daemon, whose own --plc-url / --allow-private-hosts must not be replaced by our defaults.
    `params` maps a click parameter name to (request field, value)."""
    return {field: value for name, (field, value) in params.items()
            if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)}


def _emit(data: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(text)


_plc_option = option("--plc-url", default=DEFAULT_PLC_URL, show_default=True, help="PLC directory.")
_private_option = option(
    "--allow-private-hosts", is_flag=True, help="Allow loopback/private PDS and did:web hosts (tests only)."
)


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
@_plc_option
@_private_option
@json_option
def gaps(
    db: str, start: str, end: str, enqueue: str | None, kafka_bootstrap: str | None, no_audit: bool,
    dids_spec: str | None, plc_url: str, allow_private_hosts: bool, as_json: bool,
) -> None:
    """Which DIDs need a backfill for a window, and why."""
    try:
        lo, hi = parse_window(start, end)
        explicit = parse_dids(dids_spec) if dids_spec else []
        if explicit == ALL:
            raise ConfigError("--dids all makes no sense for gaps")
        config = BackfillConfig(plc_url=plc_url, allow_private_hosts=allow_private_hosts)
        if enqueue == "kafka" and not kafka_bootstrap:
            raise ConfigError("--enqueue kafka needs --kafka-bootstrap (or SKYFILL_KAFKA_BOOTSTRAP)")
    except ConfigError as exc:
        raise click.BadParameter(one_line(exc)) from exc
    try:
        daemon = find_daemon(db)
        if daemon is not None:  # the daemon holds the file: let it do the work
            ctx = click.get_current_context()
            result = call_daemon(daemon, "/gaps", {
                "start": start, "end": end, "enqueue": enqueue, "kafka_bootstrap": kafka_bootstrap,
                "audit": not no_audit, "dids": explicit,
                **_user_set(ctx, {"plc_url": ("plc_url", plc_url),
                                  "allow_private_hosts": ("allow_private_hosts", allow_private_hosts)}),
            })
        else:
            with _open(db) as store:
                result = asyncio.run(run_gaps(store, start=lo, end=hi, config=config, audit=not no_audit,
                                              explicit_dids=explicit, enqueue=enqueue,
                                              kafka_bootstrap=kafka_bootstrap))
    except SkyfillError as exc:
        raise click.ClickException(one_line(exc)) from exc
    lines = [f"gaps {result['start']} .. {result['end']}: {result['total']} DIDs"]
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
@_plc_option
@option("--concurrency", type=click.IntRange(1, 1024), default=32, show_default=True, help="Repos in flight.")
@option("--per-host-rps", type=FiniteFloatRange(0.01), default=10.0, show_default=True, help="Requests/s per PDS.")
@option("--no-verify", is_flag=True, help="Skip commit signature verification.")
@_private_option
@option("--max-car-bytes", type=click.IntRange(1024), default=512 * 1024 * 1024, show_default=True)
@option("--max-attempts", type=click.IntRange(1), default=8, show_default=True,
        help="Transient failures before a DID is marked Failed.")
@option("--kafka-bootstrap", default=None,
        help="Also publish each reconciliation (source backfill) to Kafka before committing it locally. "
             "With `skyfill consume` running, its own --kafka-bootstrap applies instead.")
@json_option
def backfill(
    db: str, dids_spec: str | None, from_queue: bool, plc_url: str, concurrency: int, per_host_rps: float,
    no_verify: bool, allow_private_hosts: bool, max_car_bytes: int, max_attempts: int,
    kafka_bootstrap: str | None, as_json: bool,
) -> None:
    """Fetch, verify and reconcile whole repos."""
    if (dids_spec is None) == (not from_queue):
        raise click.UsageError("give exactly one of --dids or --from-queue")
    try:
        dids = parse_dids(dids_spec) if dids_spec is not None else None
        config = BackfillConfig(
            plc_url=plc_url, concurrency=concurrency, per_host_rps=per_host_rps, verify=not no_verify,
            allow_private_hosts=allow_private_hosts, max_car_bytes=max_car_bytes, max_attempts=max_attempts,
        )
    except ConfigError as exc:
        raise click.BadParameter(one_line(exc)) from exc
    try:
        daemon = find_daemon(db)
        if daemon is not None:  # the daemon holds the file: reconcile through its writer
            ctx = click.get_current_context()
            data = call_daemon(daemon, "/backfill", {
                "dids": dids, "from_queue": from_queue,
                **_user_set(ctx, {
                    "plc_url": ("plc_url", plc_url), "concurrency": ("concurrency", concurrency),
                    "per_host_rps": ("per_host_rps", per_host_rps), "no_verify": ("verify", not no_verify),
                    "allow_private_hosts": ("allow_private_hosts", allow_private_hosts),
                    "max_car_bytes": ("max_car_bytes", max_car_bytes), "max_attempts": ("max_attempts", max_attempts),
                }),
            })
            summary = BackfillSummary.from_json(data)
        else:
            with _open(db) as store:
                summary = asyncio.run(run_backfill(store, dids=dids, from_queue=from_queue, config=config,
                                                   progress=sys.stderr.isatty() and not as_json,
                                                   kafka_bootstrap=kafka_bootstrap))
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
