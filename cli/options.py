"""Shared click options. Every option also reads an environment variable SKYFILL_<OPTION>
(dashes -> underscores, upper case): `--db` <- SKYFILL_DB, `--plc-url` <- SKYFILL_PLC_URL, and so
on. Options are read once here and passed down as frozen config objects; nothing below reads the
environment."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import click

__all__ = ["option", "db_option", "json_option", "one_line", "LOG_LEVELS", "FiniteFloatRange", "DEFAULT_DB"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_DB = "data/skyfill.duckdb"


def option(*decls: str, **kwargs: Any) -> Callable[[F], F]:
    """`click.option` with the SKYFILL_<OPTION> environment variable filled in."""
    long = next(d for d in decls if d.startswith("--"))
    name = long[2:].split("/")[0]
    kwargs.setdefault("envvar", "SKYFILL_" + name.replace("-", "_").upper())
    kwargs.setdefault("show_envvar", True)
    return click.option(*decls, **kwargs)


db_option = option("--db", default=DEFAULT_DB, show_default=True, help="DuckDB file.")
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


