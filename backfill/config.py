"""The backfiller's settings (one frozen value) and the parsing of user input, done once at the
boundary (CLI, handler, daemon API)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

from skyfill._fields import field_default
from skyfill.errors import ConfigError, UnsafeHostError
from skyfill.net.guard import check_url
from skyfill.net.http import Transfer
from skyfill.protocol.syntax import is_did

__all__ = [
    "BackfillConfig",
    "DEFAULT_PLC_URL",
    "OPTIONS",
    "backfill_config",
    "parse_flag",
    "ALL",
    "parse_when",
    "parse_window",
    "parse_dids",
]

DEFAULT_PLC_URL = "https://plc.directory"


@dataclass(frozen=True, slots=True, kw_only=True)
class BackfillConfig:
    plc_url: str = DEFAULT_PLC_URL
    concurrency: int = 32                 # repos in flight at once, across all hosts
    per_host_rps: float = 10.0            # token-bucket rate per PDS host (the client enforces it)
    per_host_concurrency: int = 4         # requests in flight per PDS host
    verify: bool = True                   # check the commit signature against the DID document key
    allow_private_hosts: bool = False     # allow loopback/private PDS endpoints (tests, local networks)
    max_car_bytes: int = 512 * 1024 * 1024
    # Request time limits (net.http.Transfer holds the defaults): a body must keep moving, each
    # further `min_transfer_bytes` within `transfer_window` seconds, and a whole request must end
    # within request_deadline_base + cap / request_deadline_rate seconds (64 s for a DID
    # document, ~35 min for a repo at the 512 MiB cap). Whole repos tolerate a longer silence.
    connect_timeout: float = field_default(Transfer, "connect_timeout")
    read_timeout: float = 60.0
    min_transfer_bytes: int = field_default(Transfer, "min_transfer_bytes")
    transfer_window: float = field_default(Transfer, "transfer_window")
    request_deadline_base: float = field_default(Transfer, "deadline_base")
    request_deadline_rate: float = field_default(Transfer, "deadline_rate")
    # A host parked by rate limits: the longest park any header can ask for, and how long one
    # DID of `backfill --dids` waits for parked hosts in total before it is recorded
    # 'retrying' with retry_after = the park's end (the queue mode defers at once instead).
    max_park: timedelta = timedelta(hours=1)
    rate_limit_patience: timedelta = timedelta(minutes=10)
    request_retries: int = 3              # 5xx/network retries inside one attempt (client-side)
    request_backoff: float = 1.0          # first in-attempt retry delay, seconds (doubles, jittered)
    max_attempts: int = 8                 # transient failures before the row is marked Failed
    backoff_min: timedelta = timedelta(minutes=1)
    backoff_max: timedelta = timedelta(hours=1)
    identity_ttl: timedelta = timedelta(hours=24)
    # Store only these collections (NSIDs or prefixes with .*; empty: every collection). Each
    # backfill records the filter it used, per DID: `gaps --collections` flags DIDs whose last
    # backfill's filter falls short of what is wanted now (filter_changed).
    collections: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            check_url(self.plc_url)
        except UnsafeHostError as exc:
            raise ConfigError(f"plc_url must be a well-formed http(s) URL: {exc}") from exc
        if self.concurrency < 1:
            raise ConfigError("concurrency must be >= 1")
        if self.per_host_concurrency < 1:
            raise ConfigError("per_host_concurrency must be >= 1")
        if self.per_host_rps <= 0:
            raise ConfigError("per_host_rps must be > 0")
        if self.max_car_bytes < 1024:
            raise ConfigError("max_car_bytes must be >= 1024")
        if not all(
            0 < t < float("inf")
            for t in (self.connect_timeout, self.read_timeout, self.transfer_window, self.request_deadline_base,
                      self.request_deadline_rate)
        ):
            raise ConfigError("timeouts, transfer window and deadline rate must be finite and > 0")
        if self.min_transfer_bytes < 1:
            raise ConfigError("min_transfer_bytes must be >= 1")
        if self.max_park <= timedelta(0) or self.rate_limit_patience < timedelta(0):
            raise ConfigError("need max_park > 0 and rate_limit_patience >= 0")
        if self.request_retries < 0 or self.request_backoff < 0:
            raise ConfigError("request_retries and request_backoff must be >= 0")
        if self.max_attempts < 1:
            raise ConfigError("max_attempts must be >= 1")
        if self.backoff_min <= timedelta(0) or self.backoff_max < self.backoff_min:
            raise ConfigError("need 0 < backoff_min <= backoff_max")
        if self.identity_ttl < timedelta(0):
            raise ConfigError("identity_ttl must be >= 0")

    def transfer(self) -> Transfer:
        """The request time limits of these options, for the PDS client."""
        return Transfer(connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
                        min_transfer_bytes=self.min_transfer_bytes, transfer_window=self.transfer_window,
                        deadline_base=self.request_deadline_base, deadline_rate=self.request_deadline_rate)

    @classmethod
    def field_default(cls, name: str) -> Any:
        """The default of one field (what `--help` shows for its option)."""
        return field_default(cls, name)


# -- one builder for every boundary ----------------------------------------------------------------

# The options a user sets, by one name everywhere: the CLI flag `--per-host-rps`, the environment
# variable `SKYFILL_PER_HOST_RPS` (click and `lambda_handler`), the JSON key `per_host_rps` (the
# admin API, the CLI -> daemon body). `no_verify` (a CLI flag, an environment variable) and `verify`
# (a JSON key) set the same field. The rest of BackfillConfig is tuning, set from Python.
OPTIONS: Final = ("plc_url", "allow_private_hosts", "concurrency", "per_host_rps", "verify", "no_verify",
                  "max_car_bytes", "max_attempts")

_KINDS: Final[dict[str, str]] = {f.name: str(f.type) for f in fields(BackfillConfig)}
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off", ""})


def backfill_config(
    options: Mapping[str, Any], *, base: BackfillConfig | None = None, text: bool = False,
    label: Callable[[str], str] = repr,
) -> BackfillConfig:
    """The one way a BackfillConfig is built from user input: a flat mapping option name -> value
    (names from `OPTIONS`). A value of None is an option not given: it keeps `base`'s setting, or
    the dataclass default. Values must have their field's type (bool, int, finite number, str);
    with `text` (the environment), strings are parsed first and an empty string is "not given".
    `label(name)` names an option in an error: `'concurrency'`, `SKYFILL_CONCURRENCY`, ...
    Raises ConfigError (one line) for an unknown name, a wrong type or an invalid setting."""
    changes: dict[str, Any] = {}
    for name, value in options.items():
        if name not in OPTIONS:
            raise ConfigError(f"unknown backfill option {name!r}")
        if value is None or (text and isinstance(value, str) and value.strip() == ""):
            continue
        field = "verify" if name == "no_verify" else name
        parsed = _typed(value, _KINDS[field], what=label(name), text=text)
        changes[field] = (not parsed) if name == "no_verify" else parsed
    if base is not None:
        return replace(base, **changes)
    return BackfillConfig(**changes)


def parse_flag(value: str, what: str) -> bool:
    """An environment variable's boolean: 1/true/yes/on or 0/false/no/off/(empty)."""
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigError(f"{what} must be a boolean, got {word!r}")


