"""Sync 1.1 commit proofs: undo a commit's ops on the partial MST its frame carries.

A `#commit` carries the signed commit, the MST nodes the commit changed, and the nodes a
consumer needs to put deleted keys back. Starting from the new root (the signed `data`), each op
is undone: create -> remove the key (it must hold op.cid), update -> put op.prev back (the key
must hold op.cid), delete -> re-insert op.prev (the key must be absent). The root CID of the
result must equal the commit's `prevData`: then the ops are exactly the difference between the
two signed trees, and a consumer that applies them holds what the PDS holds.

Tree shape (atproto MST, fanout 4): a key's height is the number of leading zero bits of
sha256(key), halved. A node holds keys of one height, sorted, with a subtree (one level lower)
before, between and after them: `l` is the leftmost, each entry's `t` the one after it. Levels
are never skipped: a subtree two levels down hangs under an entry-less node holding only `l`.
The root is the highest node with entries (entry-less tops are trimmed); the empty tree is
one node `{"e": [], "l": null}`.

Worked example (undoing a create): keys a(h0) b(h1) c(h0); root [b] with l=[a], t=[c].
The commit created b, so undo = remove b: its two neighbours [a] and [c] merge into [a c],
which becomes the root (a root without entries is trimmed). Both neighbours must be in the
frame's blocks; a node the undo never opens may be absent (only its CID is needed).

Nodes read from the frame are hashed and must match the CID that names them; a node not
modified keeps that CID; a node rebuilt is encoded as canonical DAG-CBOR (one-letter map keys,
so canonical order is alphabetical; keys prefix-compressed against the previous entry).
Every failure raises RepoError(kind="bad_inversion") with the reason.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from typing import Final, Union

import libipld

from skyfill.errors import RepoError

from .car import DAG_CBOR_CID_PREFIX

__all__ = ["invert_commit", "PartialTree", "key_height", "encode_node", "EMPTY_NODE", "EMPTY_TREE"]

_sha256: Final = hashlib.sha256
_decode: Final = libipld.decode_dag_cbor
_encode: Final = libipld.encode_dag_cbor
EMPTY_NODE: Final = b"\xa2\x61e\x80\x61l\xf6"   # {"e": [], "l": null}
EMPTY_TREE: Final = DAG_CBOR_CID_PREFIX + _sha256(EMPTY_NODE).digest()   # the root CID of an empty repo
KIND: Final = "bad_inversion"
# What an MST key (`collection/rkey`) may hold; a key suffix outside it cannot be a key, nor a CID.
_KEY_BYTES: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_:~/"


def key_height(key: bytes) -> int:
    """Height of an MST key: leading zero bits of sha256(key) // 2."""
    return (256 - int.from_bytes(_sha256(key).digest(), "big").bit_length()) // 2


class _Node:
    __slots__ = ("height", "keys", "vals", "subs", "cid")

    def __init__(self, height: int, keys: list[bytes], vals: list[bytes], subs: list[_Ref]) -> None:
        self.height = height
        self.keys = keys
        self.vals = vals
        self.subs = subs      # len(keys) + 1: subs[0] is `l`, subs[i + 1] is entry i's `t`
        self.cid: bytes | None = None   # None while modified (encode to learn it)


# A subtree reference: absent, a CID not opened yet, or an opened node.
_Ref = Union[_Node, bytes, None]


def _bad(message: str) -> RepoError:
    return RepoError(message, kind=KIND)


# -- encoding -------------------------------------------------------------------------------------


def encode_node(keys: list[bytes], vals: list[bytes], subs: list[bytes | None]) -> bytes:
    """Canonical DAG-CBOR of an MST node; `subs` are child CIDs (len(keys) + 1, subs[0] = `l`).

    libipld encodes a bytes value that parses as a whole CID as a link (tag 42): `v`, `t`
    and `l` are CIDs, and `k` never is (keys are checked to be printable ASCII when read)."""
    entries = []
    append = entries.append
    prev = b""
    for i, key in enumerate(keys):
        # shared prefix length in O(1) Python steps: the first differing bit of the two prefixes
        n = min(len(prev), len(key))
        diff = int.from_bytes(prev[:n], "big") ^ int.from_bytes(key[:n], "big")
        p = n - (diff.bit_length() + 7) // 8
        append({"k": key[p:], "p": p, "t": subs[i + 1], "v": vals[i]})
        prev = key
    return _encode({"e": entries, "l": subs[0]})


# -- the partial tree -----------------------------------------------------------------------------


