"""The PLC directory's bulk export: `GET {plc}/export?after=<createdAt>&count=<n>` as JSON lines.

Each line is one operation `{did, operation, cid, nullified, createdAt}`, oldest first; the next
page starts after the `createdAt` of the last line. An operation is one of:
    plc_operation   the whole current state: verificationMethods.atproto (a did:key),
                    alsoKnownAs (at://handle), services.atproto_pds.endpoint
    create          the legacy genesis form: signingKey, handle, service
    plc_tombstone   the DID is deactivated for good
`parse_export_line` turns a line into a `PlcEntry` holding what a DID document built from that
operation says (through `identity.parse_did_doc`, the same checks as a per-DID resolve: a PDS
endpoint the host guard refuses or an unusable key makes the entry an `error`, never a usable
identity). The newest operation per DID wins; a nullified one is skipped.

Hostile input: a page that is not JSON lines is cut at the first bad line (the lines before it
count; `ExportPage.bad_lines` says how many were refused), a line over 64 KiB or a DID that is not
a did:plc is refused, a page over `max_page_bytes` raises InputError(kind="too_large").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import orjson

from skyfill.errors import IdentityError, RetryableFetchError

from .http import host_key
from .identity import parse_did_doc
from .pds import PdsClient

__all__ = ["PlcEntry", "ExportPage", "PlcExport", "parse_export_line", "EXPORT_PAGE"]

EXPORT_PAGE: Final = 1000
_MAX_LINE: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class PlcEntry:
    did: str
    created_at: datetime
    pds: str | None          # None: tombstone or unusable (then `error` says why)
    signing_key: str | None  # Multikey form
    handle: str | None
    tombstone: bool = False
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ExportPage:
    entries: list[PlcEntry]
    after: str | None        # createdAt of the last line read (the next page's `after`)
    lines: int               # lines read, nullified and refused ones included
    bad_lines: list[str]     # why each refused line was refused


def _doc(did: str, op: dict[str, Any]) -> dict[str, Any]:
    """The DID document PLC serves for `op` (plc_operation or legacy create)."""
    if op.get("type") == "create":
        key, handle, endpoint = op.get("signingKey"), op.get("handle"), op.get("service")
        methods = {"atproto": key}
        aka = [f"at://{handle}"] if isinstance(handle, str) else []
        services = {"atproto_pds": {"type": "AtprotoPersonalDataServer", "endpoint": endpoint}}
    else:
        methods = op.get("verificationMethods") if isinstance(op.get("verificationMethods"), dict) else {}
        aka = op.get("alsoKnownAs") if isinstance(op.get("alsoKnownAs"), list) else []
        services = op.get("services") if isinstance(op.get("services"), dict) else {}
    vms = [
        {"id": f"{did}#{name}", "type": "Multikey", "controller": did,
         "publicKeyMultibase": key.removeprefix("did:key:")}
        for name, key in methods.items() if isinstance(key, str) and key.startswith("did:key:")
    ]
    svcs = [
        {"id": f"#{name}", "type": svc.get("type"), "serviceEndpoint": svc.get("endpoint")}
        for name, svc in services.items() if isinstance(svc, dict)
    ]
    return {"id": did, "alsoKnownAs": aka, "verificationMethod": vms, "service": svcs}


def parse_export_line(line: bytes) -> PlcEntry | None:
    """One export line -> PlcEntry; None for a nullified operation. Raises ValueError (with the
    reason) for a line that is not a well-formed export entry."""
    if len(line) > _MAX_LINE:
        raise ValueError(f"line of {len(line)} bytes")
    try:
        item = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ValueError("not JSON") from exc
    if not isinstance(item, dict):
        raise ValueError("not an object")
    did, op, created = item.get("did"), item.get("operation"), item.get("createdAt")
    if not isinstance(did, str) or not did.startswith("did:plc:") or len(did) != 32:
        raise ValueError(f"not a did:plc: {str(did)[:80]!r}")
    if not isinstance(op, dict) or not isinstance(created, str):
        raise ValueError("no operation or createdAt")
    try:
        created_at = datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"bad createdAt {created[:40]!r}") from exc
    if created_at.tzinfo is None:
        raise ValueError(f"createdAt without a zone {created[:40]!r}")
    if item.get("nullified") is True:
        return None
    if op.get("type") == "plc_tombstone":
        return PlcEntry(did, created_at, None, None, None, tombstone=True)
    if op.get("type") not in ("plc_operation", "create"):
        raise ValueError(f"unknown operation type {str(op.get('type'))[:40]!r}")
    try:
        ident = parse_did_doc(did, _doc(did, op))
    except IdentityError as exc:
        return PlcEntry(did, created_at, None, None, None, error=str(exc)[:300])
    return PlcEntry(did, created_at, ident.pds, ident.signing_key, ident.handle)


class PlcExport:
    """Pages of `{plc_url}/export` through the shared PdsClient (the PLC's origin is trusted)."""

    def __init__(self, client: PdsClient, plc_url: str, *, count: int = EXPORT_PAGE,
                 max_page_bytes: int = 64 * 1024 * 1024) -> None:
        self.client = client
        self.plc_url = plc_url.rstrip("/")
        self.count = max(1, min(count, EXPORT_PAGE))
        self.max_page_bytes = max_page_bytes

    async def page(self, after: str | None) -> ExportPage:
        params = {"count": str(self.count)}
        if after is not None:
            params["after"] = after
        url = f"{self.plc_url}/export"
        result = await self.client.fetch(url, params=params, max_bytes=self.max_page_bytes,
                                         trusted_origin=self.plc_url)
        if not 200 <= result.status < 300:
            raise RetryableFetchError(f"PLC export: HTTP {result.status}", host=host_key(url))
        entries: list[PlcEntry] = []
        bad: list[str] = []
        last: str | None = None
        lines = 0
        for raw in result.body.split(b"\n"):
            if not raw.strip():
                continue
            lines += 1
            try:
                entry = parse_export_line(raw)
            except ValueError as exc:
                bad.append(f"line {lines}: {exc}")
                if not _created_at(raw):
                    break  # no position to resume after: the rest of this page is not trusted
                last = _created_at(raw)
                continue
            last = _created_at(raw)
            if entry is not None:
                entries.append(entry)
        return ExportPage(entries, last, lines, bad)


def _created_at(raw: bytes) -> str | None:
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    created = item.get("createdAt") if isinstance(item, dict) else None
    return created if isinstance(created, str) and len(created) <= 40 else None
