"""An in-memory atproto Merkle Search Tree, built in bulk or edited in place.

Keys are `collection/rkey` as bytes, values are binary record CIDs (36 bytes). A key's height is
the number of leading zero bits of sha256(key), halved (fanout 4). Nodes are mutable; every edit
clears the cached CID of each node on the edited path (an edited node's parent is always edited
too), so `seal()` re-encodes exactly the nodes that are new since the last seal. Those are the
"changed MST nodes" a `#commit` frame carries; with `search_path()` of each deleted key they are
exactly what a consumer needs to invert the ops (sync 1.1): undoing a create merges the split
seam (all new nodes), undoing a delete re-splits along the key, possibly through old nodes.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Final

__all__ = ["Tree", "key_height", "cid_for", "DAG_CBOR_PREFIX", "RAW_PREFIX"]

DAG_CBOR_PREFIX: Final = b"\x01\x71\x12\x20"
RAW_PREFIX: Final = b"\x01\x55\x12\x20"

_sha256 = hashlib.sha256


def cid_for(block: bytes) -> bytes:
    """Binary CIDv1 (dag-cbor, sha2-256) of a block."""
    return DAG_CBOR_PREFIX + _sha256(block).digest()


def key_height(key: bytes) -> int:
    return (256 - int.from_bytes(_sha256(key).digest(), "big").bit_length()) // 2


class _Node:
    __slots__ = ("height", "keys", "vals", "subs", "cid", "block")

    def __init__(
        self, height: int, keys: list[bytes], vals: list[bytes], subs: list[_Node | None]
    ) -> None:
        self.height = height
        self.keys = keys
        self.vals = vals
        self.subs = subs  # len(keys) + 1; subs[0] is `l`, subs[i + 1] is entry i's `t`
        self.cid: bytes | None = None
        self.block: bytes | None = None

    def empty(self) -> bool:
        return not self.keys and self.subs[0] is None

    def encode(self) -> bytes:
        # Hand-rolled canonical DAG-CBOR of {"e": [{"k","p","t","v"}...], "l": link|null}
        # (one-letter keys, so canonical order is alphabetical); checked against cbrrr in tests.
        subs = self.subs
        keys = self.keys
        parts = [b"\xa2\x61e", _array_header(len(keys))]
        prev = b""
        for i, key in enumerate(keys):
            kp = _KP_CACHE.get((prev, key))
            if kp is None:
                kp = _kp(prev, key)
            sub = subs[i + 1]
            parts.append(
                kp
                + (b"\x61t\xf6" if sub is None else b"\x61t" + _LINK + sub.cid)  # type: ignore[operator]
                + b"\x61v"
                + _LINK
                + self.vals[i]
            )
            prev = key
        left = subs[0]
        parts.append(b"\x61l\xf6" if left is None else b"\x61l" + _LINK + left.cid)  # type: ignore[operator]
        return b"".join(parts)


# tag 42, byte string of 37 bytes, the 0x00 multibase-identity prefix; then the 36-byte CID
_LINK: Final = b"\xd8\x2a\x58\x25\x00"


_KP_CACHE: dict[tuple[bytes, bytes], bytes] = {}


def _kp(prev: bytes, key: bytes) -> bytes:
    """The `{k, p` head of an entry; it depends only on the key and the one before it."""
    p = _shared_prefix(prev, key)
    suffix = key[p:]
    kp = b"\xa4\x61k" + _bytes_header(len(suffix)) + suffix + b"\x61p" + _uint(p)
    if len(_KP_CACHE) >= 1_000_000:  # a speed cache only: clearing it never changes output
        _KP_CACHE.clear()
    _KP_CACHE[(prev, key)] = kp
    return kp


def _array_header(n: int) -> bytes:
    if n < 24:
        return bytes((0x80 + n,))
    if n < 256:
        return bytes((0x98, n))
    return b"\x99" + n.to_bytes(2, "big")


def _uint(n: int) -> bytes:
    if n < 24:
        return bytes((n,))
    if n < 256:
        return bytes((0x18, n))
    return b"\x19" + n.to_bytes(2, "big")


def _bytes_header(n: int) -> bytes:
    if n < 24:
        return bytes((0x40 + n,))
    if n < 256:
        return bytes((0x58, n))
    return b"\x59" + n.to_bytes(2, "big")


def _shared_prefix(a: bytes, b: bytes) -> int:
    """Length of the common prefix, by binary search over slice equality (C-speed compares)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _opt(node: _Node) -> _Node | None:
    return None if node.empty() else node


def _split(node: _Node | None, key: bytes) -> tuple[_Node | None, _Node | None]:
    if node is None:
        return None, None
    i = bisect_left(node.keys, key)
    lsub, rsub = _split(node.subs[i], key)
    left = _Node(node.height, node.keys[:i], node.vals[:i], node.subs[:i] + [lsub])
    right = _Node(node.height, node.keys[i:], node.vals[i:], [rsub] + node.subs[i + 1 :])
    return _opt(left), _opt(right)


def _merge(a: _Node | None, b: _Node | None) -> _Node | None:
    if a is None:
        return b
    if b is None:
        return a
    return _Node(
        a.height,
        a.keys + b.keys,
        a.vals + b.vals,
        a.subs[:-1] + [_merge(a.subs[-1], b.subs[0])] + b.subs[1:],
    )


