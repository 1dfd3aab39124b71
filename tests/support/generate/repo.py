"""Signed atproto repos: commit v3 signing, CAR v1 writing, whole-repo generation.

`iter_repo_car` streams a repo of any size: pass 1 draws the records and keeps only
(key, cid); the MST is bulk-built and the commit signed; pass 2 redraws the same records
(same sub-seed) and writes their blocks. Memory: the MST plus one (key, CID) pair per record.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Iterator
from typing import Final

import cbrrr
import coincurve

from skyfill.protocol.car import encode_varint

from .identity import fake_did
from .mst import Tree, cid_for
from .records import PROFILE_KEY, RecordMaker, tid

__all__ = [
    "sign_commit",
    "car_header",
    "car_block",
    "write_car",
    "iter_repo_car",
    "generate_repo",
    "as_rng",
    "as_key",
    "REPO_EPOCH_MICROS",
]

# Repo records are dated from here on (2023-06-01T00:00:00Z); the firehose starts later.
REPO_EPOCH_MICROS: Final = 1_685_577_600_000_000
_HALF_ORDER: Final = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141 // 2
_CHUNK: Final = 1 << 20


def as_rng(rng_or_seed: random.Random | int) -> random.Random:
    return rng_or_seed if isinstance(rng_or_seed, random.Random) else random.Random(rng_or_seed)


def as_key(key: coincurve.PrivateKey | bytes) -> coincurve.PrivateKey:
    return key if isinstance(key, coincurve.PrivateKey) else coincurve.PrivateKey(key)


def sign_commit(
    key: coincurve.PrivateKey, *, did: str, data: bytes, rev: str
) -> tuple[bytes, bytes]:
    """(cid, block) of a signed v3 commit. `sig` is compact r||s (64 bytes), low-S, over
    sha256(dag-cbor(commit without sig))."""
    unsigned = {"data": cbrrr.CID(data), "did": did, "prev": None, "rev": rev, "version": 3}
    digest = hashlib.sha256(cbrrr.encode_dag_cbor(unsigned)).digest()
    sig = key.sign_recoverable(digest, hasher=None)[:64]  # libsecp256k1 always emits low-S
    if int.from_bytes(sig[32:], "big") > _HALF_ORDER:  # pragma: no cover - invariant guard
        raise RuntimeError("libsecp256k1 returned a high-S signature")
    unsigned["sig"] = sig
    block = cbrrr.encode_dag_cbor(unsigned)
    return cid_for(block), block


def car_header(root: bytes) -> bytes:
    header = cbrrr.encode_dag_cbor({"roots": [cbrrr.CID(root)], "version": 1})
    return encode_varint(len(header)) + header


def car_block(cid: bytes, block: bytes) -> bytes:
    return encode_varint(len(cid) + len(block)) + cid + block


def write_car(root: bytes, blocks: Iterable[tuple[bytes, bytes]]) -> bytes:
    parts = [car_header(root)]
    parts.extend(car_block(c, b) for c, b in blocks)
    return b"".join(parts)


def _draw_records(
    seed: int, n_records: int, peers: list[str] | None
) -> Iterator[tuple[bytes, bytes, bytes]]:
    """(key, block, cid) for a repo's records, reproducible from `seed`; keys are unique."""
    rng = random.Random(seed)
    if peers is None:
        peers = [fake_did(rng) for _ in range(500)]
    maker = RecordMaker(rng, peers=peers)
    micros = REPO_EPOCH_MICROS
    # spread records over ~2 years whatever their count
    mean_gap = max(1, (2 * 365 * 86_400_000_000) // max(1, n_records))
    have_profile = False
    for i in range(n_records):
        micros += rng.randrange(1, 2 * mean_gap)
        collection = "app.bsky.actor.profile" if i == 0 and rng.random() < 0.9 else maker.collection()
        if collection == "app.bsky.actor.profile":
            if have_profile:
                collection = "app.bsky.feed.like"
            else:
                have_profile = True
        block, cid = maker.encode(collection, micros)
        if collection == "app.bsky.actor.profile":
            key = PROFILE_KEY
        else:
            key = f"{collection}/{tid(micros, rng.randrange(1024))}".encode()
        yield key, block, cid


def iter_repo_car(
    rng_or_seed: random.Random | int,
    *,
    did: str,
    key: coincurve.PrivateKey | bytes,
    n_records: int,
    peers: list[str] | None = None,
) -> Iterator[bytes]:
    """Stream a signed repo CAR in ~1 MiB chunks: header, commit, MST nodes, record blocks."""
    rng = as_rng(rng_or_seed)
    sub_seed = rng.getrandbits(64)
    items = sorted((k, cid) for k, _, cid in _draw_records(sub_seed, n_records, peers))
    tree = Tree.build(items)
    data, _ = tree.seal()
    last_micros = REPO_EPOCH_MICROS + 2 * 365 * 86_400_000_000 + 86_400_000_000
    commit_cid, commit_block = sign_commit(as_key(key), did=did, data=data, rev=tid(last_micros, 0))
    buf = [car_header(commit_cid), car_block(commit_cid, commit_block)]
    size = 0
    for cid, block in tree.blocks():
        part = car_block(cid, block)
        buf.append(part)
        size += len(part)
        if size >= _CHUNK:
            yield b"".join(buf)
            buf, size = [], 0
    for _, block, cid in _draw_records(sub_seed, n_records, peers):
        part = car_block(cid, block)
        buf.append(part)
        size += len(part)
        if size >= _CHUNK:
            yield b"".join(buf)
            buf, size = [], 0
    if buf:
        yield b"".join(buf)


def generate_repo(
    rng_or_seed: random.Random | int,
    *,
    did: str,
    key: coincurve.PrivateKey | bytes,
    n_records: int,
    peers: list[str] | None = None,
) -> bytes:
    """A whole signed repo as one CAR v1 (root = the signed commit)."""
    return b"".join(iter_repo_car(rng_or_seed, did=did, key=key, n_records=n_records, peers=peers))
