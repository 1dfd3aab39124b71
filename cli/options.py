"""Shared click options. Every option also reads an environment variable SKYFILL_<OPTION>
(dashes -> underscores, upper case): `--db` <- SKYFILL_DB, `--plc-url` <- SKYFILL_PLC_URL, and so
on. Options are read once here and passed down as frozen config objects; nothing below reads the
environment."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar, cast

import click
from click.core import ParameterSource

from skyfill.app.settings import DEFAULT_DB
from skyfill.backfill.config import BackfillConfig
from skyfill.storage.lake import is_lake, lake_db

__all__ = [
    "option",
    "db_option",
    "json_option",
    "plc_option",
    "private_option",
    "backfill_options",
    "user_set",
    "one_line",
    "LOG_LEVELS",
    "FiniteFloatRange",
    "rps_option",
]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

F = TypeVar("F", bound=Callable[..., Any])


def option(*decls: str, **kwargs: Any) -> Callable[[F], F]:
    """`click.option` with the SKYFILL_<OPTION> environment variable filled in."""
    long = next(d for d in decls if d.startswith("--"))
    name = long[2:].split("/")[0]
    kwargs.setdefault("envvar", "SKYFILL_" + name.replace("-", "_").upper())
    kwargs.setdefault("show_envvar", True)
    return click.option(*decls, **kwargs)


_db = option("--db", default=DEFAULT_DB, show_default=True,
             help="DuckDB file, or a DuckLake: ducklake:<catalog>, e.g. 'ducklake:postgres:dbname=mirror "
                  "host=127.0.0.1 user=skyfill' (then --data-path on its first use).")
_data_path = option("--data-path", type=click.Path(file_okay=False), default=None,
                    help="Where a DuckLake (--db ducklake:...) keeps its Parquet files (required to create one).")


def db_option(f: F) -> F:
    """`--db` and `--data-path`, handed to the command as one `db` string (storage/lake.py's lake_db)."""

    @functools.wraps(f)
    def command(*args: Any, db: str, data_path: str | None, **kwargs: Any) -> Any:
        if data_path is not None and not is_lake(db):
            raise click.BadParameter("only for a DuckLake (--db ducklake:...)", param_hint="--data-path")
        return f(*args, db=lake_db(db, data_path) if is_lake(db) else db, **kwargs)

    return cast(F, _db(_data_path(command)))
json_option = option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (DuckDB and OS messages can span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


class FiniteFloatRange(click.FloatRange):
    """`click.FloatRange` that also refuses nan and inf (nan compares false to both bounds)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


# -- the backfiller's options (skyfill backfill, gaps, consume, backfill-worker) ---------------------
# Their names are the builder's (skyfill.backfill.config.OPTIONS); their defaults are the dataclass's.


def _default(name: str) -> Any:
    return BackfillConfig.field_default(name)


plc_option = option("--plc-url", default=_default("plc_url"), show_default=True, help="PLC directory.")
private_option = option(
    "--allow-private-hosts", is_flag=True, help="Allow loopback/private PDS and did:web hosts (tests only)."
)
concurrency_option = option("--concurrency", type=click.IntRange(1, 1024), default=_default("concurrency"),
                            show_default=True, help="Repos in flight.")
rps_option = option("--per-host-rps", type=FiniteFloatRange(0.01), default=_default("per_host_rps"),
                    show_default=True, help="Requests/s per PDS.")
no_verify_option = option("--no-verify", is_flag=True, help="Skip commit signature verification.")
car_option = option("--max-car-bytes", type=click.IntRange(1024), default=_default("max_car_bytes"),
                    show_default=True)
attempts_option = option("--max-attempts", type=click.IntRange(1), default=_default("max_attempts"),
                         show_default=True, help="Transient failures before a DID is marked Failed.")


def backfill_options(*, verify: bool = True) -> Callable[[F], F]:
    """The backfiller's tuning options (`--concurrency` ... `--max-attempts`); `verify=False` leaves
    out `--no-verify` (where `--verify` means something else, as on `skyfill consume`)."""
    decorators = [concurrency_option, rps_option, *([no_verify_option] if verify else []), car_option,
                  attempts_option]

    def apply(f: F) -> F:
        for decorate in reversed(decorators):
            f = decorate(f)
        return f

    return apply


def user_set(ctx: click.Context, options: dict[str, Any]) -> dict[str, Any]:
    """The options the user gave (flag, environment, ...); the rest are left out, so a running
    daemon's own settings are not replaced by this command's defaults."""
    return {name: value for name, value in options.items()
            if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)}