def _typed(value: Any, kind: str, *, what: str, text: bool) -> Any:
    if text and isinstance(value, str) and kind != "str":
        if kind == "bool":
            return parse_flag(value, what)
        try:
            number = int(value) if kind == "int" else float(value)
        except ValueError:
            raise ConfigError(f"{what} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{what} must be a number, got {value!r}")
        return number
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{what} must be true or false")
    elif kind == "int":
        if type(value) is not int:
            raise ConfigError(f"{what} must be an integer")
    elif kind == "float":
        if type(value) not in (int, float) or not math.isfinite(value):
            raise ConfigError(f"{what} must be a finite number")
        return float(value)
    elif not isinstance(value, str):
        raise ConfigError(f"{what} must be a string")
    return value


def parse_when(value: str, *, end_of_day: bool = False) -> datetime:
    """`YYYY-MM-DD` or ISO 8601 -> an aware UTC datetime (no zone = UTC).

    A bare date as the END of a window means the end of that day, so `--start 2025-03-10
    --end 2025-03-10` is the whole of the 10th.
    """
    text = value.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            ts = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return ts + timedelta(days=1) - timedelta(microseconds=1) if end_of_day else ts
        ts = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError as exc:
        raise ConfigError(f"not a date (YYYY-MM-DD) or ISO 8601 time: {value!r}") from exc
    except OverflowError as exc:  # 9999-12-31 as the end of a window: the day after does not exist
        raise ConfigError(f"date out of range: {value!r}") from exc
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def parse_window(start: str, end: str) -> tuple[datetime, datetime]:
    lo, hi = parse_when(start), parse_when(end, end_of_day=True)
    if hi < lo:
        raise ConfigError(f"end {end!r} is before start {start!r}")
    return lo, hi


ALL: Final = "all"


def parse_dids(spec: str | Iterable[str]) -> list[str] | Literal["all"]:
    """`all`, `did1,did2`, `@file` (one DID a line, # comments) or a list -> validated DIDs.

    Raises ConfigError naming the first invalid entries; duplicates are dropped, order kept.
    """
    if isinstance(spec, str):
        text = spec.strip()
        if text == ALL:
            return ALL
        if text.startswith("@"):
            try:
                lines = Path(text[1:]).read_text().splitlines()
            except OSError as exc:
                raise ConfigError(f"cannot read DID file {text[1:]!r}: {exc.strerror or exc}") from exc
            except UnicodeDecodeError as exc:
                raise ConfigError(f"DID file {text[1:]!r} is not UTF-8 text (byte {exc.start})") from exc
            items = [line.split("#", 1)[0].strip() for line in lines]
        else:
            items = [part.strip() for part in text.split(",")]
    else:
        items = [str(part).strip() for part in spec]
    dids = list(dict.fromkeys(d for d in items if d))
    bad = [d for d in dids if not is_did(d)]
    if bad:
        raise ConfigError(f"invalid DID(s): {', '.join(repr(b) for b in bad[:5])}")
    if not dids:
        raise ConfigError("no DIDs given")
    return dids