def _put(node: _Node, key: bytes, val: bytes, kh: int) -> None:
    node.cid = None
    i = bisect_left(node.keys, key)
    if kh < node.height:
        child = node.subs[i]
        if child is None:
            child = node.subs[i] = _Node(node.height - 1, [], [], [None])
        _put(child, key, val, kh)
        return
    if i < len(node.keys) and node.keys[i] == key:
        node.vals[i] = val
        return
    lsub, rsub = _split(node.subs[i], key)
    node.keys.insert(i, key)
    node.vals.insert(i, val)
    node.subs[i : i + 1] = [lsub, rsub]


def _delete(node: _Node, key: bytes, kh: int) -> tuple[bool, _Node | None]:
    i = bisect_left(node.keys, key)
    if kh < node.height:
        child = node.subs[i]
        if child is None:
            return False, node
        removed, new_child = _delete(child, key, kh)
        if not removed:
            return False, node
        node.subs[i] = new_child
        node.cid = None
        return True, _opt(node)
    if i == len(node.keys) or node.keys[i] != key:
        return False, node
    del node.keys[i]
    del node.vals[i]
    node.subs[i : i + 2] = [_merge(node.subs[i], node.subs[i + 1])]
    node.cid = None
    return True, _opt(node)


def _build(
    keys: Sequence[bytes], vals: Sequence[bytes], heights: Sequence[int], lo: int, hi: int, h: int
) -> _Node | None:
    if lo >= hi:
        return None
    nkeys: list[bytes] = []
    nvals: list[bytes] = []
    subs: list[_Node | None] = []
    start = lo
    for j in range(lo, hi):
        if heights[j] == h:
            subs.append(_build(keys, vals, heights, start, j, h - 1) if h else None)
            nkeys.append(keys[j])
            nvals.append(vals[j])
            start = j + 1
    subs.append(_build(keys, vals, heights, start, hi, h - 1) if h else None)
    return _Node(h, nkeys, nvals, subs)


class Tree:
    """One repo's MST. Not thread-safe; one writer."""

    __slots__ = ("_root",)

    def __init__(self) -> None:
        self._root = _Node(0, [], [], [None])

    @classmethod
    def build(cls, items: Sequence[tuple[bytes, bytes]]) -> Tree:
        """Bulk-build from (key, cid) pairs sorted by key with no duplicates: O(n x height)."""
        tree = cls()
        if items:
            keys = [k for k, _ in items]
            vals = [v for _, v in items]
            heights = [key_height(k) for k in keys]
            root = _build(keys, vals, heights, 0, len(keys), max(heights))
            assert root is not None
            tree._root = root
        return tree

    def put(self, key: bytes, val: bytes) -> None:
        kh = key_height(key)
        root = self._root
        if root.empty():
            self._root = _Node(kh, [key], [val], [None, None])
            return
        while kh > root.height:
            root = _Node(root.height + 1, [], [], [root])
        self._root = root
        _put(root, key, val, kh)

    def delete(self, key: bytes) -> bool:
        root = self._root
        kh = key_height(key)
        if kh > root.height:
            return False
        removed, new_root = _delete(root, key, kh)
        if not removed:
            return False
        while new_root is not None and not new_root.keys and new_root.subs[0] is not None:
            new_root = new_root.subs[0]
        self._root = new_root if new_root is not None else _Node(0, [], [], [None])
        return True

    def seal(self) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """Encode every node edited since the last seal: (root cid, [(cid, block)] children first)."""
        out: list[tuple[bytes, bytes]] = []
        stack: list[tuple[_Node, bool]] = [(self._root, False)]
        while stack:
            node, children_done = stack.pop()
            if node.cid is not None:
                continue
            if not children_done:
                stack.append((node, True))
                stack.extend((s, False) for s in node.subs if s is not None and s.cid is None)
                continue
            block = node.encode()
            node.block = block
            node.cid = cid = DAG_CBOR_PREFIX + _sha256(block).digest()
            out.append((cid, block))
        root_cid = self._root.cid
        assert root_cid is not None
        return root_cid, out

    def search_path(self, key: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Sealed nodes from the root down along `key`'s position, to the key or the bottom.

        For a key that is absent these are the nodes re-inserting it would split: a `#commit`
        must carry them for each delete, since a delete's merge can leave old nodes in place.
        """
        node = self._root
        while node is not None:
            if node.cid is None or node.block is None:
                raise RuntimeError("tree has unsealed edits; call seal() first")
            yield node.cid, node.block
            i = bisect_left(node.keys, key)
            if i < len(node.keys) and node.keys[i] == key:
                return
            node = node.subs[i]

    def blocks(self) -> Iterator[tuple[bytes, bytes]]:
        """Every node of the sealed tree as (cid, block), root first."""
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.cid is None or node.block is None:
                raise RuntimeError("tree has unsealed edits; call seal() first")
            yield node.cid, node.block
            stack.extend(s for s in node.subs if s is not None)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """(key, cid) in key order."""

        def walk(node: _Node | None) -> Iterator[tuple[bytes, bytes]]:
            if node is None:
                return
            for i, key in enumerate(node.keys):
                yield from walk(node.subs[i])
                yield key, node.vals[i]
            yield from walk(node.subs[-1])

        return walk(self._root)
