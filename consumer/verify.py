"""`consume --verify`: every #commit's signature and MST inversion proof, every #sync's signature.

Two parts, because one needs the network and the other must not:

- Keys (`want`, `key`, `refresh`): a bounded {did: key} map in front of the Resolver, seeded in
  bulk at start (`seed`) from the DuckDB `identities` table, then the bulk PLC table (`identities
  sync`, storage/plc.py). The read-ahead (verified.py) calls
  `want(did)` as soon as it has parsed a frame, far ahead of applying it; every DID not in the
  map joins a batch that is resolved concurrently (`Resolver.resolve_many`, `concurrency`
  requests in flight). By the time the event reaches the head of the window its key is usually
  there; `await key(did)` waits for it otherwise. No DID ever costs one blocking round trip
  per event.
- Checks (`check_frame`): pure and synchronous, run by `check_many` in a worker process (or
  thread) while the daemon keeps parsing. The signature is over the DAG-CBOR of the signed
  commit without `sig`, checked against the DID's #atproto key; the proof is
  skyfill.mst.invert_commit on the frame's own blocks: undoing the ops on the tree under the
  signed `data` must give the tree under `prevData`.

Verdicts of `check_frame`: None (valid), or (kind, reason) with kind one of
    bad_signature   the signature does not verify under the key given (the caller refreshes the
                    DID document once, `refresh`, and checks again before rejecting: rotation)
    bad_inversion   the ops do not turn the signed tree back into `prevData` (or the proof is
                    incomplete, or a node does not hash to its CID): rejected
    unverifiable    signature valid but no proof possible: a commit without `prevData` that
                    has a `since` (a relay older than sync 1.1; a repo's first commit, with
                    neither, is undone down to the empty tree) or a `tooBig` commit (its
                    blocks may be missing). Such a commit is APPLIED and counted
                    (skyfill_firehose_unverifiable_total): refusing them would stop a mirror
                    fed by an old relay entirely; a tooBig commit desynchronizes its DID
                    anyway, so the backfill re-fetches and checks the whole repo.

Key rotation, worked example: the map holds key A for did X; X rotates to key B and signs its
next commit with B. `check_frame` says bad_signature -> `refresh(X)` re-resolves with fresh=True
(skipping every cache), gets B, the daemon checks again and it passes; B replaces A. Had the
fresh document still said A, the event is rejected as bad_signature.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Final

import libipld

from skyfill.errors import ConfigError, IdentityError, RepoError
from skyfill.net.identity import ResolvedIdentity, Resolver
from skyfill.protocol.car import read_car
from skyfill.protocol.commit import commit_signature_valid
from skyfill.protocol.crypto import PublicKey, parse_public_key
from skyfill.protocol.mst import EMPTY_TREE, invert_commit

__all__ = ["CommitVerifier", "CheckResult", "check_frame", "check_frames"]

log = logging.getLogger(__name__)

CheckResult = tuple[str, str] | None

_decode: Final = libipld.decode_dag_cbor
_decode_multi: Final = libipld.decode_dag_cbor_multi


class CommitVerifier:
    def __init__(
        self, resolver: Resolver, *, max_keys: int = 1_000_000, unresolvable_ttl: float = 300.0,
        unavailable_ttl: float = 10.0, refresh_interval: float = 60.0, concurrency: int = 32, batch: int = 256,
        processes: int = 1, resolve_timeout: float = 30.0,
    ) -> None:
        """`unresolvable_ttl`: seconds a DID whose resolution failed terminally (404, no key, ...)
        is answered from memory, so its every commit does not cost the PLC directory a request;
        `unavailable_ttl` the same for a failure that may pass (PLC down, 5xx): its commits are
        rejected meanwhile (the DID then desynchronizes and is backfilled) rather than each
        waiting for another failing request. `refresh_interval`: see `refresh`. `concurrency`: DID documents fetched at once;
        `batch`: DIDs per store write. `processes`: worker processes for the checks (0: a thread
        of this process; the MST inversion is pure Python, so only a process uses another core;
        started on first use). `resolve_timeout`: seconds before a DID document still not
        fetched counts as unavailable (its events are rejected rather than stall the stream)."""
        if max_keys < 1 or concurrency < 1 or batch < 1:
            raise ConfigError("max_keys, concurrency and batch must be positive")
        self._resolver = resolver
        self._keys: dict[str, PublicKey] = {}
        self._seeded: dict[str, str] = {}     # Multikey text from the store, parsed on first use
        self._max_keys = max_keys
        self._unresolvable: dict[str, tuple[float, IdentityError]] = {}
        self._unresolvable_ttl = unresolvable_ttl
        self._unavailable_ttl = unavailable_ttl
        self._refreshed: dict[str, float] = {}
        self._refresh_interval = refresh_interval
        self._concurrency = concurrency
        self._batch = batch
        self._pending: dict[str, asyncio.Future[PublicKey]] = {}
        self._wanted: list[str] = []
        self._batches: set[asyncio.Task[None]] = set()
        self._processes = processes
        self._resolve_timeout = resolve_timeout
        self._pool: ProcessPoolExecutor | None = None

    # -- keys ---------------------------------------------------------------------------------

    async def seed(self) -> int:
        """Load the keys of every fresh identity in the store (one query); returns how many."""
        stored = await self._resolver.stored_signing_keys(self._max_keys)
        for did, key in stored.items():
            if did not in self._keys:
                self._seeded[did] = key
        return len(stored)

    def cached(self, did: str) -> PublicKey | None:
        """The DID's key when known now, without waiting."""
        key = self._keys.get(did)
        if key is None and did in self._seeded:
            key = self._adopt_seed(did)
        return key

    def want(self, did: str) -> None:
        """Start resolving the DID's key unless it is known, on its way, or known to fail."""
        if did in self._keys or did in self._pending:
            return
        if did in self._seeded and self._adopt_seed(did) is not None:
            return
        failed = self._unresolvable.get(did)
        if failed is not None and time.monotonic() < failed[0]:
            return
        self._pending[did] = asyncio.get_running_loop().create_future()
        self._wanted.append(did)
        self._start_batches()

    async def key(self, did: str) -> PublicKey:
        """The DID's key, waiting for its resolution if needed. Raises IdentityError."""
        key = self.cached(did)
        if key is not None:
            return key
        failed = self._unresolvable.get(did)
        if failed is not None:
            if time.monotonic() < failed[0]:
                raise failed[1]
            del self._unresolvable[did]
        if did not in self._pending:
            self.want(did)
        return await asyncio.shield(self._pending[did])

    async def refresh(self, did: str) -> PublicKey:
        """Re-resolve the DID document skipping every cache (after a signature failure).

        At most once per `refresh_interval` per DID: within it the key learnt last is
        returned, so a run of bad commits costs the PLC directory one request, not one each."""
        now = time.monotonic()
        last = self._refreshed.get(did)
        key = self._keys.get(did)
        if last is not None and key is not None and now - last < self._refresh_interval:
            return key
        if len(self._refreshed) >= self._max_keys:
            del self._refreshed[next(iter(self._refreshed))]
        self._refreshed[did] = now
        try:
            identity = await self._resolver.resolve(did, fresh=True)
        except IdentityError as exc:
            self._failed(did, exc)
            raise
        return self._learn(identity)

    def forget(self, did: str) -> None:
        self._keys.pop(did, None)
        self._seeded.pop(did, None)
        self._unresolvable.pop(did, None)

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._wanted.clear()
        batches = list(self._batches)
        for task in batches:
            task.cancel()
        await asyncio.gather(*batches, return_exceptions=True)
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()

    # Wanted DIDs are taken in the order they were first seen, in batches (one store write
    # each) of whatever has accumulated, up to `batch`; up to _BATCHES batches run at once, so
    # one slow document holds back only its own batch's store write, never the next requests.
    _BATCHES: Final = 4

    def _start_batches(self) -> None:
        while self._wanted and len(self._batches) < self._BATCHES:
            batch = self._wanted[: self._batch]
            del self._wanted[: self._batch]
            task = asyncio.create_task(self._resolve_batch(batch))
            self._batches.add(task)
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        if not task.cancelled():
            self._start_batches()

    async def _resolve_batch(self, batch: list[str]) -> None:
        try:
            async for did, result in self._resolver.resolve_many(
                batch, concurrency=self._concurrency, timeout=self._resolve_timeout
            ):
                self._settle(did, result)
        except Exception as exc:  # noqa: BLE001 - a resolver bug must not leave the daemon waiting
            log.error("key resolution failed", extra={"ctx": {"error": repr(exc), "dids": len(batch),
                                                              "first": batch[:3]}})
            for did in batch:
                if did in self._pending:
                    self._settle(did, IdentityError(f"key resolution failed: {exc!r}", did=did))

    def _settle(self, did: str, result: ResolvedIdentity | IdentityError) -> None:
        future = self._pending.pop(did, None)
        if isinstance(result, IdentityError):
            self._failed(did, result)
            if future is not None and not future.done():
                future.set_exception(result)
                future.exception()  # retrieved: nobody may wait for this DID any more
            return
        key = self._learn(result)
        if future is not None and not future.done():
            future.set_result(key)

    def _learn(self, identity: ResolvedIdentity) -> PublicKey:
        key = parse_public_key(identity.signing_key)  # Multikey form, validated by the resolver
        self._store_key(identity.did, key)
        self._unresolvable.pop(identity.did, None)
        return key

    def _store_key(self, did: str, key: PublicKey) -> None:
        keys = self._keys
        keys.pop(did, None)
        if len(keys) >= self._max_keys:
            del keys[next(iter(keys))]  # oldest first: insertion order, no per-hit bookkeeping
        keys[did] = key

    def _adopt_seed(self, did: str) -> PublicKey | None:
        text = self._seeded.pop(did)
        try:
            key = parse_public_key(text)
        except IdentityError:
            return None  # a stored key that no longer parses: resolve it again
        self._store_key(did, key)
        return key

    def _failed(self, did: str, exc: IdentityError) -> None:
        if len(self._unresolvable) >= self._max_keys:
            del self._unresolvable[next(iter(self._unresolvable))]
        ttl = self._unresolvable_ttl if exc.terminal else self._unavailable_ttl
        self._unresolvable[did] = (time.monotonic() + ttl, exc)

    # -- checks ----------------------------------------------------------------------------

    async def check_many(self, jobs: list[tuple[bytes, PublicKey]]) -> list[CheckResult]:
        """`check_frame` of each (frame, key), in order: in the worker process when there is one
        (so the checks run on another core than the daemon), else in a worker thread."""
        if not jobs:
            return []
        if self._processes and self._pool is None:
            self._pool = ProcessPoolExecutor(self._processes, mp_context=multiprocessing.get_context("spawn"))
        if self._pool is not None:
            try:
                return await asyncio.get_running_loop().run_in_executor(self._pool, check_frames, jobs)
            except BrokenProcessPool as exc:
                log.error("verification worker died; checking in this process from now on",
                          extra={"ctx": {"error": repr(exc)}})
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
                self._processes = 0
        return await asyncio.to_thread(check_frames, jobs)


