"""The enumeration endpoints: a relay's listHosts, a host's listRepos, listReposByCollection.

One call = one page: the caller (skyfill.backfill.discover) stores each page with its cursor in
one transaction, so a run killed between two pages resumes from the last stored cursor.

Every request goes through `PdsClient.fetch` (the host guard, the size cap, per-host rate limits
and 429 parking, retries of 5xx and network errors). A page is hostile input:
    not JSON, not an object, no list      -> RetryableFetchError (the page is not stored; the
                                             host's listing stops for this run, counted)
    an entry that is not a well-formed     -> skipped and counted in `Page.skipped` (an invalid
    object (invalid DID, no rev, ...)        DID never reaches the store)
    a cursor over 1,024 characters         -> the listing ends there (treated as the last page)
    over `max_page_bytes`                  -> InputError(kind="too_large") from SafeHttp
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import orjson

from skyfill.errors import RetryableFetchError
from skyfill.protocol.syntax import is_did, is_tid

from .http import HttpResult, host_key
from .pds import ListedRepo, PdsClient

__all__ = [
    "Page",
    "ListedHost",
    "ListingClient",
    "NotARelay",
    "host_url",
    "LIST_REPOS",
    "LIST_HOSTS",
    "LIST_BY_COLLECTION",
]

LIST_HOSTS: Final = "com.atproto.sync.listHosts"
LIST_REPOS: Final = "com.atproto.sync.listRepos"
LIST_BY_COLLECTION: Final = "com.atproto.sync.listReposByCollection"
_MAX_CURSOR: Final = 1024
_SKIPPED_HOST_STATUSES: Final = frozenset({"banned", "offline"})

T = TypeVar("T")


class NotARelay(RetryableFetchError):
    """The host answers listHosts with an error: it is a single PDS (or not a relay at all)."""


@dataclass(frozen=True, slots=True)
class ListedHost:
    hostname: str            # as the relay names it (a DNS name, maybe with :port)
    status: str | None       # active | idle | offline | throttled | banned (None: not said)
    account_count: int | None


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    cursor: str | None       # the next page's cursor; None: this was the last page
    skipped: list[str]       # why each skipped entry was refused (one line each)


def host_url(hostname: str, *, allow_private: bool) -> str:
    """The base URL of a host a relay lists: https, except http for a loopback host when private
    hosts are allowed (tests, local networks). A hostname that is already a URL is kept."""
    if hostname.startswith(("http://", "https://")):
        return hostname.rstrip("/")
    name = hostname.rsplit(":", 1)[0] if hostname.count(":") == 1 else hostname
    loopback = name == "localhost"
    try:
        loopback = loopback or ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        pass
    return f"{'http' if allow_private and loopback else 'https'}://{hostname}"


class ListingClient:
    """The three enumeration endpoints over a shared PdsClient (its guard and host limits)."""

    def __init__(self, client: PdsClient, *, max_page_bytes: int = 16 * 1024 * 1024, page_size: int = 1000) -> None:
        self.client = client
        self.max_page_bytes = max_page_bytes
        self.page_size = page_size

    async def _page(self, base: str, method: str, params: Mapping[str, str], list_key: str) -> tuple[list[Any], str | None]:
        url = f"{base.rstrip('/')}/xrpc/{method}"
        result = await self.client.fetch(url, params=params, max_bytes=self.max_page_bytes,
                                         headers={"Accept": "application/json"})
        host = host_key(url)
        if not 200 <= result.status < 300:
            raise _status_error(result, method, host)
        try:
            body = orjson.loads(result.body)
        except orjson.JSONDecodeError as exc:
            raise RetryableFetchError(f"{method}: invalid JSON from {host}", host=host) from exc
        items = body.get(list_key) if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise RetryableFetchError(f"{method}: no {list_key!r} list in the answer of {host}", host=host)
        cursor = body.get("cursor")
        if not isinstance(cursor, str) or not cursor or len(cursor) > _MAX_CURSOR or not items:
            cursor = None
        return items, cursor

    async def list_hosts(self, relay: str, cursor: str | None) -> Page[ListedHost]:
        """One page of the relay's hosts; NotARelay when the host does not serve listHosts."""
        try:
            items, nxt = await self._page(relay, LIST_HOSTS, self._params(cursor), "hosts")
        except NotARelay:
            raise
        except RetryableFetchError as exc:
            if cursor is None:  # the very first page: a PDS answers garbage or 404 here
                raise NotARelay(f"{relay} does not list hosts: {exc}", host=exc.host) from exc
            raise
        hosts, skipped = _parsed(items, _host, LIST_HOSTS)
        return Page([h for h in hosts if h.status not in _SKIPPED_HOST_STATUSES], nxt, skipped)

    async def list_repos(self, host: str, cursor: str | None) -> Page[ListedRepo]:
        items, nxt = await self._page(host, LIST_REPOS, self._params(cursor), "repos")
        repos, skipped = _parsed(items, _repo, LIST_REPOS)
        return Page(repos, nxt, skipped)

    async def list_by_collection(self, relay: str, collection: str, cursor: str | None) -> Page[str]:
        params = {**self._params(cursor), "collection": collection}
        items, nxt = await self._page(relay, LIST_BY_COLLECTION, params, "repos")
        dids, skipped = _parsed(items, _listed_did, LIST_BY_COLLECTION)
        return Page(dids, nxt, skipped)

    def _params(self, cursor: str | None) -> dict[str, str]:
        params = {"limit": str(self.page_size)}
        if cursor is not None:
            params["cursor"] = cursor
        return params


