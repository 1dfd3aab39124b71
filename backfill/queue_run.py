"""Working the durable queue host-fairly: claims feed a HostScheduler, workers take from it.

    claim (500, hosts interleaved) -> host of each DID (stored at enqueue, else resolved first)
      -> HostScheduler (per-host FIFOs, bounded by `room`) -> `concurrency` workers -> outcome

Bounds: at most `room` + one claim of DIDs wait in memory; `config.concurrency` DIDs (and so
CARs, each at most `max_car_bytes`) are in flight; each host gets at most
`per_host_concurrency` of them, and the limiter paces its requests. A parked host's DIDs wait
here, no attempt counted; when its park ends later than the patience (`rate_limit_patience`,
at most 30 s) they go back to the queue as deferred (retry_after = the park's end) and the run
goes on with the other hosts. The run ends when nothing due is left and every worker is idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import itertools
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from skyfill.net.http import host_key

from skyfill.errors import SkyfillError

from .progress import Phases, Tally
from skyfill.net.scheduler import HostScheduler

if TYPE_CHECKING:
    from .backfiller import Backfiller

__all__ = ["work_queue", "hosts_of", "chunks", "UNKNOWN_HOST"]

UNKNOWN_HOST = ""          # DIDs whose identity could not be resolved: their attempt records why
log = logging.getLogger(__name__)

_CLAIM = 500
_EXPORT_EVERY = 1.0        # seconds between per-host gauge updates and long-park checks


async def work_queue(bf: Backfiller, tally: Tally, phases: Phases, *, patience: float) -> None:
    """Claim and backfill every due DID of the queue, host-fairly (see the module docstring).
    `phases`: "identities" counts the DIDs whose host is known (stored, else resolved) and
    "repos" those finished (backfilled, failed or deferred)."""
    config = bf.config
    sched: HostScheduler[str] = HostScheduler(per_host=config.per_host_concurrency, parked=bf.client.parked_hosts)
    room = max(_CLAIM, config.concurrency * 8)
    ttl = config.identity_ttl.total_seconds()

    async def feed() -> None:
        try:
            while True:
                await sched.wait_room(room)
                rows = await asyncio.to_thread(bf.store.claim_backfills_with_hosts, _CLAIM)
                if not rows:
                    return
                unknown = [did for did, pds in rows if pds is None]
                if unknown:
                    await asyncio.to_thread(bf.store.prefetch_identities, unknown, max_age=ttl)
                hosts = await asyncio.gather(*(_host_of(bf, did, pds) for did, pds in rows))
                for (did, _), host in zip(rows, hosts, strict=True):
                    sched.add(host, did)
                phases["identities"].advance(len(rows))
        finally:
            sched.close()

    async def work() -> None:
        while (item := await sched.take()) is not None:
            host, did = item
            ok = False
            try:
                ok = await bf.backfill_did(did, tally, defer=True)
            finally:
                sched.release(host, ok=ok)
                phases["repos"].advance()

    async def watch() -> None:
        while True:
            sched.export_metrics()
            phases["repos"].advance(await _defer_long_parks(bf, sched, tally, patience))
            await asyncio.sleep(_EXPORT_EVERY)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.gather(feed(), *(work() for _ in range(config.concurrency)))
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        sched.export_metrics()


async def hosts_of(bf: Backfiller, dids: list[str]) -> list[str]:
    """The host of each DID, for scheduling: the bulk identities of all of them in one read, then
    the resolver (cached); UNKNOWN_HOST where it fails (the attempt resolves again and records why)."""
    ttl = bf.config.identity_ttl.total_seconds()
    await asyncio.to_thread(bf.store.prefetch_identities, dids, max_age=ttl)
    return list(await asyncio.gather(*(_host_of(bf, did, None) for did in dids)))


async def _host_of(bf: Backfiller, did: str, pds: str | None) -> str:
    if pds is None:
        try:
            pds = (await bf.resolver.resolve(did)).pds
        except SkyfillError:
            return UNKNOWN_HOST  # the attempt resolves again and records the failure
    try:
        return host_key(pds)
    except ValueError:
        return UNKNOWN_HOST


def chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


async def _defer_long_parks(bf: Backfiller, sched: HostScheduler[str], tally: Tally, patience: float) -> int:
    """DIDs waiting for a host parked past the patience go back to the queue (no attempt counted);
    returns how many."""
    limit = time.time() + patience
    n = 0
    for host, until in sched.waiting_parked().items():
        if until <= limit:
            continue
        retry_after = datetime.fromtimestamp(until, UTC)
        for did in sched.drain(host):
            await bf.defer_parked(did, host, retry_after, tally)
            n += 1
    return n
