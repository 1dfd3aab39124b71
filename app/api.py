"""JSON request bodies (the daemon's admin API, the CLI talking to it) -> the backfill cores.

A body carries the same options as the command line, as plain JSON values:
    gaps:      {"start", "end", "enqueue" (bool, "db" or "kafka"), "kafka_bootstrap", "audit", "dids",
                "plc_url", "allow_private_hosts"}
    backfill:  {"dids" (a list, or "all") | "from_queue", "concurrency", "per_host_rps", "verify" (or
                "no_verify"), "max_car_bytes", "max_attempts", "plc_url", "allow_private_hosts"}
    enqueue:   {"dids" (a list), "reason"}
Absent (or null) options keep the daemon's own BackfillConfig (the one `skyfill consume` was
given); options are read by `skyfill.backfill.config.backfill_config`, as from every other source.
Each body is parsed once into a frozen request (`GapsRequest.parse(...)` ...): an unknown key, a
wrongly typed value or an invalid DID raises ConfigError with one line naming the field, before
any work starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from skyfill.errors import ConfigError
from skyfill.storage import Store

from skyfill.backfill.backfiller import Reconciler
from skyfill.backfill.config import ALL, OPTIONS, BackfillConfig, backfill_config, parse_dids, parse_window

from .jobs import run_backfill, run_gaps

__all__ = [
    "GapsRequest",
    "BackfillRequest",
    "EnqueueRequest",
    "gaps_from_request",
    "backfill_from_request",
    "ConfigOptions",
]

_MAX_REASON = 200


# -- typed reading of one JSON object --------------------------------------------------------


class _Body:
    """One request body: each field read once, with its type checked; leftovers are an error."""

    def __init__(self, body: Any, route: str) -> None:
        if not isinstance(body, Mapping):
            raise ConfigError(f"{route}: the body must be a JSON object")
        self._body = dict(body)
        self._route = route

    def take(self, key: str) -> Any:
        return self._body.pop(key, None)

    def label(self, key: str) -> str:
        return f"{self._route}: {key!r}"

    def bad(self, key: str, want: str) -> ConfigError:
        return ConfigError(f"{self.label(key)} must be {want}")

    def flag(self, key: str) -> bool | None:
        value = self.take(key)
        if value is not None and not isinstance(value, bool):
            raise self.bad(key, "true or false")
        return value

    def text(self, key: str) -> str | None:
        value = self.take(key)
        if value is not None and not isinstance(value, str):
            raise self.bad(key, "a string")
        return value

    def dids(self, key: str, *, allow_all: bool) -> tuple[str, ...] | Literal["all"] | None:
        value = self.take(key)
        if value is None:
            return None
        if allow_all and value == ALL:
            return ALL
        if value == []:
            return ()
        if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
            raise self.bad(key, 'a list of DIDs' + (' or "all"' if allow_all else ""))
        try:
            parsed = parse_dids(value)
        except ConfigError as exc:
            raise ConfigError(f"{self._route}: {key!r}: {exc}") from None
        if parsed == ALL:  # a list holding the one string "all" is not the keyword
            raise self.bad(key, "a list of DIDs")
        return tuple(parsed)

    def done(self) -> None:
        if self._body:
            raise ConfigError(f"{self._route}: unknown field(s) {', '.join(sorted(map(repr, self._body)))}")


# The backfill options a request may set (the rest of BackfillConfig is the daemon's tuning).
_GAPS_OPTIONS = ("plc_url", "allow_private_hosts")


@dataclass(frozen=True, slots=True)
class ConfigOptions:
    """The backfill options a request set, as given (checked by `backfill_config` when parsed);
    the rest keep the daemon's own BackfillConfig."""

    given: tuple[tuple[str, Any], ...] = ()

    @staticmethod
    def read(body: _Body, names: tuple[str, ...]) -> ConfigOptions:
        given = tuple((name, value) for name in names if (value := body.take(name)) is not None)
        backfill_config(dict(given), label=body.label)  # types and values, before any work
        return ConfigOptions(given)

    def config(self, base: BackfillConfig) -> BackfillConfig:
        return backfill_config(dict(self.given), base=base)


