"""The `skyfill` command. Each package contributes its subcommands from its own cli module.

Every option also reads an environment variable SKYFILL_<OPTION> (dashes -> underscores,
upper case): `--db` <- SKYFILL_DB, `--plc-url` <- SKYFILL_PLC_URL, and so on. Options are read
once here and passed down as frozen config objects; nothing below reads the environment.
"""

from __future__ import annotations

import importlib
import logging
import math
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import click
import duckdb

from ._logging import configure_logging
from .errors import SkyfillError

__all__ = ["main", "option", "db_option", "json_option", "one_line", "LOG_LEVELS", "FiniteFloatRange"]

log = logging.getLogger("skyfill")

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


class _Group(click.Group):
    """Registers the packages' subcommands on first use. Each package's cli module imports this
    module, so registering at import time could see that module half-initialised (no COMMANDS
    yet) when it is the one imported first (e.g. `import backfill.cli`).

    Also the one place where an error that escaped a command becomes a one-line `Error: ...`
    (exit 1): skyfill's own errors, OS errors and DuckDB errors by their message; anything else
    is a bug, logged as one structured line (its traceback only at --log-level DEBUG)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        _register()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        _register()
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except (SkyfillError, OSError, duckdb.Error) as exc:
            raise click.ClickException(one_line(exc)) from exc
        except Exception as exc:
            frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
            where = f"{frame.filename}:{frame.lineno}" if frame else "?"
            log.error("unexpected error", extra={"ctx": {"error": type(exc).__name__, "detail": one_line(exc)[:500],
                                                         "at": where}})
            log.debug("unexpected error: traceback", exc_info=exc)
            raise click.exceptions.Exit(1) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@option("--log-level", default="INFO", show_default=True, type=click.Choice(LOG_LEVELS, case_sensitive=False),
        help="Least severe log level shown.")
@option("--log-json", is_flag=True, help="Structured JSON log lines (default when not on a terminal).")
def main(log_level: str, log_json: bool) -> None:
    """skyfill: a complete, correct, up-to-date copy of AT Protocol data in DuckDB."""
    configure_logging(level=log_level, json_lines=log_json)


_registered = False


def _register() -> None:
    # Subcommands live next to the code they drive; a package that is not there yet is skipped
    # so the CLI still works while it is being built.
    global _registered
    if _registered:
        return
    _registered = True
    for module in ("consumer.cli", "backfill.cli", "storage.cli", "skyfill.kafka_cli", "publish.cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        for cmd in getattr(mod, "COMMANDS", ()):
            main.add_command(cmd)


if __name__ == "__main__":  # pragma: no cover
    main()
