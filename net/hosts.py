"""Talking to untrusted hosts: the SSRF guard and the one guarded HTTP layer.

Every URL skyfill fetches during a backfill comes from untrusted input (a DID document names
the PDS; a relay or PDS answers with a redirect). The guard refuses:

- URLs httpx cannot parse, URLs over `MAX_URL_LENGTH` characters, schemes other than http(s),
  credentials, ports outside 1..65535, and hosts that are neither a DNS name nor a canonical
  IP literal. A host whose last label is numeric is an IPv4 address to a WHATWG URL parser
  and to `inet_aton` (`0177.0.0.1`, `0x7f.1`, `2130706433`, `127.1` all mean 127.0.0.1), so
  anything but the canonical dotted quad is refused rather than interpreted.
- Addresses that are not public unicast: IPv4 loopback, RFC 1918, link-local, CGNAT, the
  IETF/documentation/benchmark blocks, multicast, reserved; IPv6 outside 2000::/3 (so
  loopback, unspecified, ::/96 compat, site-local fec0::/10, ULA, link-local, multicast,
  64:ff9b:1::/48 local NAT64) and inside it 2001::/23 (Teredo, ORCHID, benchmarking),
  2001:db8::/32 and 3fff::/20 (documentation). IPv4 embedded in IPv6 (mapped, 6to4, NAT64
  64:ff9b::/96) is judged as the IPv4 address.

Trust: the operator's PLC directory may live on a private address. It is trusted per
REQUEST, not per client: a caller passes `trusted_origin=<plc url>` for a PLC fetch, and
only a hop whose (scheme, host, port) equals that origin skips the address check. A PDS
endpoint or a redirect that names the PLC's host on another port, or even the same origin
without the caller saying it is a PLC request, is checked like any other.

DNS rebinding: checking a name and then letting the HTTP library resolve it again would let a
hostile DNS server answer "public" to the check and "127.0.0.1" to the connect. So the check
is enforced where the socket is opened: `SafeHttp` gives httpcore a network backend
(`_GuardedBackend`) that resolves the name ONCE, checks every address it got, and connects to
those checked addresses only. The URL keeps the hostname, so TLS SNI and certificate checks
still use the name. `check_host` (a separate resolution) is only an early, friendlier refusal
(e.g. for a redirect target, before any slot or connection is taken).

Redirects are never followed by httpx: `SafeHttp.get` follows at most `max_redirects` itself,
checking each target. Proxies from the environment are ignored (`trust_env=False`): a proxy
would open the connection for us, past the guard.

Time: besides connect/read timeouts (silence), a response body must keep making progress:
each further `min_transfer_bytes` must arrive within `transfer_window` seconds, and the whole
request has a deadline of `deadline_base + max_bytes / deadline_rate` seconds (scaled to the
size cap: a 1 MiB DID document gets about a minute, a 512 MiB repo about 35 minutes). A PDS
trickling a byte every two seconds is cut off after one window (RetryableFetchError).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ipaddress
import re
import socket
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from skyfill import metrics
from skyfill.errors import ConfigError, InputError, RetryableFetchError, UnsafeHostError

from .ratelimit import HostLimiter

__all__ = [
    "check_host",
    "check_url",
    "is_unsafe_address",
    "host_key",
    "SafeHttp",
    "HttpResult",
    "Target",
    "REDIRECT_STATUSES",
    "MAX_URL_LENGTH",
]

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_URL_LENGTH = 2048

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_V4_REFUSED = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
        "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    )
)
_V6_UNICAST = ipaddress.IPv6Network("2000::/3")
_V6_REFUSED = tuple(ipaddress.IPv6Network(n) for n in ("2001::/23", "2001:db8::/32", "3fff::/20"))
_V6_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_V6_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_ERROR_BODY_LIMIT = 64 * 1024  # bytes read from a non-2xx answer (enough for an XRPC error)
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")

# (host, port) the current task may connect to without the address check: set by
# `SafeHttp.get` around a hop that is the caller's trusted origin (the PLC), read by the
# backend, which runs in the requesting task. Anything else sees None.
_TRUSTED_HOP: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar("_TRUSTED_HOP", default=None)


def is_unsafe_address(ip: _IP) -> bool:
    """True for every address an untrusted URL must not reach (see the module docstring)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return True
        if ip in _V6_MAPPED or ip in _V6_NAT64:
            return is_unsafe_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None:
            return is_unsafe_address(ip.sixtofour)
        if ip not in _V6_UNICAST or any(ip in net for net in _V6_REFUSED):
            return True
    elif any(ip in net for net in _V4_REFUSED):
        return True
    # the stdlib's view as a second opinion (it knows a few more special-purpose blocks)
    return not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_private


