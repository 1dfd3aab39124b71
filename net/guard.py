"""The SSRF guard: which URLs and addresses an untrusted input may make skyfill connect to.

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
is enforced where the socket is opened: `GuardedTransport` gives httpcore a network backend
(`_GuardedBackend`) that resolves the name ONCE, checks every address it got, and connects to
those checked addresses only. The URL keeps the hostname, so TLS SNI and certificate checks
still use the name. `check_host` (a separate resolution) is only an early, friendlier refusal
(e.g. for a redirect target, before any slot or connection is taken). Proxies from the
environment are ignored (`trust_env=False`): a proxy would open the connection for us, past
the guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ipaddress
import re
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from skyfill.errors import RetryableFetchError, UnsafeHostError

__all__ = [
    "check_host",
    "check_url",
    "is_unsafe_address",
    "trusting",
    "GuardedTransport",
    "Target",
    "MAX_URL_LENGTH",
]

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
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")

# (host, port) the current task may connect to without the address check: set by
# `trusting` (SafeHttp.get) around a hop that is the caller's trusted origin (the PLC), read by the
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
def trusting(target: Target, trusted_origin: str | None) -> Iterator[None]:
    """Within this block, a connection of this task to `target` skips the address check if
    `target` is `trusted_origin` (the PLC, for a PLC request); any other connection is checked."""
    token = _TRUSTED_HOP.set((target.host, target.port) if _is_trusted(target, trusted_origin) else None)
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


class GuardedTransport(httpx.AsyncHTTPTransport):
    """An httpx transport whose every connection goes through the guard (`_GuardedBackend`)."""

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