def check_frames(jobs: list[tuple[bytes, PublicKey]]) -> list[CheckResult]:
    return [check_frame(frame, key) for frame, key in jobs]


def check_frame(frame: bytes, key: PublicKey) -> CheckResult:
    """Signature and (for a #commit) inversion proof of one frame that parse_frame accepted as a
    #commit or #sync (so its fields have their types and its commit block names the frame's DID).
    Pure: runs in any thread or process."""
    header, body = _decode_multi(frame)
    if header.get("t") == "#sync":
        roots, blocks = read_car(body["blocks"])
        block: bytes | None = blocks[roots[0]]
    else:
        blocks = read_car(body["blocks"])[1] if body["blocks"] else {}
        block = blocks.get(body["commit"])
    if block is None:  # a tooBig commit may omit its commit block: nothing signed to check
        return "unverifiable", "tooBig commit without its commit block"
    commit = _decode(block)
    if not commit_signature_valid(commit, key):
        return "bad_signature", f"signature does not verify under {key.did_key()}"
    if header.get("t") == "#sync":
        return None
    prev_data = body.get("prevData")
    if prev_data is None:
        if body.get("since") is not None:
            return "unverifiable", "commit without prevData (relay older than sync 1.1)"
        prev_data = EMPTY_TREE  # a repo's first commit: its ops are undone down to the empty tree
    if body.get("tooBig") is True:
        return "unverifiable", "tooBig commit: its blocks may be incomplete"
    try:
        invert_commit(commit["data"], prev_data,
                      [(o["action"], o["path"], o.get("cid"), o.get("prev")) for o in body["ops"]], blocks)
    except RepoError as exc:
        return "bad_inversion", str(exc)
    return None