@dataclass(frozen=True, slots=True)
class Target:
    """A URL the guard accepted as well-formed: what will be connected to, as httpx sees it."""

    url: httpx.URL
    scheme: str
    host: str           # lower-case name, canonical IPv4, or IPv6 without brackets
    port: int           # explicit or the scheme's default
    literal: _IP | None  # the address, when the host is an IP literal

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port


def check_url(url: str | httpx.URL) -> Target:
    """Parse `url` as httpx will, refusing anything malformed or ambiguous (UnsafeHostError).

    No network access: this is the syntactic half of the guard, used at DID-document parse
    time and for every hop. The address half is `check_host` / the connect-time backend.
    """
    text = str(url)
    if len(text) > MAX_URL_LENGTH:
        raise UnsafeHostError(f"URL of {len(text)} characters refused (max {MAX_URL_LENGTH}): {text[:80]!r}...")
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(text)
        scheme, host, port = parsed.scheme, parsed.host, parsed.port
    except (httpx.InvalidURL, ValueError, TypeError, UnicodeError) as exc:
        raise UnsafeHostError(f"malformed URL {text[:200]!r}: {exc}") from exc
    if scheme not in ("http", "https"):
        raise UnsafeHostError(f"scheme {scheme!r} refused in {text[:200]!r}")
    if not host:
        raise UnsafeHostError(f"no host in {text[:200]!r}")
    if parsed.userinfo:
        raise UnsafeHostError(f"credentials in URL refused: {text[:200]!r}", host=host)
    if port is not None and not 0 < port < 65536:
        raise UnsafeHostError(f"port {port} refused in {text[:200]!r}", host=host)
    literal = _host_literal(host, text)
    return Target(parsed, scheme, host, port if port is not None else (443 if scheme == "https" else 80), literal)


def _host_literal(host: str, text: str) -> _IP | None:
    """The IP of a literal host; None for a DNS name. Refuses every other spelling."""
    if ":" in host:
        if "%" in host:
            raise UnsafeHostError(f"IPv6 zone id refused in {text[:200]!r}", host=host)
        try:
            return ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise UnsafeHostError(f"malformed IPv6 host {host!r} in {text[:200]!r}", host=host) from exc
    labels = host.removesuffix(".").split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        # an IPv4 address to every URL parser: only the canonical dotted quad is accepted
        try:
            ip = ipaddress.IPv4Address(host)
        except ValueError:
            ip = None
        if ip is None or str(ip) != host:
            raise UnsafeHostError(f"non-canonical numeric host {host!r} refused", host=host)
        return ip
    if len(host) > 254 or not all(_LABEL.fullmatch(label) for label in labels):
        raise UnsafeHostError(f"malformed host name {host[:80]!r} refused", host=host[:80])
    return None


def host_key(url: str | httpx.URL) -> str:
    """The rate-limiting key of a URL: lower-case host, plus the port when not the default."""
    try:
        u = httpx.URL(str(url))
        host, port = u.host, u.port
    except (httpx.InvalidURL, ValueError, TypeError, UnicodeError):
        return str(url)[:80]
    return f"{host}:{port}" if port is not None else host


async def _resolve_checked(host: str, port: int, *, timeout: float | None) -> list[str]:
    """Resolve `host` once; refuse if ANY address is unsafe (a mixed answer is not trusted)."""
    try:
        literal: _IP | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        if is_unsafe_address(literal):
            raise UnsafeHostError(f"address {host} refused", host=host)
        return [host]
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout=timeout
        )
    except (OSError, asyncio.TimeoutError, UnicodeError) as exc:
        raise RetryableFetchError(f"cannot resolve {host}: {exc!r}", host=host) from exc
    addresses: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        addr = str(sockaddr[0])
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
        if is_unsafe_address(ip):
            raise UnsafeHostError(f"{host} resolves to {addr}, refused", host=host)
        if addr not in addresses:
            addresses.append(addr)
    if not addresses:
        raise RetryableFetchError(f"{host} has no addresses", host=host)
    return addresses


