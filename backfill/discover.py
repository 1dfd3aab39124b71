"""Discovery: enumerate the repos of the network (or of one PDS) into `listed_repos`.

    relay mode       `--relay` serves listHosts: each host it lists (not banned/offline) is
                     enumerated with its own listRepos, hosts in parallel (`concurrency`), each
                     host paced by the PdsClient's per-host limits
    single PDS       `--relay` does not serve listHosts: its own listRepos is the list
    collections      `collections` given: the relay's listReposByCollection, one enumeration
                     per collection (exact NSIDs: the endpoint takes no wildcard)

Every page is stored with the cursor past it in one transaction (storage/discovery.py), so a run
killed between two pages resumes where it stopped; a finished run is listed again from the start
by the next one (`restart` forces that). A host that fails (network, garbage, a page over the size
cap, an unsafe address) stops ITS enumeration with the error recorded on its cursor row and counted
in the summary; the other hosts go on. Entries that are not well formed (invalid DID, no rev) are
skipped and counted (`skipped`), never stored.

An unfinished relay run resumes every host enumeration it registered, whichever `--relay` the new
run names; `restart` starts over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from skyfill import metrics
from skyfill.errors import ConfigError, FetchError, InputError
from skyfill.net.listing import LIST_BY_COLLECTION, LIST_HOSTS, LIST_REPOS, ListingClient, NotARelay, host_url
from skyfill.protocol.syntax import is_nsid
from skyfill.storage import Store
from skyfill.storage.discovery import EnumCursor, ListedRow

from .progress import Phases, report

__all__ = ["DiscoverySummary", "discover", "collection_endpoint"]

log = logging.getLogger(__name__)


def collection_endpoint(collection: str) -> str:
    return f"{LIST_BY_COLLECTION}:{collection}"


@dataclass(slots=True)
class DiscoverySummary:
    mode: str                                   # relay | pds | collections
    relay: str
    fresh: bool = True                          # a new run (False: an unfinished one resumed)
    hosts: int = 0                              # enumerations (host, endpoint) of this run
    hosts_done: int = 0
    pages: int = 0                              # pages stored by this process
    listed: int = 0                             # repos stored by this process
    skipped: int = 0                            # malformed entries refused by this process
    errors: dict[str, str] = field(default_factory=dict)   # host -> why its enumeration stopped
    elapsed: float = 0.0
    enumerations: list[tuple[str, str]] = field(default_factory=list)  # (host, endpoint) of this run

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "relay": self.relay, "fresh": self.fresh, "hosts": self.hosts,
                "hosts_done": self.hosts_done, "hosts_failed": len(self.errors), "pages": self.pages,
                "listed": self.listed, "skipped": self.skipped, "errors": dict(self.errors),
                "elapsed": round(self.elapsed, 3)}


async def discover(
    store: Store,
    listing: ListingClient,
    *,
    relay: str,
    collections: Sequence[str] = (),
    restart: bool = False,
    concurrency: int = 16,
    allow_private_hosts: bool = False,
    progress: bool = False,
) -> DiscoverySummary:
    """Enumerate into the store (see the module docstring); returns what this process did.
    Phases (progress.report: bars if `progress`, else a log line every 30 s): "hosts", the hosts
    listHosts named; "repos", the enumerations finished out of those of this run."""
    started = time.monotonic()
    relay = relay.strip().rstrip("/")
    for ws, http in (("wss://", "https://"), ("ws://", "http://")):  # the consumer's --relay spelling
        if relay.startswith(ws):
            relay = http + relay[len(ws):]
    if not relay.startswith(("http://", "https://")):
        relay = host_url(relay, allow_private=allow_private_hosts)
    if collections:
        bad = [c for c in collections if not is_nsid(c)]
        if bad:
            raise ConfigError(f"--collection takes exact NSIDs (listReposByCollection has no wildcard): {bad[0]!r}")
    summary = DiscoverySummary("collections" if collections else "relay", relay)
    phases = Phases("hosts", "repos")

    def extra() -> dict[str, Any]:
        return {"listed": summary.listed, "pages": summary.pages, "hosts_failed": len(summary.errors)}

    async with report(phases, what="discover", terminal=progress, extra=extra):
        await _run(store, listing, summary, phases, collections, restart, concurrency, allow_private_hosts)
    wanted = set(summary.enumerations)
    summary.hosts_done = sum(
        1 for c in await asyncio.to_thread(store.enum_cursors) if c.done and (c.host, c.endpoint) in wanted)
    summary.elapsed = time.monotonic() - started
    log.info("discovery finished", extra={"ctx": summary.to_json() | {"errors": len(summary.errors)}})
    return summary


async def _run(
    store: Store, listing: ListingClient, summary: DiscoverySummary, phases: Phases, collections: Sequence[str],
    restart: bool, concurrency: int, allow_private_hosts: bool,
) -> None:
    relay = summary.relay
    if collections:
        endpoints = [collection_endpoint(c) for c in dict.fromkeys(collections)]
        summary.fresh = await asyncio.to_thread(store.begin_enumeration, endpoints, restart=restart)
        todo = [(relay, e) for e in endpoints]
    else:
        summary.fresh = await asyncio.to_thread(store.begin_enumeration, [LIST_HOSTS, LIST_REPOS], restart=restart)
        todo = await _hosts(store, listing, relay, summary, allow_private_hosts, phases)
    phases["hosts"].total = phases["hosts"].done = len(todo)  # listHosts over (or none): all known
    phases["repos"].total = len(todo)
    rows = {(c.host, c.endpoint): c for c in await asyncio.to_thread(store.enum_cursors)}
    sem = asyncio.Semaphore(max(1, concurrency))

    async def one(host: str, endpoint: str) -> None:
        async with sem:
            await _enumerate(store, listing, rows.get((host, endpoint)), host, endpoint, summary)
        phases["repos"].advance()

    summary.hosts = len(todo)
    summary.enumerations = todo
    await asyncio.gather(*(one(h, e) for h, e in todo))


async def _hosts(
    store: Store, listing: ListingClient, relay: str, summary: DiscoverySummary, allow_private: bool,
    phases: Phases,
) -> list[tuple[str, str]]:
    """The (host, listRepos) enumerations of this run: the relay's hosts (listing the rest of
    listHosts first), or the relay itself when it is a single PDS."""
    stored = {(c.host, c.endpoint): c for c in await asyncio.to_thread(store.enum_cursors)}
    parent = stored.get((relay, LIST_HOSTS))
    if (relay, LIST_REPOS) in stored:
        summary.mode = "pds"  # an unfinished single-PDS run
    elif parent is None or not parent.done:
        cursor = parent.cursor if parent is not None else None
        while True:
            try:
                page = await listing.list_hosts(relay, cursor)
            except NotARelay as exc:
                if cursor is not None:  # it listed hosts before: a failure like any other
                    summary.errors[relay] = f"listHosts: {exc}"
                    await asyncio.to_thread(store.enumeration_failed, relay, LIST_HOSTS, str(exc))
                    break
                log.info("not a relay: listing it as a single PDS", extra={"ctx": {"host": relay, "why": str(exc)}})
                if parent is not None:  # a failed attempt left the listHosts row open: close it
                    await asyncio.to_thread(store.save_listing, relay, LIST_HOSTS, [], cursor=None, skipped=0)
                summary.mode = "pds"
                return [(relay, LIST_REPOS)]
            except (FetchError, InputError) as exc:
                summary.errors[relay] = f"listHosts: {exc}"
                await asyncio.to_thread(store.enumeration_failed, relay, LIST_HOSTS, str(exc))
                log.warning("listHosts failed", extra={"ctx": {"host": relay, "error": str(exc)}})
                break
            _log_skipped(relay, page.skipped)
            hosts = [(host_url(h.hostname, allow_private=allow_private), LIST_REPOS) for h in page.items]
            nxt = page.cursor if page.cursor != cursor else None  # a repeated cursor ends the listing
            await asyncio.to_thread(store.add_enumerations, hosts, parent=(relay, LIST_HOSTS), cursor=nxt,
                                    skipped=len(page.skipped))
            summary.skipped += len(page.skipped)
            phases["hosts"].advance(len(hosts))
            if nxt is None:
                break
            cursor = nxt
    if summary.mode == "pds":
        return [(relay, LIST_REPOS)]
    return [(c.host, c.endpoint) for c in await asyncio.to_thread(store.enum_cursors, endpoints=[LIST_REPOS])]


async def _enumerate(
    store: Store, listing: ListingClient, row: EnumCursor | None, host: str, endpoint: str,
    summary: DiscoverySummary,
) -> None:
    """List one (host, endpoint) from its stored cursor to the end, a page per transaction."""
    if row is not None and row.done:
        return
    cursor = row.cursor if row is not None else None
    seen: set[str] = set()
    while True:
        try:
            if endpoint == LIST_REPOS:
                repos = await listing.list_repos(host, cursor)
                rows = [ListedRow(r.did, r.head, r.rev, r.active, r.status) for r in repos.items]
                nxt, skipped = repos.cursor, repos.skipped
            else:
                dids = await listing.list_by_collection(host, endpoint.split(":", 1)[1], cursor)
                rows = [ListedRow(d, None, None, None, None) for d in dids.items]
                nxt, skipped = dids.cursor, dids.skipped
        except (FetchError, InputError) as exc:
            summary.errors[host if endpoint == LIST_REPOS else f"{host} {endpoint}"] = str(exc)
            log.warning("enumeration stopped", extra={"ctx": {"host": host, "endpoint": endpoint, "error": str(exc)}})
            await asyncio.to_thread(store.enumeration_failed, host, endpoint, str(exc))
            metrics.DISCOVERY_HOSTS.labels(result="failed").inc()
            return
        _log_skipped(host, skipped)
        if nxt is not None and (nxt == cursor or nxt in seen):
            log.warning("cursor repeated: listing ended there", extra={"ctx": {"host": host, "cursor": nxt[:100]}})
            nxt = None
        await asyncio.to_thread(store.save_listing, host, endpoint, rows, cursor=nxt, skipped=len(skipped))
        summary.pages += 1
        summary.listed += len(rows)
        summary.skipped += len(skipped)
        metrics.DISCOVERY_REPOS.labels(result="listed").inc(len(rows))
        metrics.DISCOVERY_REPOS.labels(result="skipped").inc(len(skipped))
        if nxt is None:
            metrics.DISCOVERY_HOSTS.labels(result="done").inc()
            return
        seen.add(nxt)
        cursor = nxt


def _log_skipped(host: str, skipped: list[str]) -> None:
    if skipped:
        log.warning("malformed entries skipped",
                    extra={"ctx": {"host": host, "count": len(skipped), "first": skipped[:3]}})
