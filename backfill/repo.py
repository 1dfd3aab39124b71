"""A whole-repo CAR (com.atproto.sync.getRepo) -> a verified snapshot of its live records.

Trust flows from the signed commit down: the CAR root is the commit, the commit names the MST
root `data`, every MST node names its children and record CIDs. Each block is checked against
the CID that reached it before it is used, so nothing outside that chain is ever trusted:
unreachable blocks (old commits, stale nodes) are skipped unhashed, and record blocks are hashed
only when `materialize` decodes them (an unchanged record never needs its bytes).

MST node: {l: CID | null, e: [{p: int, k: bytes, v: CID, t: CID | null}]}. Keys are
`collection/rkey`, prefix-compressed against the previous entry of the same node:
    e[0] = {p: 0,  k: b"app.bsky.feed.like/3k2a"}  -> "app.bsky.feed.like/3k2a"
    e[1] = {p: 20, k: b"b7"}                       -> "app.bsky.feed.like/3k" + "b7"
In-order traversal (l, then each entry followed by its t subtree) yields strictly increasing keys.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Final

import libipld

from skyfill.car import CarError, cid_from_str, cid_to_str, read_car
from skyfill.crypto import PublicKey, verify_signature
from skyfill.errors import InputError, RepoError, SignatureError
from skyfill.records import record_json
from storage.writer import RecordColumns

__all__ = ["RepoSnapshot", "parse_repo", "materialize"]

log = logging.getLogger(__name__)

_DAG_CBOR_PREFIX: Final = b"\x01\x71\x12\x20"
# Heights come from 2-bit chunks of a sha256, so a real MST is never deeper than 128 layers.
_MAX_DEPTH: Final = 130
# collection (NSID characters) '/' record key (record-key characters); both non-empty.
_KEY: Final = re.compile(rb"[a-zA-Z0-9.\-]{1,317}/[a-zA-Z0-9._~:\-]{1,512}")
_TID: Final = re.compile(r"[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}")


@dataclass(frozen=True, slots=True)
class RepoSnapshot:
    did: str
    version: int                           # 2 or 3
    rev: str | None                        # None for v2 commits
    data_cid: str                          # MST root
    commit_cid: str                        # the signed commit block
    records: dict[tuple[str, str], str]    # (collection, rkey) -> record CID
    # CID bytes -> raw block bytes as read from the CAR, NOT yet hashed: `materialize` checks
    # each record block against its CID before decoding it.
    blocks: dict[bytes, bytes] = field(repr=False, compare=False)


def _error(message: str, kind: str, did: str) -> RepoError:
    return RepoError(message, kind=kind, did=did)


def _verified(blocks: dict[bytes, bytes], cid: bytes, did: str, what: str) -> bytes:
    block = blocks.get(cid)
    if block is None:
        # a CAR cut at a block boundary parses; the hole only shows here (retryable)
        raise _error(f"{what} block {_cid_str(cid)} is missing from the CAR", "missing_block", did)
    if cid[:4] != _DAG_CBOR_PREFIX or hashlib.sha256(block).digest() != cid[4:]:
        raise _error(f"{what} block does not hash to its CID {_cid_str(cid)}", "bad_block_hash", did)
    return block


def _cid_str(cid: bytes) -> str:
    try:
        return cid_to_str(cid)
    except ValueError:
        return cid.hex()


def _is_cid(value: Any) -> bool:
    return type(value) is bytes and len(value) == 36 and value[:4] == _DAG_CBOR_PREFIX


def _read_commit(blocks: dict[bytes, bytes], root: bytes, did: str) -> dict[str, Any]:
    raw = _verified(blocks, root, did, "commit")
    try:
        commit = libipld.decode_dag_cbor(raw)
    except ValueError as exc:
        raise _error(f"commit is not valid DAG-CBOR: {exc}", "bad_commit", did) from exc
    if not isinstance(commit, dict):
        raise _error("commit is not a map", "bad_commit", did)
    version = commit.get("version")
    if version not in (2, 3) or type(version) is not int:
        raise _error(f"unsupported commit version {version!r}", "bad_commit", did)
    rev = commit.get("rev")
    if version == 3 and not (isinstance(rev, str) and _TID.fullmatch(rev)):
        raise _error(f"v3 commit has no valid rev: {rev!r}", "bad_commit", did)
    if rev is not None and not isinstance(rev, str):
        raise _error("commit rev is not a string", "bad_commit", did)
    if not isinstance(commit.get("did"), str):
        raise _error("commit has no did", "bad_commit", did)
    if not _is_cid(commit.get("data")):
        raise _error("commit has no data CID", "bad_commit", did)
    if type(commit.get("sig")) is not bytes:
        raise _error("commit has no signature", "bad_commit", did)
    return commit


def parse_repo(car: bytes, *, did: str, key: PublicKey | None) -> RepoSnapshot:
    """Verify a repo CAR down from its signed root and list its live records.

    Raises CarError (malformed CAR), RepoError kinds missing_block (retryable: truncated
    download), bad_block_hash, bad_commit, did_mismatch, bad_mst_node, bad_mst_key,
    mst_unsorted, mst_too_deep; SignatureError when `key` is given and the signature fails.
    """
    roots, blocks = read_car(car)
    if len(roots) != 1:
        raise CarError(f"repo CAR must have exactly one root, has {len(roots)}", kind="car_malformed")
    commit_cid = roots[0]
    commit = _read_commit(blocks, commit_cid, did)
    if commit["did"] != did:
        raise _error(f"commit is for {commit['did']!r}, expected {did!r}", "did_mismatch", did)
    if key is not None:
        # libipld re-encodes 36-byte CID-shaped byte strings as CID links, which is exactly
        # what `data` and `prev` are; the signed bytes are the commit without `sig`.
        unsigned = libipld.encode_dag_cbor({k: v for k, v in commit.items() if k != "sig"})
        if not verify_signature(key, unsigned, commit["sig"]):
            raise SignatureError("commit signature does not verify", kind="bad_signature", did=did)
    records = _walk(blocks, commit["data"], did)
    return RepoSnapshot(
        did=did,
        version=commit["version"],
        rev=commit.get("rev"),
        data_cid=cid_to_str(commit["data"]),
        commit_cid=cid_to_str(commit_cid),
        records=records,
        blocks=blocks,
    )


def _walk(blocks: dict[bytes, bytes], root: bytes, did: str) -> dict[tuple[str, str], str]:
    records: dict[tuple[str, str], str] = {}
    collections: dict[bytes, str] = {}   # one str object per collection name
    last = b""                           # previous key in traversal order
    encode_cid = libipld.encode_cid
    decode = libipld.decode_dag_cbor
    sha256 = hashlib.sha256
    key_ok = _KEY.fullmatch

    def visit(cid: bytes, depth: int) -> None:
        nonlocal last
        if depth > _MAX_DEPTH:
            raise _error("MST is deeper than any valid tree", "mst_too_deep", did)
        raw = blocks.get(cid)
        if raw is None:
            raise _error(f"MST node {_cid_str(cid)} is missing from the CAR", "missing_block", did)
        if cid[:4] != _DAG_CBOR_PREFIX or sha256(raw).digest() != cid[4:]:
            raise _error(f"MST node does not hash to its CID {_cid_str(cid)}", "bad_block_hash", did)
        try:
            node = decode(raw)
            left = node["l"]
            entries = node["e"]
        except (ValueError, KeyError, TypeError) as exc:
            raise _error(f"MST node {_cid_str(cid)} is malformed: {exc!r}", "bad_mst_node", did) from exc
        if type(entries) is not list:
            raise _error("MST node entries are not a list", "bad_mst_node", did)
        if left is not None:
            if not _is_cid(left):
                raise _error("MST node left link is not a CID", "bad_mst_node", did)
            visit(left, depth + 1)
        prev = b""
        for entry in entries:
            try:
                p = entry["p"]
                suffix = entry["k"]
                value = entry["v"]
                right = entry["t"]
            except (KeyError, TypeError) as exc:
                raise _error(f"MST entry is malformed: {exc!r}", "bad_mst_node", did) from exc
            if type(p) is not int or not 0 <= p <= len(prev) or type(suffix) is not bytes:
                raise _error("MST entry has a bad prefix length or key", "bad_mst_node", did)
            key = prev[:p] + suffix
            if key_ok(key) is None:
                raise _error(f"MST key {key[:80]!r} is not collection/rkey", "bad_mst_key", did)
            if key <= last:
                raise _error(f"MST keys out of order at {key[:80]!r}", "mst_unsorted", did)
            if not _is_cid(value):
                raise _error(f"MST entry {key[:80]!r} has no record CID", "bad_mst_node", did)
            if value not in blocks:
                raise _error(f"record block for {key[:80]!r} is missing from the CAR", "missing_block", did)
            slash = key.index(b"/")
            coll_bytes = key[:slash]
            collection = collections.get(coll_bytes)
            if collection is None:
                collection = collections[coll_bytes] = coll_bytes.decode("ascii")
            records[(collection, key[slash + 1 :].decode("ascii"))] = encode_cid(value)
            prev = last = key
            if right is not None:
                if not _is_cid(right):
                    raise _error("MST entry subtree link is not a CID", "bad_mst_node", did)
                visit(right, depth + 1)

    visit(root, 0)
    return records


def materialize(snapshot: RepoSnapshot, keys: list[tuple[str, str]]) -> RecordColumns:
    """Decode the records at `keys` (which must be in `snapshot.records`) into storage columns.

    Each record block is hashed against its CID first (RepoError bad_block_hash /
    missing_block). A record whose bytes verify but are not a DAG-CBOR map is kept with
    record=None, so one odd record does not fail the whole repo.
    """
    out = RecordColumns(collection=[], rkey=[], cid=[], record=[], created_at=[])
    blocks = snapshot.blocks
    did = snapshot.did
    for collection, rkey in keys:
        cid = snapshot.records[(collection, rkey)]
        block = _verified(blocks, cid_from_str(cid), did, f"record {collection}/{rkey}")
        try:
            text, created_at = record_json(block)
        except InputError as exc:
            log.warning(
                "undecodable record kept without body",
                extra={"ctx": {"did": did, "path": f"{collection}/{rkey}", "cid": cid, "error": exc.kind}},
            )
            text, created_at = None, None
        out.collection.append(collection)
        out.rkey.append(rkey)
        out.cid.append(cid)
        out.record.append(text)
        out.created_at.append(created_at)
    return out