async def check_host(
    url: str | httpx.URL,
    *,
    allow_private: bool,
    trusted_origin: str | None = None,
    timeout: float | None = 10.0,
) -> Target:
    """Refuse `url` unless it is well-formed http(s) and its host resolves only to public
    addresses; returns the parsed target.

    Raises UnsafeHostError; a name that does not resolve is a network failure
    (RetryableFetchError), not an unsafe host. `trusted_origin` (the operator's PLC URL, for
    a PLC request) and `allow_private` (tests, private deployments) skip the address check
    for that exact scheme, host and port, never the syntax check.
    """
    target = check_url(url)
    if allow_private or _is_trusted(target, trusted_origin):
        return target
    await _resolve_checked(target.host, target.port, timeout=timeout)
    return target


def _is_trusted(target: Target, trusted_origin: str | None) -> bool:
    return trusted_origin is not None and check_url(trusted_origin).origin == target.origin


@contextlib.contextmanager
def _trusting(target: Target, trusted: bool) -> Iterator[None]:
    token = _TRUSTED_HOP.set((target.host, target.port) if trusted else None)
    try:
        yield
    finally:
        _TRUSTED_HOP.reset(token)


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves, checks and connects in one step, so a name cannot re-resolve in between."""

    def __init__(self, *, allow_private: bool) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._allow_private = allow_private

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        bare = host.removeprefix("[").removesuffix("]")
        if self._allow_private or _TRUSTED_HOP.get() == (bare.lower(), port):
            return await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        try:
            addresses = await _resolve_checked(bare, port, timeout=timeout)
        except RetryableFetchError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        last: Exception | None = None
        for addr in addresses:
            try:
                return await self._inner.connect_tcp(addr, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise UnsafeHostError("unix sockets are never used for remote hosts")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, *, limits: httpx.Limits, allow_private: bool) -> None:
        super().__init__(trust_env=False, limits=limits)
        # httpx 0.28 takes no network backend, so its pool is rebuilt with ours. The test
        # `test_client_refuses_loopback_name_at_connect` fails if this ever stops taking effect.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_GuardedBackend(allow_private=allow_private),
        )


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
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        min_transfer_bytes: int = 64 * 1024,
        transfer_window: float = 30.0,
        deadline_base: float = 60.0,
        deadline_rate: float = 256 * 1024,
        max_connections: int = 64,
        max_redirects: int = 3,
        allow_private_hosts: bool = False,
        user_agent: str = "skyfill",
    ) -> None:
        if min_transfer_bytes < 1 or transfer_window <= 0 or deadline_base <= 0 or deadline_rate <= 0:
            raise ConfigError("transfer limits and deadlines must be positive")
        self.allow_private_hosts = allow_private_hosts
        self._connect_timeout = connect_timeout
        self._min_transfer = min_transfer_bytes
        self._window = transfer_window
        self._deadline_base = deadline_base
        self._deadline_rate = deadline_rate
        self._max_redirects = max_redirects
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._client = httpx.AsyncClient(
            transport=_GuardedTransport(limits=limits, allow_private=allow_private_hosts),
            timeout=httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout, pool=None),
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
        see the module docstring (the PLC URL, for PLC requests only).
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
                    with _trusting(target, _is_trusted(target, trusted_origin)):
                        result = await self._send(target.url, host, max_bytes=max_bytes, headers=headers)
                location = result.headers.get("location")
                if result.status in REDIRECT_STATUSES and location:
                    next_hop = _redirect_target(target.url, location, host)
            except UnsafeHostError:
                metrics.BACKFILL_REQUESTS.labels(result="unsafe").inc()
                raise
            except _TooSlow:
                metrics.BACKFILL_REQUESTS.labels(result="too_slow").inc()
                raise
            except RetryableFetchError:
                metrics.BACKFILL_REQUESTS.labels(result="network").inc()
                raise
            except InputError:
                metrics.BACKFILL_REQUESTS.labels(result="too_large").inc()
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


def _status_class(status: int) -> str:
    return "429" if status == 429 else f"{status // 100}xx"
