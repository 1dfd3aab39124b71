"""Opt-in commit signature checks for firehose #commit and #sync events (`consume --verify-signatures`).

The signature is over the DAG-CBOR encoding of the signed commit without `sig`, checked
against the DID document's #atproto key. Keys live in a bounded in-memory {did: key} map in
front of the Resolver, so the daemon's frame loop stays synchronous for every DID already seen
(`verify_cached`) and awaits the network only on a miss (`check`).

Key rotation (sync 1.1 "refresh the DID document once before rejecting"), worked example:
the map holds key A for did X; X rotates to key B and signs its next commit with B.
`verify_cached` fails -> `check` re-resolves X with fresh=True (skipping every cache),
gets B, verifies, and replaces A with B. Had the fresh document still said A, the event
is rejected: the caller counts it as bad_signature and skips it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

import libipld

from skyfill.crypto import PublicKey, parse_public_key, verify_signature
from skyfill.errors import IdentityError

from .events import Commit, Sync

if TYPE_CHECKING:
    from backfill.identity import Resolver

__all__ = ["SignatureChecker"]


_decode: Final = libipld.decode_dag_cbor
_encode: Final = libipld.encode_dag_cbor


class SignatureChecker:
    """`verify_cached(event)` (sync, no I/O) then, when it says False, `await check(event)`.

    `check` raises IdentityError when the DID cannot be resolved (`terminal` tells whether
    retrying could help); a False from `check` means the signature is bad for good.
    """

    def __init__(self, resolver: Resolver, *, max_keys: int = 1_000_000, unresolvable_ttl: float = 300.0) -> None:
        """`unresolvable_ttl`: seconds a DID whose resolution failed terminally (404, no key, ...)
        is answered from memory, so its every commit does not cost the PLC directory a request."""
        if max_keys < 1:
            raise ValueError("max_keys must be positive")
        self._resolver = resolver
        self._keys: dict[str, PublicKey] = {}
        self._max_keys = max_keys
        self._unresolvable: dict[str, tuple[float, IdentityError]] = {}
        self._unresolvable_ttl = unresolvable_ttl

    def verify_cached(self, event: Commit | Sync) -> bool:
        """True when the cached key of the event's DID verifies its commit; False also on a miss."""
        key = self._keys.get(event.did)
        if key is None:
            return False
        signed = _signed(event)
        return signed is not None and verify_signature(key, signed[0], signed[1])

    async def check(self, event: Commit | Sync) -> bool:
        """Resolve the DID's key (once more with fresh=True if that key fails) and verify."""
        signed = _signed(event)
        if signed is None:
            return False
        did = event.did
        cached = self._keys.get(did)
        if cached is not None and verify_signature(cached, *signed):
            return True
        # A cached key that failed is suspect already: go straight to a fresh document.
        key = await self._resolve(did, fresh=cached is not None)
        if verify_signature(key, *signed):
            return True
        if cached is None:
            key = await self._resolve(did, fresh=True)
            if verify_signature(key, *signed):
                return True
        return False

    def forget(self, did: str) -> None:
        self._keys.pop(did, None)
        self._unresolvable.pop(did, None)

    async def _resolve(self, did: str, *, fresh: bool) -> PublicKey:
        failed = self._unresolvable.get(did)
        if failed is not None:
            if time.monotonic() < failed[0]:
                raise failed[1]
            del self._unresolvable[did]
        try:
            identity = await self._resolver.resolve(did, fresh=fresh)
        except IdentityError as exc:
            if exc.terminal:
                if len(self._unresolvable) >= self._max_keys:
                    del self._unresolvable[next(iter(self._unresolvable))]
                self._unresolvable[did] = (time.monotonic() + self._unresolvable_ttl, exc)
            raise
        key = parse_public_key(identity.signing_key)  # Multikey form, validated by the resolver
        keys = self._keys
        keys.pop(did, None)
        if len(keys) >= self._max_keys:
            del keys[next(iter(keys))]  # oldest first: insertion order, no per-hit bookkeeping
        keys[did] = key
        return key


def _signed(event: Commit | Sync) -> tuple[bytes, bytes] | None:
    """(the bytes that were signed, sig), or None when the event carries no usable signature.

    frames.py checked that the block decodes to a map with the event's did and rev."""
    block = event.commit_block
    if block is None:  # a tooBig commit may omit its commit block: nothing to verify
        return None
    commit = _decode(block)
    sig = commit.pop("sig", None)
    if type(sig) is not bytes:
        return None
    return _encode(commit), sig