class PartialTree:
    """The MST under `root`, opened lazily from `blocks` ({cid bytes: block bytes}).

    `remove` and `insert` open only the nodes on their path (and, for a merge or a split, the
    seam below it); opening a node absent from `blocks` raises RepoError: the proof is short.
    """

    __slots__ = ("_blocks", "_root")

    def __init__(self, root: bytes, blocks: Mapping[bytes, bytes]) -> None:
        self._blocks = blocks
        self._root = self._open(root, None)

    # -- reading ----------------------------------------------------------------------------

    def _open(self, cid: bytes, height: int | None) -> _Node:
        block = self._blocks.get(cid)
        if block is None:
            raise _bad(f"the proof lacks MST node {libipld.encode_cid(cid)}")
        if cid[:4] != DAG_CBOR_CID_PREFIX or len(cid) != 36 or _sha256(block).digest() != cid[4:]:
            raise _bad(f"MST node {libipld.encode_cid(cid)} does not hash to its CID")
        try:
            node = _decode(block)
        except ValueError as exc:
            raise _bad(f"MST node is not DAG-CBOR: {exc}") from None
        if type(node) is not dict or len(node) != 2:
            raise _bad("MST node is not a {e, l} map")
        entries = node.get("e")
        left = node.get("l")
        if type(entries) is not list or (left is not None and type(left) is not bytes):
            raise _bad("MST node is not a {e, l} map")
        keys: list[bytes] = []
        vals: list[bytes] = []
        subs: list[_Ref] = [left]
        prev = b""
        # Hot (every node of every verified commit): one pass, the type checks folded into the
        # operations that would fail on a wrong type (a slice index, a bytes concatenation).
        try:
            for e in entries:
                p = e["p"]
                k = e["k"]
                t = e["t"]
                v = e["v"]
                if p > len(prev) or type(p) is not int or type(v) is not bytes or k.translate(None, _KEY_BYTES):
                    raise _bad("MST entry with a bad prefix length, value or key bytes")
                if t is not None and type(t) is not bytes:
                    raise _bad("MST entry whose subtree is not a CID")
                key = prev[:p] + k
                if key <= prev:
                    raise _bad("MST node keys are not sorted")
                keys.append(key)
                vals.append(v)
                subs.append(t)
                prev = key
        except (KeyError, TypeError, AttributeError):
            raise _bad("MST entry is not a {k, p, t, v} map of the right types") from None
        if keys:
            h = key_height(keys[0])
            if height is not None and h != height:
                raise _bad(f"MST key at height {h} found at height {height}")
        elif left is None:
            if height is not None:
                raise _bad("empty MST node below the root")
            h = 0
        elif height is None:  # an untrimmed root: its height is one above its only child's
            h = self._open(left, None).height + 1
        else:
            h = height
        out = _Node(h, keys, vals, subs)
        out.cid = cid
        return out

    def _get(self, ref: _Ref, height: int) -> _Node | None:
        if ref is None or type(ref) is _Node:
            return ref
        return self._open(ref, height)  # type: ignore[arg-type]

    def _child(self, node: _Node, i: int) -> _Node | None:
        ref = node.subs[i]
        if ref is None or type(ref) is _Node:
            return ref
        child = self._open(ref, node.height - 1)  # type: ignore[arg-type]
        node.subs[i] = child
        return child

    def get(self, key: bytes) -> bytes | None:
        """The value of `key`, or None."""
        kh = key_height(key)
        node: _Node | None = self._root
        while node is not None and node.height >= kh:
            i = bisect_left(node.keys, key)
            if node.height == kh:
                return node.vals[i] if i < len(node.keys) and node.keys[i] == key else None
            node = self._child(node, i)
        return None

    # -- editing ----------------------------------------------------------------------------

    def remove(self, key: bytes) -> bytes | None:
        """Remove `key`; returns its value, or None when it was absent (nothing changed)."""
        root = self._root
        kh = key_height(key)
        if kh > root.height or (not root.keys and root.subs[0] is None):
            return None
        value = self._remove(root, key, kh)
        if value is not None:
            while not root.keys and root.subs[0] is not None:  # trim entry-less tops
                root = self._child(root, 0)  # type: ignore[assignment]
            self._root = root
        return value

    def _remove(self, node: _Node, key: bytes, kh: int) -> bytes | None:
        keys = node.keys
        i = bisect_left(keys, key)
        if node.height == kh:
            if i == len(keys) or keys[i] != key:
                return None
            value = node.vals[i]
            merged = self._merge(node.subs[i], node.subs[i + 1], kh - 1)
            del keys[i], node.vals[i]
            node.subs[i : i + 2] = [merged]
            node.cid = None
            return value
        child = self._child(node, i)
        if child is None:
            return None
        value = self._remove(child, key, kh)
        if value is not None:
            node.cid = None
            if not child.keys and child.subs[0] is None:
                node.subs[i] = None
        return value

    def _merge(self, a: _Ref, b: _Ref, height: int) -> _Ref:
        """Join two neighbouring subtrees (every key of `a` < every key of `b`)."""
        if a is None:
            return b
        if b is None:
            return a
        left = self._get(a, height)
        right = self._get(b, height)
        assert left is not None and right is not None
        seam = self._merge(left.subs[-1], right.subs[0], height - 1)
        return _Node(height, left.keys + right.keys, left.vals + right.vals,
                     left.subs[:-1] + [seam] + right.subs[1:])

    def insert(self, key: bytes, value: bytes) -> bytes | None:
        """Set `key` to `value`; returns the value it replaced, or None when it was absent."""
        root = self._root
        kh = key_height(key)
        if not root.keys and root.subs[0] is None:
            self._root = _Node(kh, [key], [value], [None, None])
            return None
        if kh > root.height:
            below: _Ref = root
            for h in range(root.height + 1, kh):  # entry-less levels between the old root and kh
                below = _Node(h, [], [], [below])
            left, right = self._split(below, key, kh - 1)
            self._root = _Node(kh, [key], [value], [left, right])
            return None
        return self._insert(root, key, kh, value)

    def _insert(self, node: _Node, key: bytes, kh: int, value: bytes) -> bytes | None:
        keys = node.keys
        i = bisect_left(keys, key)
        node.cid = None
        if node.height == kh:
            if i < len(keys) and keys[i] == key:
                old = node.vals[i]
                node.vals[i] = value
                return old
            left, right = self._split(node.subs[i], key, kh - 1)
            keys.insert(i, key)
            node.vals.insert(i, value)
            node.subs[i : i + 1] = [left, right]
            return None
        child = self._child(node, i)
        if child is None:
            new: _Node = _Node(kh, [key], [value], [None, None])
            for h in range(kh + 1, node.height):
                new = _Node(h, [], [], [new])
            node.subs[i] = new
            return None
        return self._insert(child, key, kh, value)

    def _split(self, ref: _Ref, key: bytes, height: int) -> tuple[_Ref, _Ref]:
        """The keys of a subtree below and above `key` (which it does not hold), as two subtrees."""
        node = self._get(ref, height)
        if node is None:
            return None, None
        i = bisect_left(node.keys, key)
        low, high = self._split(node.subs[i], key, height - 1)
        keys, vals, subs = node.keys, node.vals, node.subs
        left = _Node(height, keys[:i], vals[:i], subs[:i] + [low])
        right = _Node(height, keys[i:], vals[i:], [high] + subs[i + 1 :])
        return (None if i == 0 and low is None else left), (None if i == len(keys) and high is None else right)

    # -- hashing ----------------------------------------------------------------------------

    def root_cid(self) -> bytes:
        """The root's CID, encoding every modified node (children first)."""
        root = self._root
        if not root.keys and root.subs[0] is None:
            return EMPTY_TREE
        return _cid_of(root)


