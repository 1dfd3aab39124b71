"""The backfiller's settings (one frozen value) and the parsing of user input, done once at the
boundary (CLI, handler, daemon API)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Final, Literal

from skyfill.errors import ConfigError, UnsafeHostError
from skyfill.protocol.syntax import is_did

from skyfill.net.guard import check_url

__all__ = ["BackfillConfig", "DEFAULT_PLC_URL", "ALL", "parse_when", "parse_window", "parse_dids"]

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
    connect_timeout: float = 10.0
    read_timeout: float = 60.0            # silence (no byte at all) tolerated while reading
    # A body must keep moving: each further `min_transfer_bytes` within `transfer_window`
    # seconds, and a whole request within request_deadline_base + cap / request_deadline_rate
    # seconds (64 s for a DID document, ~35 min for a repo at the 512 MiB cap).
    min_transfer_bytes: int = 64 * 1024
    transfer_window: float = 30.0
    request_deadline_base: float = 60.0
    request_deadline_rate: float = 256 * 1024  # bytes/s
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
