"""The `skyfill` command. Each package contributes its subcommands from its own cli module.

Every option also reads an environment variable SKYFILL_<OPTION> (dashes -> underscores,
upper case): `--db` <- SKYFILL_DB, `--plc-url` <- SKYFILL_PLC_URL, and so on. Options are read
once here and passed down as frozen config objects; nothing below reads the environment.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

import click

__all__ = ["main", "option", "db_option", "json_option"]

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


class _Group(click.Group):
    """Registers the packages' subcommands on first use. Each package's cli module imports this
    module, so registering at import time could see that module half-initialised (no COMMANDS
    yet) when it is the one imported first (e.g. `import backfill.cli`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        _register()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        _register()
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@option("--log-level", default="INFO", show_default=True, help="DEBUG, INFO, WARNING, ERROR.")
@option("--log-json", is_flag=True, help="Structured JSON log lines (default when not on a terminal).")
def main(log_level: str, log_json: bool) -> None:
    """skyfill: a complete, correct, up-to-date copy of AT Protocol data in DuckDB."""
    from ._logging import configure_logging

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
