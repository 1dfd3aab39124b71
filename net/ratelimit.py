"""Per-host politeness: a token bucket, concurrency caps, and parking on rate-limit signals.

A host is PARKED when it says so: a 429 (or 503) with `Retry-After` (seconds or an HTTP date),
or `RateLimit-Remaining: 0` with `RateLimit-Reset`. While parked, every request to that host
waits in `slot()` until the park ends, and no request to it is sent before then (the park is
re-checked after every wait, the last time with no await before the request goes out); a 429
is backpressure, never a failure of the DID. Only a caller's `deadline` turns a wait into
RateLimited(retry_at=...), so the caller can reschedule the DID without counting an attempt.

Header values are read strictly. `Retry-After` is delay-seconds (digits; a decimal fraction
is tolerated) or an HTTP date; `RateLimit-Reset` is digits, read as epoch seconds (what the
reference PDS sends) or, below 1e9, as delta seconds (the IETF draft's form). Anything else
(`1e309`, `inf`, `nan`, `-5`, `0x10`, words) is MALFORMED: ignored, logged and counted, and
the answer is read as if the header were absent (a 429 then parks for `default_park`). A
well-formed value that ends more than `max_park` from now (a huge number, a date in the
year 9999) is CLAMPED to `max_park`, logged and counted. A 429 parks for at least `min_park`.

Pacing. Each host's token bucket runs at `per_host_rps` with a burst of one request (a burst
of `per_host_rps` sent at once, then refilled, puts 2x the rate into one fixed window: the
reference PDS counts in fixed windows, rate-limiter-flexible's). When a host publishes its
policy (`RateLimit-Policy: 10;w=1`, what the reference PDS sends: limit;w=window seconds), its
bucket runs at PACE_MARGIN x limit / window if that is lower than `per_host_rps`: right at the
limit, a few milliseconds of jitter put an 11th request into a 10-per-second window (measured
by bench/network: 7 requests over the limit in 150 at 10/s). A malformed policy is ignored.

Times: parks are epoch seconds (they come from headers and are shown to users); the token
bucket runs on the monotonic clock.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from skyfill import metrics
from skyfill.errors import ConfigError, RateLimited

__all__ = ["PACE_MARGIN", "HostLimiter", "LimiterCounters", "parse_policy", "parse_retry_after"]

log = logging.getLogger(__name__)

_EPOCH_THRESHOLD = 1e9
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]{1,9})?")
_POLICY = re.compile(r"\s*([0-9]{1,12})\s*;\s*w=([0-9]{1,9}(?:\.[0-9]{1,9})?)\s*(?:;.*)?")
PACE_MARGIN = 0.95          # a published limit is approached to 95%, never reached
_MIN_RATE = 0.01            # requests/s: the slowest pace a policy can ask for


@dataclass(frozen=True, slots=True)
class LimiterCounters:
    requests: int          # slots granted
    rate_limited: int      # 429 answers seen
    parks: int             # times a host was parked (or its park extended)
    hosts: int             # hosts ever seen


@dataclass(slots=True)
class _Host:
    tokens: float
    refilled_at: float
    sem: asyncio.Semaphore
    parked_until: float = 0.0   # epoch seconds
    limit: int | None = None    # last RateLimit-Limit seen, for display
    rate: float | None = None   # requests/s from the host's RateLimit-Policy (None: per_host_rps)


def parse_retry_after(value: str, *, now: float) -> float | None:
    """`Retry-After` as an epoch time: delay-seconds or an HTTP date. None if malformed.

    The result may lie far in the future (the caller clamps it); it is always finite.
    """
    value = value.strip()
    if _SECONDS.fullmatch(value):
        return min(now + float(value), math.ldexp(1.0, 62))
    if not value or value[0].isdigit() or value[0] in "+-.":
        return None  # a number in another spelling (1e309, -5, .5): not a date either
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return when if math.isfinite(when) else None


def parse_policy(value: str) -> float | None:
    """The sustained rate (requests/s) of a `RateLimit-Policy` (`limit;w=seconds`, comma-separated
    policies: the strictest wins). None if no entry is well-formed."""
    rates = []
    for part in value.split(",")[:16]:
        m = _POLICY.fullmatch(part)
        if m is not None and int(m.group(1)) > 0 and float(m.group(2)) > 0:
            rates.append(int(m.group(1)) / float(m.group(2)))
    return min(rates) if rates else None


def _reset_seconds(value: str | None) -> float | None:
    """`RateLimit-Reset` (digits only) as a number; None if absent or malformed."""
    if value is None:
        return None
    value = value.strip()
    return float(value) if _SECONDS.fullmatch(value) else None


class HostLimiter:
    """Token bucket + concurrency cap per host, a global concurrency cap, and host parking."""

    def __init__(
        self,
        *,
        per_host_rps: float = 10.0,
        per_host_burst: float | None = None,
        per_host_concurrency: int = 4,
        global_concurrency: int = 64,
        min_park: float = 1.0,
        default_park: float = 5.0,
        max_park: float = 3600.0,
    ) -> None:
        if per_host_rps <= 0 or per_host_concurrency < 1 or global_concurrency < 1:
            raise ConfigError("rates and concurrency caps must be positive")
        self.per_host_rps = per_host_rps
        self._burst = per_host_burst if per_host_burst is not None else 1.0
        self._per_host_concurrency = per_host_concurrency
        self._global = asyncio.Semaphore(global_concurrency)
        self._min_park = min_park
        self._default_park = default_park
        self._max_park = max_park
        self._hosts: dict[str, _Host] = {}
        self._requests = 0
        self._rate_limited = 0
        self._parks = 0

    def _host(self, host: str) -> _Host:
        state = self._hosts.get(host)
        if state is None:
            state = _Host(self._burst, time.monotonic(), asyncio.Semaphore(self._per_host_concurrency))
            self._hosts[host] = state
        return state

    # -- waiting ---------------------------------------------------------------------------

    async def _wait_unparked(self, state: _Host, host: str, deadline: float | None) -> None:
        while True:
            now = time.time()
            if state.parked_until <= now:
                return
            if deadline is not None and state.parked_until > deadline:
                raise RateLimited(
                    f"{host} is rate limited until {state.parked_until:.0f}", retry_at=state.parked_until, host=host
                )
            # The park may be extended while we sleep: the loop re-reads it.
            await asyncio.sleep(state.parked_until - now)

    async def _take_token(self, state: _Host) -> None:
        while True:
            now = time.monotonic()
            rate = state.rate or self.per_host_rps
            state.tokens = min(self._burst, state.tokens + (now - state.refilled_at) * rate)
            state.refilled_at = now
            if state.tokens >= 1.0:
                state.tokens -= 1.0
                return
            await asyncio.sleep((1.0 - state.tokens) / rate)

    @asynccontextmanager
    async def slot(self, host: str, *, deadline: float | None = None) -> AsyncIterator[None]:
        """Hold one request slot for `host`: unparked, within its rate and both caps.

        `deadline` (epoch seconds): if the host stays parked past it, raise RateLimited.
        """
        state = self._host(host)
        while True:
            await self._wait_unparked(state, host, deadline)
            await state.sem.acquire()
            try:
                await self._take_token(state)
                await self._global.acquire()
            except BaseException:
                state.sem.release()
                raise
            # Parked while we queued (another request of this host got a 429): queue again.
            # Nothing awaits between this check and the caller sending its request.
            if state.parked_until > time.time():
                self._global.release()
                state.sem.release()
                continue
            break
        self._requests += 1
        try:
            yield
        finally:
            self._global.release()
            state.sem.release()

    # -- signals from answers ----------------------------------------------------------------

    def park(self, host: str, until: float) -> None:
        """Park `host` until `until` (epoch seconds), capped at `max_park` from now."""
        state = self._host(host)
        now = time.time()
        until = min(until, now + self._max_park)
        if until > state.parked_until:
            if state.parked_until <= now:  # a new park (an extension is not logged again)
                log.info("host parked", extra={"ctx": {"host": host, "seconds": round(until - now, 1)}})
            state.parked_until = until
            self._parks += 1

    def observe(self, host: str, status: int, headers: Mapping[str, str]) -> float | None:
        """Read an answer's rate-limit signals (lower-case header names). Returns the park end."""
        now = time.time()
        state = self._host(host)
        h = {k.lower(): v for k, v in headers.items()}
        limit = _int(h.get("ratelimit-limit"))
        if limit is not None:
            state.limit = limit
        policy = h.get("ratelimit-policy")
        if policy is not None:
            published = parse_policy(policy)
            if published is None:
                _malformed(host, "ratelimit-policy", policy)
            else:
                pace = max(_MIN_RATE, PACE_MARGIN * published)
                state.rate = pace if pace < self.per_host_rps else None
        until: float | None = None
        retry_after = h.get("retry-after")
        if retry_after is not None and status in (429, 503):
            until = parse_retry_after(retry_after, now=now)
            if until is None:
                _malformed(host, "retry-after", retry_after)
        raw_reset = h.get("ratelimit-reset")
        reset = _reset_seconds(raw_reset)
        if raw_reset is not None and reset is None:
            _malformed(host, "ratelimit-reset", raw_reset)
        if reset is not None and reset < _EPOCH_THRESHOLD:
            reset = now + reset
        if until is None and reset is not None and (status == 429 or _int(h.get("ratelimit-remaining")) == 0):
            until = reset
        if status == 429:
            self._rate_limited += 1
            if until is None:
                until = now + self._default_park
            until = max(until, now + self._min_park)
        if until is None or until <= now:
            return None
        if until > now + self._max_park:
            metrics.BACKFILL_RATE_LIMIT_HEADERS.labels(result="clamped").inc()
            log.warning(
                "rate-limit park clamped",
                extra={"ctx": {"host": host, "status": status, "asked_s": round(until - now),
                               "max_park_s": self._max_park}},
            )
            until = now + self._max_park
        self.park(host, until)
        return self._hosts[host].parked_until

    # -- for the progress display ----------------------------------------------------------

    def parked_hosts(self) -> dict[str, float]:
        """Hosts parked right now -> epoch second the park ends."""
        now = time.time()
        return {h: s.parked_until for h, s in self._hosts.items() if s.parked_until > now}

    def counters(self) -> LimiterCounters:
        return LimiterCounters(
            requests=self._requests, rate_limited=self._rate_limited, parks=self._parks, hosts=len(self._hosts)
        )


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def _malformed(host: str, header: str, value: str) -> None:
    metrics.BACKFILL_RATE_LIMIT_HEADERS.labels(result="ignored").inc()
    log.warning(
        "malformed rate-limit header ignored", extra={"ctx": {"host": host, "header": header, "value": value[:100]}}
    )
