"""The PDS sync endpoints a backfill needs: getRepo, listRepos, getLatestCommit.

Outcomes of `PdsClient.get_repo` (the orchestrator relies on these):

    2xx                                   -> the CAR bytes (a truncated CAR is NOT detected
                                             here: the parse layer fails on the missing block)
    4xx {error: RepoNotFound | RepoTakendown | RepoSuspended | RepoDeactivated}
                                          -> TerminalFetchError(outcome=<that name>)
    429 (or RateLimit-Remaining: 0)       -> the host is parked until its reset, then the
                                             request is repeated; not a failure. Only when
                                             the wait would pass `deadline` (default: now +
                                             `rate_limit_patience`) -> RateLimited(retry_at)
    5xx, network error, timeout           -> retried `max_retries` times with exponential
                                             backoff + jitter, then RetryableFetchError
    other 4xx, too many redirects         -> RetryableFetchError (no retry inside: the row's
                                             own backoff decides when to try again)
    body over `max_car_bytes`             -> RepoError(kind="too_large"): terminal for this
                                             attempt, never retried inside the client
    a body that stops making progress     -> like a network error (retried, then
    (see http.SafeHttp) or a request        RetryableFetchError)
    past its size-scaled deadline
    a target (or redirect) on an unsafe host, or a malformed / over-long / non-canonical URL
                                          -> UnsafeHostError, before connecting

`max_car_bytes` defaults to 512 MiB: the largest real repos are a few hundred MiB, and the
whole CAR is held in memory, so peak memory is about global_concurrency x the largest repo
actually fetched; lower it on small machines.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from skyfill.backoff import backoff_delay
from skyfill.errors import (
    ConfigError,
    InputError,
    RateLimited,
    RepoError,
    RetryableFetchError,
    TerminalFetchError,
    UnsafeHostError,
)

from .http import HttpResult, SafeHttp, Transfer, host_key
from .ratelimit import HostLimiter

__all__ = ["PdsClient", "ListedRepo", "TERMINAL_REPO_ERRORS", "DEFAULT_MAX_CAR_BYTES"]

log = logging.getLogger(__name__)

DEFAULT_MAX_CAR_BYTES = 512 * 1024 * 1024
TERMINAL_REPO_ERRORS = frozenset({"RepoNotFound", "RepoTakendown", "RepoSuspended", "RepoDeactivated"})
_JSON_LIMIT = 16 * 1024 * 1024
_LIST_PAGE = 1000


@dataclass(frozen=True, slots=True)
class ListedRepo:
    did: str
    head: str
    rev: str
    active: bool
    status: str | None


class PdsClient:
    """Async client for untrusted PDS hosts: guarded, rate limited, retried, size capped."""

    def __init__(
        self,
        *,
        transfer: Transfer = Transfer(),
        max_car_bytes: int = DEFAULT_MAX_CAR_BYTES,
        per_host_rps: float = 10.0,
        per_host_concurrency: int = 4,
        global_concurrency: int = 64,
        max_retries: int = 3,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        rate_limit_patience: float = 600.0,
        max_redirects: int = 3,
        max_park: float = 3600.0,
        allow_private_hosts: bool = False,
        user_agent: str = "skyfill (+https://github.com/skyfill)",
        limiter: HostLimiter | None = None,
    ) -> None:
        if max_car_bytes < 1 or max_retries < 0:
            raise ConfigError("max_car_bytes must be positive and max_retries >= 0")
        self.max_car_bytes = max_car_bytes
        self.max_retries = max_retries
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._patience = rate_limit_patience
        self.limiter = limiter or HostLimiter(
            per_host_rps=per_host_rps,
            per_host_concurrency=per_host_concurrency,
            global_concurrency=global_concurrency,
            max_park=max_park,
        )
        self.http = SafeHttp(
            transfer=transfer,
            max_connections=global_concurrency,
            max_redirects=max_redirects,
            allow_private_hosts=allow_private_hosts,
            user_agent=user_agent,
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> PdsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def parked_hosts(self) -> dict[str, float]:
        return self.limiter.parked_hosts()

    # -- the retry loop ----------------------------------------------------------------------

    def _backoff(self, failures: int) -> float:
        return backoff_delay(failures - 1, base=self._backoff_base, cap=self._backoff_max)

    async def fetch(
        self,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        max_bytes: int = _JSON_LIMIT,
        headers: Mapping[str, str] | None = None,
        did: str | None = None,
        deadline: float | None = None,
        trusted_origin: str | None = None,
    ) -> HttpResult:
        """GET with rate limiting, 429 parking and retries; returns the first answer that is
        neither 429 nor 5xx (2xx or another 4xx). See the module docstring for what raises.
        `trusted_origin`: the operator's PLC URL when this is a PLC request (guard, http.SafeHttp)."""
        if deadline is None:
            deadline = time.time() + self._patience
        failures = 0
        while True:
            try:
                result = await self.http.get(
                    url,
                    params=params,
                    max_bytes=max_bytes,
                    headers=headers,
                    limiter=self.limiter,
                    deadline=deadline,
                    trusted_origin=trusted_origin,
                )
            except (RateLimited, UnsafeHostError) as exc:
                exc.did = did
                raise
            except RetryableFetchError as exc:
                failures += 1
                reason: str = str(exc)
            else:
                if result.status == 429:
                    continue  # the limiter parked the host; the next slot waits for the reset
                if result.status < 500:
                    return result
                failures += 1
                reason = f"HTTP {result.status} from {result.url}"
            if failures > self.max_retries:
                raise RetryableFetchError(
                    f"gave up after {failures} attempts: {reason}", did=did, host=host_key(url)
                )
            delay = self._backoff(failures)
            # per request: debug (the repo's outcome line says how it ended)
            log.debug("retrying", extra={"ctx": {"url": url, "did": did, "failures": failures, "reason": reason}})
            if time.time() + delay > deadline:
                raise RetryableFetchError(f"deadline passed: {reason}", did=did, host=host_key(url))
            await asyncio.sleep(delay)

    async def _xrpc_json(
        self, pds: str, method: str, params: Mapping[str, str], *, did: str | None, deadline: float | None
    ) -> dict[str, Any]:
        url = _xrpc_url(pds, method)
        result = await self.fetch(url, params=params, did=did, deadline=deadline)
        _raise_for_status(result, did=did)
        try:
            body = orjson.loads(result.body)
        except orjson.JSONDecodeError as exc:
            raise RetryableFetchError(f"{method}: invalid JSON from {result.url}", did=did, host=host_key(url)) from exc
        if not isinstance(body, dict):
            raise RetryableFetchError(f"{method}: JSON is not an object", did=did, host=host_key(url))
        return body

    # -- endpoints ---------------------------------------------------------------------------

    async def get_repo(self, pds: str, did: str, *, deadline: float | None = None) -> bytes:
        """The whole repo as CAR bytes (never with `since`: it would hide deletions)."""
        url = _xrpc_url(pds, "com.atproto.sync.getRepo")
        try:
            result = await self.fetch(
                url,
                params={"did": did},
                max_bytes=self.max_car_bytes,
                # identity: a CAR barely compresses, and a gzip bomb would dodge the byte cap's spirit
                headers={"Accept": "application/vnd.ipld.car", "Accept-Encoding": "identity"},
                did=did,
                deadline=deadline,
            )
        except InputError as exc:
            if exc.kind == "too_large":
                raise RepoError(f"repo of {did} is over {self.max_car_bytes} bytes", kind="too_large", did=did) from exc
            raise
        _raise_for_status(result, did=did)
        return result.body

    async def get_latest_commit(self, pds: str, did: str, *, deadline: float | None = None) -> tuple[str, str]:
        """(commit CID, rev) of the repo's current head."""
        body = await self._xrpc_json(pds, "com.atproto.sync.getLatestCommit", {"did": did}, did=did, deadline=deadline)
        cid, rev = body.get("cid"), body.get("rev")
        if not isinstance(cid, str) or not isinstance(rev, str):
            raise RetryableFetchError("getLatestCommit: missing cid/rev", did=did, host=host_key(pds))
        return cid, rev

    async def list_repos(self, pds: str, *, deadline: float | None = None) -> AsyncIterator[ListedRepo]:
        """Every repo the host lists, page by page (1000 per page). Malformed entries are
        skipped and logged; a cursor that repeats ends the listing (a looping host)."""
        cursor: str | None = None
        seen: set[str] = set()
        while True:
            params = {"limit": str(_LIST_PAGE)}
            if cursor is not None:
                params["cursor"] = cursor
            body = await self._xrpc_json(pds, "com.atproto.sync.listRepos", params, did=None, deadline=deadline)
            repos = body.get("repos")
            if not isinstance(repos, list):
                raise RetryableFetchError("listRepos: no repos list", host=host_key(pds))
            for item in repos:
                listed = _listed(item)
                if listed is None:
                    log.warning("listRepos: malformed entry skipped", extra={"ctx": {"pds": pds}})
                    continue
                yield listed
            nxt = body.get("cursor")
            if not repos or not isinstance(nxt, str) or not nxt:
                return
            if nxt in seen:
                log.warning("listRepos: cursor repeated, stopping", extra={"ctx": {"pds": pds, "cursor": nxt}})
                return
            seen.add(nxt)
            cursor = nxt