@dataclass(frozen=True, slots=True, kw_only=True)
class GapsRequest:
    start: datetime
    end: datetime
    enqueue: Literal["db", "kafka"] | None = None
    kafka_bootstrap: str | None = None
    audit: bool = True
    dids: tuple[str, ...] = ()
    options: ConfigOptions = ConfigOptions()

    @classmethod
    def parse(cls, body: Any) -> GapsRequest:
        b = _Body(body, "gaps")
        start, end = b.text("start"), b.text("end")
        if start is None or end is None:
            raise ConfigError("gaps: 'start' and 'end' are required")
        lo, hi = parse_window(start, end)
        enqueue_raw = b.take("enqueue")
        enqueue: Literal["db", "kafka"] | None
        if enqueue_raw is None or enqueue_raw is False:
            enqueue = None
        elif enqueue_raw is True or enqueue_raw == "db":
            enqueue = "db"
        elif enqueue_raw == "kafka":
            enqueue = "kafka"
        else:
            raise b.bad("enqueue", 'true, false, "db" or "kafka"')
        kafka_bootstrap = b.text("kafka_bootstrap") or None
        if enqueue == "kafka" and not kafka_bootstrap:
            raise ConfigError("gaps: enqueue kafka needs 'kafka_bootstrap'")
        audit = b.flag("audit")
        dids = b.dids("dids", allow_all=False)
        options = ConfigOptions.read(b, _GAPS_OPTIONS)
        b.done()
        assert dids != ALL
        return cls(start=lo, end=hi, enqueue=enqueue, kafka_bootstrap=kafka_bootstrap,
                   audit=True if audit is None else audit, dids=dids or (), options=options)


@dataclass(frozen=True, slots=True, kw_only=True)
class BackfillRequest:
    dids: tuple[str, ...] | Literal["all"] | None = None
    from_queue: bool = False
    options: ConfigOptions = ConfigOptions()

    @classmethod
    def parse(cls, body: Any) -> BackfillRequest:
        b = _Body(body, "backfill")
        dids = b.dids("dids", allow_all=True)
        from_queue = bool(b.flag("from_queue"))
        options = ConfigOptions.read(b, OPTIONS)
        b.done()
        if (dids is None) == (not from_queue):
            raise ConfigError("backfill: give exactly one of 'dids' or 'from_queue': true")
        return cls(dids=dids, from_queue=from_queue, options=options)


@dataclass(frozen=True, slots=True, kw_only=True)
class EnqueueRequest:
    dids: tuple[str, ...]
    reason: str = "explicit"

    @classmethod
    def parse(cls, body: Any) -> EnqueueRequest:
        b = _Body(body, "enqueue")
        dids = b.dids("dids", allow_all=False)
        reason = b.text("reason")
        b.done()
        if not dids or dids == ALL:
            raise ConfigError("enqueue: 'dids' (a non-empty list of DIDs) is required")
        if reason is not None and not (0 < len(reason) <= _MAX_REASON):
            raise ConfigError(f"enqueue: 'reason' must be 1..{_MAX_REASON} characters")
        return cls(dids=dids, reason=reason or "explicit")


# -- the routes' work ----------------------------------------------------------------------------


async def gaps_from_request(
    store: Store, body: GapsRequest | Mapping[str, Any], *, config: BackfillConfig
) -> dict[str, Any]:
    """Run a gaps request (parsed, or a raw body to parse); options it does not set keep `config`."""
    req = body if isinstance(body, GapsRequest) else GapsRequest.parse(body)
    return await run_gaps(store, start=req.start, end=req.end, config=req.options.config(config), audit=req.audit,
                          explicit_dids=req.dids, enqueue=req.enqueue or False,
                          kafka_bootstrap=req.kafka_bootstrap)


async def backfill_from_request(
    store: Store, body: BackfillRequest | Mapping[str, Any], *, sink: Reconciler, config: BackfillConfig,
) -> dict[str, Any]:
    """Run a backfill request (parsed, or a raw body to parse) through `sink`; options it does not
    set keep `config`."""
    req = body if isinstance(body, BackfillRequest) else BackfillRequest.parse(body)
    dids = req.dids if req.dids in (None, ALL) else list(req.dids)
    summary = await run_backfill(store, dids=dids, config=req.options.config(config), from_queue=req.from_queue,
                                 sink=sink, progress=False)
    return summary.to_json()
