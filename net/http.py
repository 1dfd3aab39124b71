"""The one guarded HTTP client for untrusted hosts: `SafeHttp`, a size- and time-bounded GET.

Every connection it opens goes through the SSRF guard (`guard.GuardedTransport`; see that
module for what is refused and for the PLC's per-request trust). Redirects are never followed
by httpx: `SafeHttp.get` follows at most `max_redirects` itself, checking each target.

Time: besides connect/read timeouts (silence), a response body must keep making progress:
each further `min_transfer_bytes` must arrive within `transfer_window` seconds, and the whole
request has a deadline of `deadline_base + max_bytes / deadline_rate` seconds (scaled to the
size cap: a 1 MiB DID document gets about a minute, a 512 MiB repo about 35 minutes). A PDS
trickling a byte every two seconds is cut off after one window (RetryableFetchError).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import httpx

from skyfill import metrics
from skyfill.errors import ConfigError, InputError, RetryableFetchError, UnsafeHostError

from .guard import MAX_URL_LENGTH, GuardedTransport, Target, check_host, check_url, trusting
from .ratelimit import HostLimiter

__all__ = ["SafeHttp", "Transfer", "HttpResult", "host_key", "REDIRECT_STATUSES"]

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_ERROR_BODY_LIMIT = 64 * 1024  # bytes read from a non-2xx answer (enough for an XRPC error)


def host_key(url: str | httpx.URL) -> str:
    """The rate-limiting key of a URL: lower-case host, plus the port when not the default."""
    try:
        u = httpx.URL(str(url))
        host, port = u.host, u.port
    except (httpx.InvalidURL, ValueError, TypeError, UnicodeError):
        return str(url)[:80]
    return f"{host}:{port}" if port is not None else host


@dataclass(frozen=True, slots=True, kw_only=True)
class Transfer:
    """How long a request may take, written once for every client (SafeHttp, PdsClient, the
    backfill's options): connect within `connect_timeout`, never `read_timeout` of silence,
    each further `min_transfer_bytes` within `transfer_window` seconds, and the whole request
    within `deadline_base + max_bytes / deadline_rate` seconds."""

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    min_transfer_bytes: int = 64 * 1024
    transfer_window: float = 30.0
    deadline_base: float = 60.0
    deadline_rate: float = 256 * 1024   # bytes/s

    def __post_init__(self) -> None:
        if (self.connect_timeout <= 0 or self.read_timeout <= 0 or self.min_transfer_bytes < 1
                or self.transfer_window <= 0 or self.deadline_base <= 0 or self.deadline_rate <= 0):
            raise ConfigError("timeouts, transfer limits and deadlines must be positive")


@dataclass(frozen=True, slots=True)
class HttpResult:
    """One final (non-redirect) answer. `body` is capped: see `SafeHttp.get`."""

    url: str
    status: int
    headers: Mapping[str, str]
    body: bytes


class _TooSlow(RetryableFetchError):
    """A body that stopped making progress, or a request past its size-scaled deadline."""


class SafeHttp:
    """A guarded httpx client: SSRF guard at connect time, manual redirects, capped bodies,
    progress deadlines.

    Network failures, timeouts and stalled transfers become RetryableFetchError; an over-limit
    body becomes InputError(kind="too_large"); an unsafe or malformed target becomes
    UnsafeHostError. Callers map these to their own context (PdsClient adds retries, Resolver
    maps to IdentityError).
    """

    def __init__(
        self,
        *,
        transfer: Transfer = Transfer(),
        max_connections: int = 64,
        max_redirects: int = 3,
        allow_private_hosts: bool = False,
        user_agent: str = "skyfill",
    ) -> None:
        self.allow_private_hosts = allow_private_hosts
        self._connect_timeout = transfer.connect_timeout
        self._min_transfer = transfer.min_transfer_bytes
        self._window = transfer.transfer_window
        self._deadline_base = transfer.deadline_base
        self._deadline_rate = transfer.deadline_rate
        self._max_redirects = max_redirects
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._client = httpx.AsyncClient(
            transport=GuardedTransport(limits=limits, allow_private=allow_private_hosts),
            timeout=httpx.Timeout(connect=transfer.connect_timeout, read=transfer.read_timeout,
                                  write=transfer.read_timeout, pool=None),
            follow_redirects=False,
            trust_env=False,
            headers={"User-Agent": user_agent},
            # httpx parses a redirect's Location even when not following it, and reports a
            # malformed one as a protocol error: this hook runs first and refuses it instead.
            event_hooks={"response": [_refuse_malformed_location]},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> SafeHttp:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def request_deadline(self, max_bytes: int) -> float:
        """Seconds one request (one hop) may take at most, scaled to its body cap."""
        return self._deadline_base + max_bytes / self._deadline_rate

    async def get(
        self,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        max_bytes: int,
        headers: Mapping[str, str] | None = None,
        limiter: HostLimiter | None = None,
        deadline: float | None = None,
        trusted_origin: str | None = None,
    ) -> HttpResult:
        """GET `url`, following up to `max_redirects` redirects, each target checked first.

        With a `limiter`, each hop takes a slot of its own host and reports the answer's
        rate-limit headers back (so a 429 parks the host). A 2xx body over `max_bytes`
        aborts the download; other statuses keep at most 64 KiB of body. `trusted_origin`:
        see `guard` (the PLC URL, for PLC requests only).
        """
        host = host_key(url)
        try:
            hop = check_url(httpx.URL(url, params=params) if params else url)
        except UnsafeHostError:
            metrics.BACKFILL_REQUESTS.labels(result="unsafe").inc()
            raise
        except (httpx.InvalidURL, ValueError, TypeError, UnicodeError) as exc:
            metrics.BACKFILL_REQUESTS.labels(result="unsafe").inc()
            raise UnsafeHostError(f"malformed URL {url[:200]!r}: {exc}") from exc
        for _hop in range(self._max_redirects + 1):
            next_hop: Target | None = None
            try:
                target = await check_host(
                    hop.url,
                    allow_private=self.allow_private_hosts,
                    trusted_origin=trusted_origin,
                    timeout=self._connect_timeout,
                )
                host = host_key(target.url)
                slot = limiter.slot(host, deadline=deadline) if limiter is not None else contextlib.nullcontext()
                async with slot:
                    with trusting(target, trusted_origin):
                        result = await self._send(target.url, host, max_bytes=max_bytes, headers=headers)
                location = result.headers.get("location")
                if result.status in REDIRECT_STATUSES and location:
                    next_hop = _redirect_target(target.url, location, host)
            except (UnsafeHostError, RetryableFetchError, InputError) as exc:
                metrics.BACKFILL_REQUESTS.labels(result=_failure_class(exc)).inc()
                raise
            metrics.BACKFILL_REQUESTS.labels(result=_status_class(result.status)).inc()
            if limiter is not None:
                limiter.observe(host, result.status, result.headers)
            if next_hop is None:
                return result
            hop = next_hop
        raise RetryableFetchError(f"more than {self._max_redirects} redirects from {url[:200]}", host=host_key(url))

    async def _send(
        self, url: httpx.URL, host: str, *, max_bytes: int, headers: Mapping[str, str] | None
    ) -> HttpResult:
        total = self.request_deadline(max_bytes)
        try:
            async with asyncio.timeout(total):
                async with self._client.stream("GET", url, headers=headers) as resp:
                    status = resp.status_code
                    resp_headers = {k.lower(): v for k, v in resp.headers.items()}
                    if status in REDIRECT_STATUSES:
                        return HttpResult(str(url), status, resp_headers, b"")
                    ok = 200 <= status < 300
                    limit = max_bytes if ok else _ERROR_BODY_LIMIT
                    declared = resp.headers.get("content-length")
                    if ok and declared is not None and declared.isdigit() and int(declared) > limit:
                        raise InputError(
                            f"{url}: Content-Length {declared} exceeds {limit} bytes", kind="too_large"
                        )
                    body = await self._read(resp.aiter_bytes(), limit, fail=ok, url=str(url), host=host)
                    return HttpResult(str(url), status, resp_headers, body)
        except UnsafeHostError as exc:
            exc.host = exc.host or host
            raise
        except TimeoutError as exc:  # the size-scaled total deadline (asyncio.timeout above)
            raise _TooSlow(f"{url}: no complete answer within {total:.0f} s", host=host) from exc
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise RetryableFetchError(f"{url}: {type(exc).__name__}: {exc}", host=host) from exc
        except httpx.HTTPError as exc:
            raise RetryableFetchError(f"{url}: {type(exc).__name__}: {exc}", host=host) from exc

    async def _read(
        self, chunks: AsyncIterator[bytes], limit: int, *, fail: bool, url: str, host: str
    ) -> bytes:
        """The body, capped at `limit`, with a progress deadline: each further
        `min_transfer_bytes` must arrive within `transfer_window` seconds of the previous
        ones (the first within a window of the headers), else _TooSlow.

        Worked example (64 KiB per 30 s): a 10 MiB body at 1 MiB/s moves the deadline 160
        times and never meets it; a host sending 1 byte every 2 s has sent 15 bytes when
        the first window closes, and the transfer is cut.
        """
        parts: list[bytes] = []
        size = 0
        next_mark = self._min_transfer
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(loop.time() + self._window) as progress:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        if fail:
                            raise InputError(f"{url}: body exceeds {limit} bytes", kind="too_large")
                        parts.append(chunk[: limit - (size - len(chunk))])
                        break
                    parts.append(chunk)
                    if size >= next_mark:
                        next_mark = size + self._min_transfer
                        progress.reschedule(loop.time() + self._window)
        except TimeoutError as exc:
            if not progress.expired():
                raise  # the request's total deadline, handled by _send
            raise _TooSlow(
                f"{url}: transfer stalled: fewer than {self._min_transfer} bytes in {self._window:g} s "
                f"({size} bytes received)",
                host=host,
            ) from exc
        return b"".join(parts)


def _redirect_target(base: httpx.URL, location: str, host: str) -> Target:
    if len(location) > MAX_URL_LENGTH:
        raise UnsafeHostError(f"redirect to a {len(location)}-character URL refused", host=host)
    try:
        url = base.join(location)
    except (httpx.InvalidURL, ValueError, TypeError, UnicodeError) as exc:
        raise UnsafeHostError(f"malformed redirect {location[:200]!r}: {exc}", host=host) from exc
    try:
        return check_url(url)
    except UnsafeHostError as exc:
        exc.host = exc.host or host
        raise


async def _refuse_malformed_location(response: httpx.Response) -> None:
    location = response.headers.get("location")
    if response.status_code in REDIRECT_STATUSES and location:
        _redirect_target(response.request.url, location, host_key(response.request.url))


def _failure_class(exc: Exception) -> str:
    """The `result` label of a request that raised instead of answering."""
    if isinstance(exc, UnsafeHostError):
        return "unsafe"
    if isinstance(exc, _TooSlow):
        return "too_slow"
    return "network" if isinstance(exc, RetryableFetchError) else "too_large"


def _status_class(status: int) -> str:
    return "429" if status == 429 else f"{status // 100}xx"
