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

Hostile input. Any bytes end in a snapshot or a RepoError (CarError, SignatureError), never
another exception, and the work is bounded by the CAR's size:
- the walk visits each node block at most once: a node reached twice (a DAG whose nodes link
  one child twice is 2^n paths for n nodes: 40 nodes, 9 KB, had taken 2.2 GB) is refused as
  `mst_revisit`, so the walk visits at most as many nodes as the CAR has blocks;
- a rebuilt key longer than any valid `collection/rkey` (830 bytes) is refused as soon as it is
  built, so prefix compression cannot turn n entries into n^2/2 key bytes: the key list holds at
  most 830 bytes per entry, and every entry costs the CAR >= 40 bytes;
- each node is typed before use: a map of exactly `e` (a list) and `l` (a link or null), each
  entry a map of exactly p (int >= 0), k (bytes), v (link), t (link or null);
- nesting too deep for the decoder (libipld raises RecursionError at ~2,000 levels) is a
  RepoError of kind `too_deep` (CarError `car_too_deep` in the CAR header);
- the record bytes the keys name (a block shared by n identical records counts n times: that
  is what `materialize` and the store will write) may not exceed 4x the CAR's blocks + 1 MiB
  (`record_amplification`).
Key heights (the layer each key belongs to) are NOT checked: the record set is authenticated by
the hash chain from the signed commit whatever the tree's shape; canonical shape matters to
sync 1.1 inversion proofs, which check it against the frame's own blocks.
"""

from __future__ import annotations

import hashlib
import logging
import re
from bisect import bisect_left
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Final

import libipld
import orjson

from skyfill.errors import InputError, RepoError, SignatureError

from .car import DAG_CBOR_CID_PREFIX, CarError, cid_to_str, read_car, read_header, read_varint
from .columns import RecordColumns
from .commit import commit_signature_valid
from .crypto import PublicKey
from .records import record_json
from .syntax import is_nsid, is_tid

__all__ = ["RepoSnapshot", "parse_repo", "materialize"]

log = logging.getLogger(__name__)

# Heights come from 2-bit chunks of a sha256, so a real MST is never deeper than 128 layers.
_MAX_DEPTH: Final = 130
# collection (NSID characters) '/' record key (record-key characters); both non-empty.
_KEY: Final = re.compile(rb"[a-zA-Z0-9.\-]{1,317}/[a-zA-Z0-9._~:\-]{1,512}")
_MAX_KEY: Final = 317 + 1 + 512
# record bytes the MST may name (blocks shared by identical records counted once per key):
# at most this many times the bytes of all blocks, plus the slack
_MAX_SHARING: Final = 4
_SHARING_SLACK: Final = 1 << 20
# every byte that may appear in `collection/rkey` keys joined by newlines
_KEY_CHARS: Final = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_~:/\n"


@dataclass(frozen=True, slots=True)
class RepoSnapshot:
    did: str
    version: int                           # 2 or 3
    rev: str | None                        # None for v2 commits
    data_cid: str                          # MST root
    commit_cid: str                        # the signed commit block
    # CID bytes -> raw block bytes as read from the CAR, NOT yet hashed: `materialize` checks
    # each record block against its CID before decoding it. None until split (see `blocks`).
    split: dict[bytes, bytes] | None = field(repr=False, compare=False)
    # (collection, rkey) -> record CID; None until walked (parse_repo may defer the walk when the
    # caller expects an unchanged data root: `records` walks on first use).
    walked: dict[tuple[str, str], str] | None = field(default=None, repr=False, compare=False)
    data_root: bytes = field(default=b"", repr=False, compare=False)
    car: bytes | None = field(default=None, repr=False, compare=False)  # kept only until split

    @property
    def blocks(self) -> dict[bytes, bytes]:
        if self.split is None:
            _roots, blocks = read_car(self.car or b"")
            object.__setattr__(self, "split", blocks)
            object.__setattr__(self, "car", None)
        return self.split  # type: ignore[return-value]

    @property
    def records(self) -> dict[tuple[str, str], str]:
        if self.walked is None:
            object.__setattr__(self, "walked", _walk(self.blocks, self.data_root, self.did))
        return self.walked  # type: ignore[return-value]


def _error(message: str, kind: str, did: str) -> RepoError:
    return RepoError(message, kind=kind, did=did)


def _verified(blocks: dict[bytes, bytes], cid: bytes, did: str, what: str) -> bytes:
    block = blocks.get(cid)
    if block is None:
        # a CAR cut at a block boundary parses; the hole only shows here (retryable)
        raise _error(f"{what} block {_cid_str(cid)} is missing from the CAR", "missing_block", did)
    if cid[:4] != DAG_CBOR_CID_PREFIX or hashlib.sha256(block).digest() != cid[4:]:
        raise _error(f"{what} block does not hash to its CID {_cid_str(cid)}", "bad_block_hash", did)
    return block


def _cid_str(cid: bytes) -> str:
    try:
        return cid_to_str(cid)
    except ValueError:
        return cid.hex()


def _is_cid(value: Any) -> bool:
    return type(value) is bytes and len(value) == 36 and value[:4] == DAG_CBOR_CID_PREFIX


def _read_commit(blocks: dict[bytes, bytes], root: bytes, did: str) -> dict[str, Any]:
    raw = _verified(blocks, root, did, "commit")
    try:
        commit = libipld.decode_dag_cbor(raw)
    except ValueError as exc:
        raise _error(f"commit is not valid DAG-CBOR: {exc}", "bad_commit", did) from exc
    except RecursionError as exc:
        raise _error("commit block is nested too deeply", "too_deep", did) from exc
    if type(commit) is not dict:
        raise _error("commit is not a map", "bad_commit", did)
    version = commit.get("version")
    if version not in (2, 3) or type(version) is not int:
        raise _error(f"unsupported commit version {version!r}", "bad_commit", did)
    rev = commit.get("rev")
    if version == 3 and not is_tid(rev):
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


def parse_repo(
    car: bytes, *, did: str, key: PublicKey | None, defer_walk_if_data: str | None = None
) -> RepoSnapshot:
    """Verify a repo CAR down from its signed root and list its live records.

    `defer_walk_if_data`: when the signed commit's data root equals this CID string (the stored
    one), the MST is not walked now (an unchanged repo needs no record list); `records` walks
    it on first use, raising the same RepoErrors then. If the commit is the CAR's first block
    (as PDSes write it), the rest of the CAR is not even split until `blocks` is used.

    Raises CarError (malformed CAR), RepoError kinds missing_block (retryable: truncated
    download), bad_block_hash, bad_commit, did_mismatch, bad_mst_node, bad_mst_key,
    mst_unsorted, mst_too_deep, mst_revisit, too_deep, record_amplification; SignatureError
    when `key` is given and the signature fails. Nothing else escapes, whatever the bytes.
    """
    first = _first_block(car) if defer_walk_if_data is not None else None
    if first is not None:
        commit_cid, raw = first
        commit = _read_commit({commit_cid: raw}, commit_cid, did)
        if cid_to_str(commit["data"]) == defer_walk_if_data:
            _check_commit(commit, did, key)
            return RepoSnapshot(
                did=did, version=commit["version"], rev=commit.get("rev"), data_cid=defer_walk_if_data,
                commit_cid=cid_to_str(commit_cid), split=None, walked=None, data_root=commit["data"], car=car,
            )
    roots, blocks = read_car(car)
    if len(roots) != 1:
        raise CarError(f"repo CAR must have exactly one root, has {len(roots)}", kind="car_malformed")
    commit_cid = roots[0]
    commit = _read_commit(blocks, commit_cid, did)
    _check_commit(commit, did, key)
    data_cid = cid_to_str(commit["data"])
    records = None if data_cid == defer_walk_if_data else _walk(blocks, commit["data"], did)
    return RepoSnapshot(
        did=did,
        version=commit["version"],
        rev=commit.get("rev"),
        data_cid=data_cid,
        commit_cid=cid_to_str(commit_cid),
        split=blocks,
        walked=records,
        data_root=commit["data"],
    )


def _check_commit(commit: dict[str, Any], did: str, key: PublicKey | None) -> None:
    if commit["did"] != did:
        raise _error(f"commit is for {commit['did']!r}, expected {did!r}", "did_mismatch", did)
    if key is not None:
        try:
            valid = commit_signature_valid(commit, key)
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            raise _error(f"commit cannot be re-encoded for its signature: {exc!r}", "bad_commit", did) from exc
        if not valid:
            raise SignatureError("commit signature does not verify", kind="bad_signature", did=did)


def _first_block(car: bytes) -> tuple[bytes, bytes] | None:
    """(CID, bytes) of the CAR's first block when it is the single root's, else None (the full
    split then decides, with its errors). The block is hash-checked by `_read_commit`.
    Raises CarError for a malformed header, as `read_car` would."""
    roots, pos = read_header(car)
    if len(roots) != 1 or not _is_cid(roots[0]):
        return None
    try:
        length, pos = read_varint(car, pos)
    except CarError:
        return None
    end = pos + length
    if length <= 36 or end > len(car) or car[pos : pos + 36] != roots[0]:
        return None
    return roots[0], car[pos + 36 : end]


def _walk(blocks: dict[bytes, bytes], root: bytes, did: str) -> dict[tuple[str, str], str]:
    # Hot loop: per entry only what cannot be done in bulk (type the entry, rebuild the key,
    # collect key and CID); syntax, order, CID shape and presence are then checked over whole
    # lists in C.
    keys: list[bytes] = []
    cids: list[bytes] = []
    seen: set[bytes] = set()
    decode = libipld.decode_dag_cbor
    sha256 = hashlib.sha256
    get = blocks.get
    add_key = keys.append
    add_cid = cids.append
    visited = seen.add
    max_key = _MAX_KEY

    def visit(cid: bytes, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise _error("MST is deeper than any valid tree", "mst_too_deep", did)
        # A link of the wrong type fails here with TypeError, caught by the parent's handler.
        if cid[:4] != DAG_CBOR_CID_PREFIX or len(cid) != 36:
            raise _error("MST link is not a DAG-CBOR sha2-256 CID", "bad_mst_node", did)
        if cid in seen:
            raise _error(f"MST node {_cid_str(cid)} is reached twice (not a tree)", "mst_revisit", did)
        visited(cid)
        raw = get(cid)
        if raw is None:
            raise _error(f"MST node {_cid_str(cid)} is missing from the CAR", "missing_block", did)
        if sha256(raw).digest() != cid[4:]:
            raise _error(f"MST node does not hash to its CID {_cid_str(cid)}", "bad_block_hash", did)
        try:
            node = decode(raw)
        except ValueError as exc:
            raise _error(f"MST node {_cid_str(cid)} is not DAG-CBOR: {exc}", "bad_mst_node", did) from exc
        except RecursionError as exc:
            raise _error(f"MST node {_cid_str(cid)} is nested too deeply", "too_deep", did) from exc
        try:
            if type(node) is not dict or len(node) != 2 or type(entries := node["e"]) is not list:
                raise _error(f"MST node {_cid_str(cid)} is not {{e: [...], l}}", "bad_mst_node", did)
            left = node["l"]
            if left is not None:
                visit(left, depth + 1)
            prev = b""
            for entry in entries:
                # len() and the four lookups below pin a map of exactly p, k, v, t (a list,
                # text or bytes entry fails the lookups with TypeError, a scalar fails len())
                if len(entry) != 4:
                    raise _error(f"MST entry in {_cid_str(cid)} is not {{p, k, v, t}}", "bad_mst_node", did)
                p = entry["p"]
                if type(p) is not int or not 0 <= p <= len(prev):
                    raise _error("MST entry prefix is not an int within the previous key", "bad_mst_node", did)
                prev = prev[:p] + entry["k"]  # TypeError unless k is bytes
                if len(prev) > max_key:
                    raise _error(f"MST key {prev[:80]!r}... is longer than any collection/rkey", "bad_mst_key", did)
                add_key(prev)
                add_cid(entry["v"])
                right = entry["t"]
                if right is not None:
                    visit(right, depth + 1)
        except (KeyError, TypeError) as exc:
            raise _error(f"MST node {_cid_str(cid)} is malformed: {exc!r}", "bad_mst_node", did) from exc

    visit(root, 0)
    if not keys:
        return {}

    joined = b"\n".join(keys)
    if (
        joined.translate(None, _KEY_CHARS)
        or b"\n\n" in joined
        or b"/\n" in joined
        or joined[-1:] == b"/"
    ):
        raise _error(f"MST key {_first_bad_key(keys)!r} is not collection/rkey", "bad_mst_key", did)
    del joined
    if not all(map(bytes.__lt__, keys, keys[1:] + [b"\xff"])):
        bad = next(b for a, b in zip(keys, keys[1:]) if not a < b)
        raise _error(f"MST keys out of order at {bad[:80]!r}", "mst_unsorted", did)
    if set(map(type, cids)) != {bytes} or set(map(len, cids)) != {36}:
        raise _error("MST entry value is not a CID", "bad_mst_node", did)
    heads = b"".join(cids)
    if any(heads[i::36] != DAG_CBOR_CID_PREFIX[i : i + 1] * len(cids) for i in range(4)):
        raise _error("MST entry value is not a DAG-CBOR sha2-256 CID", "bad_mst_node", did)
    del heads
    if not all(map(blocks.__contains__, cids)):
        gone = next(k for k, c in zip(keys, cids) if c not in blocks)
        raise _error(f"record block for {gone[:80]!r} is missing from the CAR", "missing_block", did)
    # Identical records share a block, so n keys may name one block: materializing them costs
    # n times its size. Honest repos share little; a 1 MB body named by 25,000 entries (a 2 MB
    # CAR) would be 25 GB of JSON and rows.
    # (summing block sizes touches every block: only done when some block is shared)
    if len(set(cids)) != len(cids):
        named = sum(map(len, map(blocks.__getitem__, cids)))
        if named > _MAX_SHARING * sum(map(len, blocks.values())) + _SHARING_SLACK:
            raise _error(f"MST entries name {named} bytes of records, far more than the CAR holds",
                         "record_amplification", did)
    cid_strs = list(map(libipld.encode_cid, cids))
    del cids

    # Sorted keys put each collection in one contiguous run: [coll + "/", coll + "0").
    # Splitting run by run keeps one str per collection instead of one per record.
    records: dict[tuple[str, str], str] = {}
    lo, n = 0, len(keys)
    while lo < n:
        first = keys[lo]
        slash = first.find(b"/")
        coll = first[:slash]
        collection = coll.decode("ascii")
        if slash < 0 or not is_nsid(collection):
            raise _error(f"MST key {first[:80]!r} is not collection/rkey", "bad_mst_key", did)
        hi = bisect_left(keys, coll + b"0", lo)
        run = b"\n".join(keys[lo:hi])[slash + 1 :].replace(b"\n" + coll + b"/", b"\n")
        rkeys = run.decode("ascii").split("\n")
        if (
            len(rkeys) != hi - lo
            or b"/" in run
            or max(map(len, rkeys)) > 512
            or rkeys.count(".")
            or rkeys.count("..")
        ):
            raise _error(f"MST key under {collection[:80]!r} has an invalid record key", "bad_mst_key", did)
        records.update(zip(zip(repeat(collection, hi - lo), rkeys), cid_strs[lo:hi]))
        lo = hi
    return records


def _first_bad_key(keys: list[bytes]) -> bytes:
    return next((k for k in keys if not _KEY.fullmatch(k)), keys[0])[:80]


def materialize(snapshot: RepoSnapshot, keys: list[tuple[str, str]]) -> RecordColumns:
    """Decode the records at `keys` (which must be in `snapshot.records`) into storage columns.

    Each record block is hashed against its CID first (RepoError bad_block_hash /
    missing_block). A record whose bytes verify but are not a DAG-CBOR map is kept with
    record=None, so one odd record does not fail the whole repo.
    """
    out = RecordColumns.empty()
    blocks = snapshot.blocks
    did = snapshot.did
    records = snapshot.records
    for collection, rkey in keys:
        cid = records[(collection, rkey)]
        # the snapshot wrote these strings itself: base32 multibase of the binary CID
        block = _verified(blocks, libipld.decode_multibase(cid)[1], did, f"record {collection}/{rkey}")
        try:
            text, created_at = record_json(block)
        except (InputError, orjson.JSONEncodeError) as exc:
            # orjson refuses nesting deeper than 255 levels (a TypeError that record_json lets out)
            kind = exc.kind if isinstance(exc, InputError) else "record_too_deep"
            log.warning(
                "undecodable record kept without body",
                extra={"ctx": {"did": did, "path": f"{collection}/{rkey}", "cid": cid, "error": kind}},
            )
            text, created_at = None, None
        out.collection.append(collection)
        out.rkey.append(rkey)
        out.cid.append(cid)
        out.record.append(text)
        out.created_at.append(created_at)
    return out