def _cid_of(node: _Node) -> bytes:
    cid = node.cid
    if cid is not None:
        return cid
    subs = [s if s is None or type(s) is bytes else _cid_of(s) for s in node.subs]  # type: ignore[arg-type]
    cid = DAG_CBOR_CID_PREFIX + _sha256(encode_node(node.keys, node.vals, subs)).digest()
    node.cid = cid
    return cid


def invert_commit(
    data: bytes,
    prev_data: bytes,
    ops: Iterable[tuple[str, str, bytes | None, bytes | None]],
    blocks: Mapping[bytes, bytes],
) -> None:
    """Check a commit's proof: undoing `ops` ((action, path, cid, prev), CIDs binary) on the
    tree under `data` must give the tree under `prev_data`. Raises RepoError(kind="bad_inversion")."""
    tree = PartialTree(data, blocks)
    seen: set[str] = set()
    for action, path, cid, prev in ops:
        if path in seen:
            raise _bad(f"two ops on {path}")
        seen.add(path)
        key = path.encode()
        if action == "create":
            if cid is None:
                raise _bad(f"create {path} has no CID")
            old = tree.remove(key)
            if old != cid:
                raise _bad(f"create {path}: the new tree holds {_name(old)}, not {_name(cid)}")
        elif action == "update" or action == "delete":
            if prev is None:
                raise _bad(f"{action} {path} has no prev CID: it cannot be undone")
            if action == "update" and cid is None:
                raise _bad(f"update {path} has no CID")
            old = tree.insert(key, prev)
            if old != cid:  # a delete's cid is None: the key must be absent from the new tree
                raise _bad(f"{action} {path}: the new tree holds {_name(old)}, not {_name(cid)}")
        else:
            raise _bad(f"unknown op action {action!r}")
    got = tree.root_cid()
    if got != prev_data:
        raise _bad(f"undoing the ops gives root {_name(got)}, not prevData {_name(prev_data)}")


def _name(cid: bytes | None) -> str:
    if cid is None:
        return "nothing"
    try:
        return libipld.encode_cid(cid)
    except ValueError:
        return cid.hex()
