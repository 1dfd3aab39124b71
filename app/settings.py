"""The daemon's settings: one frozen value built once from user input, whatever its source.

`daemon_settings(options)` takes a flat mapping option name -> value (the `skyfill consume` flags,
or a dict written in Python) and returns `Settings`: a ConsumeConfig (`consume_config`), the
BackfillConfig of every backfill the daemon runs (`skyfill.backfill.config.backfill_config`: its
own background loop and the admin API's, so `consume --backfill --concurrency 8` applies to both)
and the application's own switches. Each default is written once, in its dataclass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final
from urllib.parse import urlsplit

from skyfill._fields import field_default
from skyfill.backfill.config import OPTIONS as BACKFILL_OPTIONS
from skyfill.backfill.config import BackfillConfig, backfill_config
from skyfill.consumer.connection import subscribe_url
from skyfill.consumer.daemon import ConsumeConfig
from skyfill.errors import ConfigError
from skyfill.protocol.syntax import collection_matcher, is_nsid

__all__ = [
    "DEFAULT_DB",
    "Settings",
    "CONSUME_OPTIONS",
    "daemon_settings",
    "consume_config",
    "check_relay",
    "parse_collections",
    "default",
]

DEFAULT_DB: Final = "data/skyfill.duckdb"

# Options of ConsumeConfig a user sets (flag `--batch-events`, key `batch_events`). `publish` is
# not one: the application sets it when it publishes (Settings.kafka_bootstrap).
CONSUME_OPTIONS: Final = ("relay", "cursor", "collections", "strict_cursor", "batch_events", "flush_interval")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything `skyfill consume` runs with (see `Application`)."""

    db: str = DEFAULT_DB
    consume: ConsumeConfig = field(default_factory=ConsumeConfig)
    backfill: BackfillConfig = field(default_factory=BackfillConfig)  # the daemon's backfills
    run_backfill: bool = False          # keep desynchronized and queued DIDs repaired in the background
    backfill_interval: float = 5.0      # seconds between two rounds of that loop
    verify: bool = False                # check every #commit's signature and MST proof
    kafka_bootstrap: str | None = None  # publish every change to this broker before storing it
    metrics_port: int | None = None     # status page (/) and Prometheus metrics (/metrics) on 127.0.0.1:PORT
    admin_port: int = 0                 # admin API on 127.0.0.1:PORT (0: any free port)
    # DuckDB's buffer pool cap. Nothing needs to stay resident any more (no primary-key index), so
    # a small pool keeps the daemon's RSS flat at any store size; big joins spill to disk. Any scan
    # (start-up, the gauge, a compaction) fills it, and the rest of the daemon holds ~200 MB: at
    # 10^8 records a compaction peaked at 513 MB RSS with 320MB, 450 MB with 256MB, at the same speed.
    duckdb_memory_limit: str | None = "256MB"


_SETTINGS_OPTIONS: Final = tuple(f.name for f in fields(Settings) if f.name not in ("consume", "backfill"))
# `verify` here is the firehose check (Settings.verify); the daemon's backfills always verify
# unless `no_verify` is given.
_BACKFILL_OPTIONS: Final = tuple(name for name in BACKFILL_OPTIONS if name != "verify")


def check_relay(value: str) -> str:
    """A relay host or ws(s) URL whose host and port parse (`ws://[::1` or `ws://h:x` do not)."""
    try:
        parts = urlsplit(subscribe_url(value, None))
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError as exc:
        raise ConfigError(f"{value!r} is not a valid URL: {exc}") from None
    if not parts.hostname:
        raise ConfigError(f"{value!r} names no host")
    return value


def parse_collections(value: str | Iterable[str]) -> tuple[str, ...]:
    """`app.bsky.feed.post,app.bsky.graph.*` (or a list) -> NSIDs and NSID prefixes with `.*`."""
    items = value.split(",") if isinstance(value, str) else list(value)
    patterns = tuple(p.strip() for p in items if p.strip())
    for p in patterns:
        if not (is_nsid(p) or (p.endswith(".*") and is_nsid(p[:-2] + ".x"))):
            raise ConfigError(f"--collections: {p!r} is not an NSID or an NSID prefix with .*")
    collection_matcher(patterns)
    return patterns


def consume_config(options: Mapping[str, Any]) -> ConsumeConfig:
    """ConsumeConfig from a flat mapping (names from `CONSUME_OPTIONS`; None = not given)."""
    given = {k: v for k, v in options.items() if v is not None}
    unknown = set(given) - set(CONSUME_OPTIONS)
    if unknown:
        raise ConfigError(f"unknown consume option(s) {', '.join(sorted(map(repr, unknown)))}")
    if "relay" in given:
        check_relay(given["relay"])
    if "collections" in given:
        given["collections"] = parse_collections(given["collections"])
    return ConsumeConfig(**given)


def daemon_settings(options: Mapping[str, Any]) -> Settings:
    """Settings from one flat mapping of consume, backfill and application options (None = not
    given). The PLC directory's URL is checked here, whether or not --verify/--backfill use it."""
    rest = dict(options)
    backfill = backfill_config({k: rest.pop(k) for k in _BACKFILL_OPTIONS if k in rest},
                               label=lambda n: "--" + n.replace("_", "-"))
    consume = consume_config({k: rest.pop(k) for k in CONSUME_OPTIONS if k in rest})
    unknown = set(rest) - set(_SETTINGS_OPTIONS)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(sorted(map(repr, unknown)))}")
    return Settings(consume=consume, backfill=backfill, **{k: v for k, v in rest.items() if v is not None})


def default(name: str) -> Any:
    """The default of a consume or application option (what `--help` shows)."""
    return field_default(ConsumeConfig if name in CONSUME_OPTIONS else Settings, name)
