"""The benchmark harness: a registry of parts, shared sizes and data, a table and a JSON file.

A part is a function `(ctx: Context) -> list[Row]` registered with `@part("name")` in any
module of the `bench.parts` package (modules there are imported on start, so adding a
benchmark means adding a module; nothing else changes). Parts share generated data through
`ctx.memo(key, factory)` so frames are drawn once per run.
"""

from __future__ import annotations

import importlib
import json
import math
import pkgutil
import platform
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from .progress import running

__all__ = [
    "Row",
    "Sizes",
    "Context",
    "part",
    "registry",
    "discover",
    "run_parts",
    "render",
    "write_results",
    "timed_rate",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Row:
    """One measurement. `ok` is None when the row has no target (informational)."""

    name: str
    value: float
    unit: str
    target: float | None = None
    ok: bool | None = None

    @classmethod
    def at_least(cls, name: str, value: float, unit: str, target: float | None) -> Row:
        """A higher-is-better measurement, checked against `target` when one is given."""
        return cls(name, value, unit, target, None if target is None else value >= target)

    @classmethod
    def at_most(cls, name: str, value: float, unit: str, target: float | None) -> Row:
        return cls(name, value, unit, target, None if target is None else value <= target)


@dataclass(frozen=True, slots=True)
class Sizes:
    smoke: bool
    n_dids: int
    gen_frames: int        # frames drawn (and dropped) to time the generator
    frames: int            # frames kept in memory for the decode parts
    repo_records: int      # records in the generated repo

    @classmethod
    def for_run(cls, *, smoke: bool) -> Sizes:
        if smoke:
            return cls(smoke=True, n_dids=50, gen_frames=2_000, frames=2_000, repo_records=2_000)
        return cls(smoke=False, n_dids=1_000, gen_frames=200_000, frames=50_000, repo_records=300_000)


@dataclass(slots=True)
class Context:
    sizes: Sizes
    seed: int = 1
    _memo: dict[str, Any] = field(default_factory=dict)

    def memo(self, key: str, factory: Callable[[], T]) -> T:
        if key not in self._memo:
            self._memo[key] = factory()
        value: T = self._memo[key]
        return value


PartFn = Callable[[Context], list[Row]]
registry: dict[str, PartFn] = {}
_order: dict[str, int] = {}


def part(name: str, *, order: int = 100) -> Callable[[PartFn], PartFn]:
    """Register a part; `python -m bench` with no names runs all parts by `order`, then name."""

    def register(fn: PartFn) -> PartFn:
        if name in registry and registry[name] is not fn:
            raise ValueError(f"benchmark part {name!r} registered twice")
        registry[name] = fn
        _order[name] = order
        return fn

    return register


def discover() -> dict[str, PartFn]:
    """Import every module of `bench.parts` (each registers its parts); the registry, in run order."""
    package = importlib.import_module("bench.parts")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"bench.parts.{info.name}")
    return {name: registry[name] for name in sorted(registry, key=lambda n: (_order[n], n))}


def timed_rate(count: int, fn: Callable[[], object]) -> tuple[float, float]:
    """(items per second, seconds) of one call of `fn` that handles `count` items."""
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return (count / seconds if seconds > 0 else math.inf), seconds


def run_parts(names: Sequence[str], ctx: Context) -> tuple[list[Row], list[str]]:
    """Run the named parts in order; a failing part yields an error message, not an abort."""
    rows: list[Row] = []
    errors: list[str] = []
    for name in names:
        try:
            with running(name):  # start/done lines and a heartbeat on stderr (bench/progress.py)
                rows.extend(registry[name](ctx))
        except Exception as exc:  # report and continue: one broken part must not hide the rest
            errors.append(f"{name}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            rows.append(Row(f"{name}.error", math.nan, "", None, False))
    return rows, errors


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isnan(value):
        return "error"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.3g}"


def render(rows: Sequence[Row], *, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("benchmark")
    table.add_column("value", justify="right")
    table.add_column("unit")
    table.add_column("target", justify="right")
    table.add_column("ok", justify="center")
    for row in rows:
        ok = "—" if row.ok is None else ("[green]yes[/]" if row.ok else "[red]NO[/]")
        table.add_row(row.name, _fmt(row.value), row.unit, _fmt(row.target), ok)
    Console().print(table)


def write_results(path: Path, rows: Sequence[Row], ctx: Context, errors: Sequence[str]) -> None:
    doc = {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "smoke": ctx.sizes.smoke,
        "seed": ctx.seed,
        "sizes": asdict(ctx.sizes),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "rows": [
            {**asdict(r), "value": None if math.isnan(r.value) else r.value} for r in rows
        ],
        "errors": list(errors),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