def _status_error(result: HttpResult, method: str, host: str) -> RetryableFetchError:
    error: object = None
    try:
        body = orjson.loads(result.body)
        if isinstance(body, dict):
            error = body.get("error")
    except orjson.JSONDecodeError:
        pass
    text = f"{method}: HTTP {result.status} {error if isinstance(error, str) else ''}".strip()
    if method == LIST_HOSTS and (result.status in (400, 404, 405, 501) or error == "MethodNotImplemented"):
        return NotARelay(text, host=host)
    return RetryableFetchError(text, host=host)


def _parsed(items: list[Any], parse: Callable[[object], T | None], method: str) -> tuple[list[T], list[str]]:
    """The entries `parse` accepts, and one line per entry it refused (None)."""
    good: list[T] = []
    skipped: list[str] = []
    for item in items:
        value = parse(item)
        if value is None:
            skipped.append(f"{method.rsplit('.', 1)[-1]}: malformed entry {_short(item)}")
        else:
            good.append(value)
    return good, skipped


def _listed_did(item: object) -> str | None:
    did = item.get("did") if isinstance(item, dict) else None
    return did if is_did(did) else None


def _short(item: object) -> str:
    try:
        return orjson.dumps(item).decode()[:120]
    except (TypeError, orjson.JSONEncodeError):
        return type(item).__name__


def _host(item: object) -> ListedHost | None:
    if not isinstance(item, dict):
        return None
    name, status, count = item.get("hostname"), item.get("status"), item.get("accountCount")
    if not isinstance(name, str) or not 0 < len(name) <= 300 or any(c in name for c in "/?#@ \\"):
        return None
    if status is not None and not isinstance(status, str):
        return None
    return ListedHost(name.lower(), status, count if type(count) is int else None)


def _repo(item: object) -> ListedRepo | None:
    if not isinstance(item, dict):
        return None
    did, head, rev = item.get("did"), item.get("head"), item.get("rev")
    active, status = item.get("active", True), item.get("status")
    if not is_did(did) or not isinstance(head, str) or len(head) > 200 or not is_tid(rev):
        return None
    if not isinstance(active, bool) or not (status is None or (isinstance(status, str) and len(status) <= 64)):
        return None
    return ListedRepo(did=did, head=head, rev=rev, active=active, status=status)