def _xrpc_url(pds: str, method: str) -> str:
    return f"{pds.rstrip('/')}/xrpc/{method}"


def _raise_for_status(result: HttpResult, *, did: str | None) -> None:
    if 200 <= result.status < 300:
        return
    host = host_key(result.url)
    error: object = None
    message: object = None
    try:
        body = orjson.loads(result.body)
        if isinstance(body, dict):
            error, message = body.get("error"), body.get("message")
    except orjson.JSONDecodeError:
        pass
    if isinstance(error, str) and error in TERMINAL_REPO_ERRORS:
        raise TerminalFetchError(f"{error}: {message}", outcome=error, did=did, host=host)
    raise RetryableFetchError(f"HTTP {result.status} {error or ''}: {message or ''}".strip(), did=did, host=host)


def _listed(item: object) -> ListedRepo | None:
    if not isinstance(item, dict):
        return None
    did, head, rev = item.get("did"), item.get("head"), item.get("rev")
    active = item.get("active", True)
    status = item.get("status")
    if not (isinstance(did, str) and did.startswith("did:") and isinstance(head, str) and isinstance(rev, str)):
        return None
    if not isinstance(active, bool) or not (status is None or isinstance(status, str)):
        return None
    return ListedRepo(did=did, head=head, rev=rev, active=active, status=status)
