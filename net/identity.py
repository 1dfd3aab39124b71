"""DID -> ResolvedIdentity (PDS endpoint, signing key, handle), cached with a TTL.

did:plc is fetched from `{plc_url}/{did}`; did:web from `https://{host}/.well-known/did.json`
(`%3A` encodes a port; path-style did:web is not allowed in atproto). Every fetch goes through
the PdsClient's guarded HTTP (SSRF guard, size cap, retries, per-host rate limits), so a
did:web host on a private address is refused. Only PLC fetches trust the PLC's exact origin
(scheme, host, port: the operator chose it); nothing else does. http is used for did:web only
when `allow_private_hosts` is set AND the host is localhost or a loopback literal (tests).

Failures: a bad DID, a document whose `id` differs, no `#atproto_pds` service, no `#atproto`
key, an unusable endpoint, an unsafe did:web host, 404/410 -> IdentityError(terminal=True).
Network trouble, 5xx, 429 past patience -> IdentityError(terminal=False). When the cause is
the host guard (a PDS endpoint that is malformed, over-long or a non-canonical numeric host
such as `http://0177.0.0.1`; a did:web host on a private address), the IdentityError is
raised `from` the UnsafeHostError, so a caller can record the outcome UnsafeHost.

`signing_key` is always in Multikey form (`z` + base58btc(multicodec + compressed point)),
checked to be on its curve by `skyfill.crypto.parse_public_key`: legacy
`EcdsaSecp256k1VerificationKey2019` / `EcdsaSecp256r1VerificationKey2019` keys are converted,
so `parse_public_key(identity.signing_key)` needs no key type.

Cache: an in-memory LRU dict, backed by an `IdentityCache` when one is given (storage.Store:
its `identities` table; net sits below storage, so it only knows the protocol). Rows older
than `ttl` are ignored; terminal failures are recorded there with `error` set (for
diagnosis) but never served from the cache. `fresh=True` skips both caches.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote

import orjson

from skyfill.errors import ConfigError, FetchError, IdentityError, InputError, UnsafeHostError
from skyfill.protocol.crypto import parse_public_key
from skyfill.protocol.syntax import is_did

from .guard import check_url
from .pds import PdsClient

__all__ = ["Resolver", "ResolvedIdentity", "IdentityCache", "IdentityRow", "parse_did_doc"]

_PLC_RE = re.compile(r"^did:plc:[a-z2-7]{24}$")
_HOST_RE = re.compile(r"^(?=.{1,253}$)([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*$")
_DOC_LIMIT = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ResolvedIdentity:
    """What a DID document says about its account (not the firehose's #identity event)."""

    did: str
    pds: str                 # #atproto_pds service endpoint, validated http(s) URL, no trailing /
    signing_key: str         # #atproto key, Multikey form ("zQ3s..." K-256, "zDn..." P-256)
    handle: str | None       # from alsoKnownAs at://, lower-cased, NOT verified bidirectionally
    doc: dict[str, Any]


@dataclass(frozen=True, slots=True)
class IdentityRow:
    """One entry of the persistent identity cache: a resolved identity (`error` None) or a
    terminal failure (`error` set, the other fields but `doc` None)."""

    did: str
    pds: str | None
    signing_key: str | None
    handle: str | None
    doc: str                 # the DID document as JSON text
    resolved_at: float       # epoch seconds
    error: str | None = None


class IdentityCache(Protocol):
    """Where resolved identities persist across runs (storage.Store, its `identities` table).

    Called from a worker thread; each call is one statement / one transaction."""

    def load_identity(self, did: str, *, max_age: float) -> IdentityRow | None:
        """The DID's row when it has no `error` and was resolved less than `max_age` seconds ago."""
        ...

    def fresh_signing_keys(self, *, max_age: float, limit: int) -> dict[str, str]:
        """{did: signing_key} of up to `limit` rows without `error`, with a key, resolved less
        than `max_age` seconds ago, newest first."""
        ...

    def save_identities(self, rows: Sequence[IdentityRow]) -> None:
        """Upsert `rows` by DID (every column replaced), in one transaction."""
        ...


class Resolver:
    def __init__(
        self,
        *,
        plc_url: str = "https://plc.directory",
        ttl: float = 24 * 3600.0,
        client: PdsClient | None = None,
        allow_private_hosts: bool = False,
        store: IdentityCache | None = None,
        memory_entries: int = 100_000,
    ) -> None:
        """`client`: share the PdsClient's guarded HTTP and host limits (its `allow_private_hosts`
        then decides). Either way, PLC fetches trust the exact origin of `plc_url`, which may
        be on a private address; nothing else does. `store`: the persistent cache (a
        storage.Store), if any."""
        try:
            check_url(plc_url)
        except UnsafeHostError as exc:
            raise ConfigError(f"plc_url must be a well-formed http(s) URL: {exc}") from exc
        self._plc_url = plc_url.rstrip("/")
        self._ttl = ttl
        self._store = store
        self._owns_client = client is None
        self._client = client or PdsClient(allow_private_hosts=allow_private_hosts, max_retries=2)
        self._allow_private = self._client.http.allow_private_hosts
        # LRU: a full-network backfill resolves millions of DIDs; memory must not grow with them.
        self._memory: OrderedDict[str, tuple[ResolvedIdentity, float]] = OrderedDict()
        self._memory_entries = memory_entries

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> Resolver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- public ------------------------------------------------------------------------------

    async def resolve(self, did: str, *, fresh: bool = False) -> ResolvedIdentity:
        if not fresh:
            cached = self._memory.get(did)
            if cached is not None and time.time() - cached[1] < self._ttl:
                self._memory.move_to_end(did)
                return cached[0]
            stored = await self._load(did)
            if stored is not None:
                return stored
        url = self._doc_url(did)
        doc = await self._fetch_doc(did, url)
        try:
            identity = parse_did_doc(did, doc)
        except IdentityError as exc:
            await self._save_error(did, doc, str(exc))
            raise
        now = time.time()
        self._remember(identity, now)
        await self._save(identity, now)
        return identity

    def _remember(self, identity: ResolvedIdentity, resolved_at: float) -> None:
        self._memory[identity.did] = (identity, resolved_at)
        self._memory.move_to_end(identity.did)
        while len(self._memory) > self._memory_entries:
            self._memory.popitem(last=False)

    def forget(self, did: str) -> None:
        self._memory.pop(did, None)

    # -- in bulk (a firehose verifier meets thousands of new DIDs a second) ------------------

    async def stored_signing_keys(self, limit: int) -> dict[str, str]:
        """{did: Multikey} of up to `limit` identities in the store resolved within the TTL, read
        in one query: a verifier seeds its key map with them at start-up."""
        if self._store is None:
            return {}
        return await asyncio.to_thread(self._store.fresh_signing_keys, max_age=self._ttl, limit=limit)

    async def resolve_many(
        self, dids: Iterable[str], *, concurrency: int = 32, timeout: float = 30.0
    ) -> AsyncIterator[tuple[str, ResolvedIdentity | IdentityError]]:
        """Resolve many DIDs at once, yielding (did, identity or error) as each one completes.

        The memory cache answers first; the rest are fetched with at most `concurrency`
        requests in flight, each given up after `timeout` seconds (a retryable IdentityError:
        a caller waiting on it, like the firehose verifier, must not stall for the client's
        whole retry budget). The store is not read per DID (`stored_signing_keys` reads it in
        bulk) and is written once, after the last answer: one transaction for the whole batch
        rather than two statements per DID. Stop iterating early and nothing is saved."""
        if concurrency < 1:
            raise ConfigError("concurrency must be positive")
        limit = asyncio.Semaphore(concurrency)
        now = time.time()
        fetched: list[ResolvedIdentity] = []
        failed: list[tuple[str, dict[str, Any], str]] = []

        async def one(did: str) -> tuple[str, ResolvedIdentity | IdentityError]:
            async with limit:
                try:
                    async with asyncio.timeout(timeout):
                        doc = await self._fetch_doc(did, self._doc_url(did))
                except IdentityError as exc:
                    return did, exc
                except TimeoutError:
                    return did, IdentityError(f"DID document not fetched within {timeout:g} s", did=did)
                try:
                    identity = parse_did_doc(did, doc)
                except IdentityError as exc:
                    self._memory.pop(did, None)
                    failed.append((did, doc, str(exc)))
                    return did, exc
                self._remember(identity, time.time())
                fetched.append(identity)
                return did, identity

        tasks = []
        for did in dict.fromkeys(dids):
            cached = self._memory.get(did)
            if cached is not None and now - cached[1] < self._ttl:
                self._memory.move_to_end(did)
                yield did, cached[0]
            else:
                tasks.append(asyncio.ensure_future(one(did)))
        try:
            for next_done in asyncio.as_completed(tasks):
                yield await next_done
        finally:
            for task in tasks:
                task.cancel()
        await self._save_many(fetched, failed)

    async def _save_many(
        self, identities: list[ResolvedIdentity], failed: list[tuple[str, dict[str, Any], str]]
    ) -> None:
        if self._store is None or not (identities or failed):
            return
        now = time.time()
        rows = [_row(i, now) for i in identities]
        rows += [_failure_row(did, doc, error, now) for did, doc, error in failed]
        await asyncio.to_thread(self._store.save_identities, rows)

    # -- fetching ----------------------------------------------------------------------------

    def _doc_url(self, did: str) -> str:
        if not is_did(did):
            raise IdentityError(f"invalid DID syntax: {did!r}", did=did, terminal=True)
        if did.startswith("did:plc:"):
            if not _PLC_RE.match(did):
                raise IdentityError(f"invalid did:plc: {did!r}", did=did, terminal=True)
            return f"{self._plc_url}/{did}"
        if did.startswith("did:web:"):
            host_port = unquote(did[len("did:web:") :])
            host, _, port = host_port.partition(":")
            if ":" in port or not _HOST_RE.match(host) or (port and not (port.isdigit() and 0 < int(port) < 65536)):
                raise IdentityError(f"unsupported did:web (paths are not allowed): {did!r}", did=did, terminal=True)
            scheme = "http" if self._allow_private and _is_loopback_name(host) else "https"
            return f"{scheme}://{host_port.lower()}/.well-known/did.json"
        raise IdentityError(f"unsupported DID method: {did!r}", did=did, terminal=True)

    async def _fetch_doc(self, did: str, url: str) -> dict[str, Any]:
        plc = did.startswith("did:plc:")
        try:
            result = await self._client.fetch(
                url,
                max_bytes=_DOC_LIMIT,
                did=did,
                headers={"Accept": "application/json"},
                trusted_origin=self._plc_url if plc else None,
            )
        except UnsafeHostError as exc:
            if plc:  # the operator's PLC (or its redirect): configuration, not the DID's fault
                raise IdentityError(f"PLC directory refused by the host guard: {exc}", did=did)
            raise IdentityError(f"did:web host refused: {exc}", did=did, terminal=True) from exc
        except InputError as exc:
            raise IdentityError(f"DID document too large: {exc}", did=did, terminal=True) from exc
        except FetchError as exc:  # RetryableFetchError, RateLimited past patience
            raise IdentityError(f"cannot fetch DID document: {exc}", did=did) from exc
        if result.status in (404, 410):
            raise IdentityError(f"DID document not found (HTTP {result.status})", did=did, terminal=True)
        if not 200 <= result.status < 300:
            raise IdentityError(f"HTTP {result.status} fetching DID document", did=did)
        try:
            doc = orjson.loads(result.body)
        except orjson.JSONDecodeError as exc:
            raise IdentityError("DID document is not JSON", did=did, terminal=True) from exc
        if not isinstance(doc, dict):
            raise IdentityError("DID document is not a JSON object", did=did, terminal=True)
        return doc

    # -- cache -------------------------------------------------------------------------------

    async def _load(self, did: str) -> ResolvedIdentity | None:
        if self._store is None:
            return None
        row = await asyncio.to_thread(self._store.load_identity, did, max_age=self._ttl)
        if row is None or row.pds is None or row.signing_key is None:  # no error: both are set
            return None
        identity = ResolvedIdentity(
            did=did, pds=row.pds, signing_key=row.signing_key, handle=row.handle, doc=orjson.loads(row.doc)
        )
        self._remember(identity, row.resolved_at)
        return identity

    async def _save(self, identity: ResolvedIdentity, resolved_at: float) -> None:
        if self._store is None:
            return
        await asyncio.to_thread(self._store.save_identities, [_row(identity, resolved_at)])

    async def _save_error(self, did: str, doc: dict[str, Any], error: str) -> None:
        self._memory.pop(did, None)
        if self._store is None:
            return
        await asyncio.to_thread(self._store.save_identities, [_failure_row(did, doc, error, time.time())])


def _row(identity: ResolvedIdentity, resolved_at: float) -> IdentityRow:
    return IdentityRow(
        identity.did, identity.pds, identity.signing_key, identity.handle, orjson.dumps(identity.doc).decode(),
        resolved_at,
    )


def _failure_row(did: str, doc: dict[str, Any], error: str, resolved_at: float) -> IdentityRow:
    return IdentityRow(did, None, None, None, orjson.dumps(doc).decode(), resolved_at, error)


# -- parsing the document (pure) -----------------------------------------------------------


def parse_did_doc(did: str, doc: dict[str, Any]) -> ResolvedIdentity:
    """Validate a DID document for `did` and extract what skyfill needs. Raises terminal
    IdentityError for anything unusable."""

    def bad(msg: str) -> IdentityError:
        return IdentityError(f"{did}: {msg}", did=did, terminal=True)

    if doc.get("id") != did:
        raise bad(f"document id {doc.get('id')!r} differs")
    pds = _find(did, doc.get("service"), "#atproto_pds")
    if pds is None or not isinstance(pds.get("serviceEndpoint"), str):
        raise bad("no #atproto_pds service")
    value: str = pds["serviceEndpoint"]
    if not value[:8].lower().startswith(("http://", "https://")):
        raise bad(f"unusable PDS endpoint {value[:200]!r}")
    try:
        target = check_url(value)
    except UnsafeHostError as exc:
        raise bad(f"PDS endpoint refused by the host guard: {exc}") from exc
    url = target.url
    if url.path != "/" or url.query or url.fragment:
        raise bad(f"unusable PDS endpoint {value[:200]!r} (path, query or fragment)")
    endpoint = str(url).removesuffix("/")
    method = _find(did, doc.get("verificationMethod"), "#atproto")
    if method is None or not isinstance(method.get("publicKeyMultibase"), str):
        raise bad("no #atproto verification key")
    key = _multikey(method.get("type"), method["publicKeyMultibase"])
    if key is None:
        raise bad(f"unusable #atproto key of type {method.get('type')!r}")
    handle = None
    aka = doc.get("alsoKnownAs")
    if isinstance(aka, list):
        for name in aka:
            if isinstance(name, str) and name.startswith("at://") and len(name) > 5:
                handle = name[5:].lower()
                break
    return ResolvedIdentity(did=did, pds=endpoint, signing_key=key, handle=handle, doc=doc)


def _find(did: str, entries: object, fragment: str) -> dict[str, Any] | None:
    if not isinstance(entries, list):
        return None
    for entry in entries:
        if isinstance(entry, dict) and entry.get("id") in (fragment, did + fragment):
            return entry
    return None


def _multikey(key_type: object, multibase: str) -> str | None:
    """The key in Multikey form, validated as a point on its curve; None if unusable."""
    if not isinstance(key_type, str):
        return None
    try:
        key = parse_public_key(multibase, key_type=key_type)
    except IdentityError:
        return None
    return key.did_key().removeprefix("did:key:")


def _is_loopback_name(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
