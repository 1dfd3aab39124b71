"""The `skyfill` command: the click group, and the one place an escaped error becomes one line.
The subcommands live next to it, one module per area (consume, backfill, kafka, export); they parse flags
into config objects and call the application, nothing more."""

from __future__ import annotations

import logging
import traceback
from typing import Any

import click
import duckdb

from skyfill._logging import configure_logging
from skyfill.backfill.progress import LOG_EVERY, set_log_every
from skyfill.errors import SkyfillError

from . import backfill, consume, export, kafka, maintenance, network
from .options import LOG_LEVELS, FiniteFloatRange, one_line, option

__all__ = ["main"]

log = logging.getLogger("skyfill")


class _Group(click.Group):
    """Turns an error that escaped a command into a one-line `Error: ...` (exit 1): skyfill's own
    errors, OS errors and DuckDB errors by their message; anything else is a bug, logged as one
    structured line (its traceback only at --log-level DEBUG)."""

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
        help="Least severe log level shown. DEBUG adds one line per HTTP request and per repo backfilled.")
@option("--log-json", is_flag=True, help="Structured JSON log lines (default when not on a terminal).")
@option("--progress-every", default=LOG_EVERY, show_default=True, type=FiniteFloatRange(min=0.1), metavar="SECONDS",
        help="Seconds between progress log lines of backfill, discover, identities sync and export when not on "
             "a terminal (on a terminal they show progress bars).")
def main(log_level: str, log_json: bool, progress_every: float) -> None:
    """skyfill: a complete, correct, up-to-date copy of AT Protocol data in DuckDB."""
    configure_logging(level=log_level, json_lines=log_json)
    set_log_every(progress_every)


for _module in (consume, backfill, kafka, maintenance, export, network):
    for _command in _module.COMMANDS:
        main.add_command(_command)
