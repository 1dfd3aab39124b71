"""Structure-aware fuzzing of the firehose frame parser and of the daemon behind it.

Seeds are real frames: the derived firehose vectors (re-encoded relay captures) and frames of a
generated network (tests.support.generate.World: signed commits, intact chains). Each input is one seed
changed by one mutation that knows the frame's structure: a CID replaced by garbage, a field of
the wrong type, deep CBOR nesting (in the frame, a record block, the commit block, the CAR
header), truncation, bit flips, a block tampered under its CID, a block keyed by non-CID bytes,
a seq outside a BIGINT, duplicate map keys, an oversize frame, ...

`run(n, seed)` asserts the parser's contract on every input: it returns an event or raises
FrameError with a known kind, nothing else, within a bounded time and memory. Then it checks
the daemon: a real Daemon fed valid frames mixed with mutants that the parser rejects must end
with the same DuckDB mirror as a daemon fed only the valid frames.

    python -m tests.fuzz.frames 5000 1          # n inputs, seed
    python -m tests.fuzz.frames --write-corpus  # regenerate tests/fuzz/corpus/frames/
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import random
import resource
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Final

import duckdb
import libipld
import orjson

from tests.support.generate.firehose import World
from skyfill.protocol.events import Account, Commit, Identity, Info, StreamError, Sync
from skyfill.protocol.frames import FRAME_ERROR_KINDS, MAX_FRAME_SIZE, parse_frame
from skyfill.protocol.car import read_car
from skyfill.errors import FrameError
from skyfill.protocol.syntax import is_did
from tests.support.relay import LocalRelay
from tests.support.mirror import consume_until
from tests.support.wire import encode_frame, varint

__all__ = ["run", "run_daemon_check", "mutants", "write_corpus", "CORPUS", "MUTATORS", "check_input"]

ROOT: Final = Path(__file__).resolve().parent.parent
FIREHOSE: Final = ROOT / "vectors" / "derived" / "firehose"
CORPUS: Final = Path(__file__).resolve().parent / "corpus" / "frames"

CID_PREFIX: Final = b"\x01\x71\x12\x20"
SEQ_LIMIT: Final = 2**63
# A hang guard, not a speed check: the slowest honest input (an oversize frame) takes ~50 ms.
HANG_SECONDS: Final = 20.0
# Peak RSS may grow by at most this much over a whole run (the biggest input is ~5 MB).
RSS_BOUND_MB: Final = 512


# -- seeds -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seed:
    name: str
    raw: bytes
    header: dict[str, Any]
    body: dict[str, Any]


@cache
def seeds(generated: int = 120) -> tuple[Seed, ...]:
    """The derived vectors plus `generated` frames of a small generated network (deterministic)."""
    raws = [(p.name, p.read_bytes()) for p in sorted(FIREHOSE.glob("*.frame"))]
    raws += [(f"world-{i}", f) for i, f in enumerate(World(5, n_dids=12, retain_blocks=False).frames(generated))]
    out = []
    for name, raw in raws:
        header, body = libipld.decode_dag_cbor_multi(raw)
        out.append(Seed(name, raw, header, body))
    return tuple(out)


# -- encoding helpers --------------------------------------------------------------------------


frame = encode_frame


def car(roots: list[bytes], blocks: list[tuple[bytes, bytes]], *, header: bytes | None = None) -> bytes:
    head = header if header is not None else libipld.encode_dag_cbor({"version": 1, "roots": roots})
    parts = [varint(len(head)), head]
    for cid, data in blocks:
        parts += [varint(len(cid) + len(data)), cid, data]
    return b"".join(parts)


def cid_of(block: bytes) -> bytes:
    return CID_PREFIX + hashlib.sha256(block).digest()


def _head(major: int, n: int) -> bytes:
    """A CBOR item head (major type, argument), shortest form."""
    if n < 24:
        return bytes([major << 5 | n])
    for extra, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | extra]) + n.to_bytes(size, "big")
    raise ValueError(n)


def raw_map(items: list[tuple[str, bytes]], *, sort: bool = True) -> bytes:
    """A CBOR map from already-encoded values (so a value may be something libipld cannot encode)."""
    if sort:
        items = sorted(items, key=lambda kv: (len(kv[0].encode()), kv[0].encode()))
    return _head(5, len(items)) + b"".join(libipld.encode_dag_cbor(k) + v for k, v in items)


def body_with(body: dict[str, Any], field: str, encoded: bytes) -> bytes:
    """The body re-encoded with `field` set to the raw CBOR `encoded`."""
    items = [(k, libipld.encode_dag_cbor(v)) for k, v in body.items() if k != field]
    return raw_map(items + [(field, encoded)])


def nested(depth: int, kind: str = "list") -> bytes:
    return (b"\x81" if kind == "list" else b"\xa1\x61a") * depth + b"\x00"


def deep_record(depth: int) -> bytes:
    """A profile record whose field `x` nests `depth` arrays (keys in DAG-CBOR order: shorter first)."""
    return b"\xa2\x61x" + nested(depth) + b"\x65$type\x76app.bsky.actor.profile"


# -- mutations ---------------------------------------------------------------------------------
# Each takes (rng, seed) and returns the mutated frame bytes.

Mutator = Callable[[random.Random, Seed], bytes]


def _junk(rng: random.Random) -> Any:
    choices: list[Callable[[], Any]] = [
        lambda: None, lambda: True, lambda: False, lambda: 0, lambda: -1, lambda: SEQ_LIMIT,
        lambda: 2**64 - 1, lambda: -(2**63), lambda: 1.5, lambda: -0.0, lambda: "", lambda: "x" * rng.randint(1, 3000),
        lambda: rng.randbytes(rng.randint(0, 64)), lambda: [], lambda: {}, lambda: [1, "a", b"b"],
        lambda: {"$link": "bafyrei"}, lambda: {"nested": {"deeper": [None]}}, lambda: "did:plc:" + "a" * 24,
        lambda: "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm", lambda: "3lmxjzlexp22k",
        lambda: "2025-04-16T23:40:33.895Z", lambda: "\x00\ud7ff", lambda: CID_PREFIX + rng.randbytes(32),
    ]
    return rng.choice(choices)()


def _fields(body: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """Every (container, key) of the body and of its ops."""
    out = [(body, k) for k in body]
    ops = body.get("ops")
    if isinstance(ops, list):
        for op in ops:
            if isinstance(op, dict):
                out += [(op, k) for k in op]
    return out


def _encode_or_raw(rng: random.Random, header: dict[str, Any], body: dict[str, Any], seed: Seed) -> bytes:
    try:
        return frame(header, body)
    except (ValueError, TypeError, OverflowError):  # a junk value DAG-CBOR cannot hold (float, huge int)
        return _bit_flips(rng, seed)


def _type_swap(rng: random.Random, seed: Seed) -> bytes:
    body = copy.deepcopy(seed.body)
    fields = _fields(body)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        container, key = rng.choice(fields)
        container[key] = _junk(rng)
    return _encode_or_raw(rng, seed.header, body, seed)


def _drop_field(rng: random.Random, seed: Seed) -> bytes:
    body = copy.deepcopy(seed.body)
    container, key = rng.choice(_fields(body))
    del container[key]
    return frame(seed.header, body)


def _cid_fields(body: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    out = [(body, k) for k in ("commit", "prevData") if k in body]
    for op in body.get("ops") or ():
        if isinstance(op, dict):
            out += [(op, k) for k in ("cid", "prev") if k in op]
    return out


def _bad_cid(rng: random.Random, cid: bytes | None) -> Any:
    real = cid if isinstance(cid, bytes) and len(cid) == 36 else CID_PREFIX + bytes(32)
    return rng.choice([
        rng.randbytes(rng.randint(0, 40)), real[:-1], real + b"\x00", real[1:], b"\x00" + real,
        b"\x01\x55\x12\x20" + real[4:],              # raw codec
        b"\x12\x20" + real[4:],                      # CIDv0
        b"\x01\x71\x13\x40" + bytes(64),             # sha2-512
        b"\x01\x71\x12\x00",                         # empty digest
        b"\x02\x71\x12\x20" + real[4:],              # version 2
        libipld.encode_cid(real), "", 0, [real], {"$link": libipld.encode_cid(real)},
    ])


def _cid_garbage(rng: random.Random, seed: Seed) -> bytes:
    body = copy.deepcopy(seed.body)
    fields = _cid_fields(body)
    if rng.random() < 0.3:
        body["tooBig"] = True
    if not fields:  # identity / account / sync: add a CID-looking field where none is expected
        if seed.header.get("t") == "#sync":
            return _sync_root_garbage(rng, seed)
        body[rng.choice(["commit", "prevData", "data"])] = _bad_cid(rng, None)
        return frame(seed.header, body)
    container, key = rng.choice(fields)
    container[key] = _bad_cid(rng, container[key])
    return frame(seed.header, body)


def _sync_root_garbage(rng: random.Random, seed: Seed) -> bytes:
    body = copy.deepcopy(seed.body)
    roots, blocks = read_car(body["blocks"])
    new_root = _bad_cid(rng, roots[0] if roots else None)
    if not isinstance(new_root, bytes):
        new_root = rng.randbytes(8)
    body["blocks"] = car([new_root], list(blocks.items()))
    return frame(seed.header, body)


def _seed_blocks(seed: Seed) -> tuple[list[bytes], dict[bytes, bytes]] | None:
    raw = seed.body.get("blocks")
    if not isinstance(raw, bytes) or not raw:
        return None
    return read_car(raw)


def _used_cids(seed: Seed, roots: list[bytes]) -> list[bytes]:
    """The CIDs the parser looks up: the commit (or #sync root) and the ops' record CIDs."""
    used = [seed.body["commit"]] if isinstance(seed.body.get("commit"), bytes) else list(roots[:1])
    for op in seed.body.get("ops") or ():
        if isinstance(op, dict) and isinstance(op.get("cid"), bytes):
            used.append(op["cid"])
    return used


def _block_tamper(rng: random.Random, seed: Seed) -> bytes:
    """A block's bytes changed while its CID stays: only the hash check can tell."""
    parsed = _seed_blocks(seed)
    if parsed is None:
        return _type_swap(rng, seed)
    roots, blocks = parsed
    used = [c for c in _used_cids(seed, roots) if c in blocks]
    target = rng.choice(used) if used and rng.random() < 0.85 else rng.choice(list(blocks))
    block = bytearray(blocks[target])
    how = rng.randrange(4)
    if how == 0 and block:
        i = rng.randrange(len(block))
        block[i] ^= 1 << rng.randrange(8)
    elif how == 1:
        block = bytearray(libipld.encode_dag_cbor({**_decoded_or_empty(bytes(block)), "tampered": True}))
    elif how == 2:
        block = block[: rng.randrange(len(block) + 1)]
    else:
        block += b"\x00"
    blocks[target] = bytes(block)
    body = dict(seed.body, blocks=car(roots, list(blocks.items())))
    return frame(seed.header, body)


def _decoded_or_empty(block: bytes) -> dict[str, Any]:
    try:
        value = libipld.decode_dag_cbor(block)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _block_swap(rng: random.Random, seed: Seed) -> bytes:
    """A used block replaced by other valid DAG-CBOR under its own true CID (so the hash holds)."""
    parsed = _seed_blocks(seed)
    if parsed is None:
        return _type_swap(rng, seed)
    roots, blocks = parsed
    used = [c for c in _used_cids(seed, roots) if c in blocks]
    if not used:
        return _type_swap(rng, seed)
    old = rng.choice(used)
    new_block = rng.choice([
        libipld.encode_dag_cbor(_junk(rng) if rng.random() < 0.5 else [1, 2]),
        nested(rng.choice((256, 300, 2000, 100_000)), rng.choice(("list", "map"))),
        deep_record(rng.choice((254, 256, 1000))),
        libipld.encode_dag_cbor({**_decoded_or_empty(blocks[old]), "data": _bad_cid(rng, None)}),
        libipld.encode_dag_cbor({**_decoded_or_empty(blocks[old]), "rev": "3lmxjzlexp22k"}),
        rng.randbytes(rng.randint(1, 50)),
    ])
    new = cid_of(new_block)
    del blocks[old]
    blocks[new] = new_block
    body = copy.deepcopy(seed.body)
    if body.get("commit") == old:
        body["commit"] = new
        roots = [new]
    elif roots and roots[0] == old:
        roots = [new]
    for op in body.get("ops") or ():
        if isinstance(op, dict) and op.get("cid") == old:
            op["cid"] = new
    body["blocks"] = car(roots, list(blocks.items()))
    return frame(seed.header, body)


def _car_structure(rng: random.Random, seed: Seed) -> bytes:
    """The CAR slice broken: keys that are not CIDs, blocks dropped or doubled, a bad header."""
    parsed = _seed_blocks(seed)
    if parsed is None:
        return _type_swap(rng, seed)
    roots, blocks = parsed
    items = list(blocks.items())
    how = rng.randrange(7)
    header: bytes | None = None
    if how == 0 and items:  # a key that is not a CID (the parser splits the CAR by its own rules)
        i = rng.randrange(len(items))
        items[i] = (rng.randbytes(rng.randint(1, 40)), items[i][1])
    elif how == 1 and items:
        del items[rng.randrange(len(items))]
    elif how == 2 and items:
        items.append(rng.choice(items))
    elif how == 3:
        header = nested(rng.choice((300, 2000, 100_000)))
    elif how == 4:
        header = libipld.encode_dag_cbor(_junk(rng))
    elif how == 5:
        items.append((b"\x12\x20" + rng.randbytes(32), rng.randbytes(20)))  # a CIDv0 key
    else:  # a block length beyond the end, or a varint that never ends
        data = car(roots, items) + rng.choice([b"\xff" * 12, b"\x80\x80\x80\x10", varint(1 << 40)])
        return frame(seed.header, dict(seed.body, blocks=data))
    return frame(seed.header, dict(seed.body, blocks=car(roots, items, header=header)))


def _deep_nesting(rng: random.Random, seed: Seed) -> bytes:
    depth = rng.choice((255, 256, 1000, 1500, 2000, 5000, 100_000))
    kind = rng.choice(("list", "map"))
    head = libipld.encode_dag_cbor(seed.header)
    where = rng.randrange(4)
    if where == 0:
        return head + nested(depth, kind)
    if where == 1:
        return nested(depth, kind) + libipld.encode_dag_cbor(seed.body)
    if where == 2:
        field = rng.choice(list(seed.body))
        return head + body_with(seed.body, field, nested(depth, kind))
    return head + body_with(seed.body, "ops", b"\x81" + raw_map([("action", nested(depth, kind))]))


def _truncate(rng: random.Random, seed: Seed) -> bytes:
    return seed.raw[: rng.randrange(len(seed.raw))]


def _bit_flips(rng: random.Random, seed: Seed) -> bytes:
    data = bytearray(seed.raw)
    for _ in range(rng.choice((1, 1, 2, 4, 8, 32))):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


def _byte_edits(rng: random.Random, seed: Seed) -> bytes:
    data = bytearray(seed.raw)
    for _ in range(rng.choice((1, 2, 5))):
        i = rng.randrange(len(data) + 1)
        how = rng.randrange(3)
        if how == 0:
            data[i:i] = rng.randbytes(rng.randint(1, 9))
        elif how == 1:
            del data[i : i + rng.randint(1, 9)]
        else:
            data[i : i + 1] = rng.choice([b"\xff", b"\x9b", b"\x5b", b"\x7b", b"\xbb", b"\xd8\x2a", b"\xf9"])
    return bytes(data)


def _seq(rng: random.Random, seed: Seed) -> bytes:
    body = dict(seed.body, seq=rng.choice([-1, -(2**63), SEQ_LIMIT, SEQ_LIMIT + 1, 2**64 - 1, -(2**64), 0,
                                           SEQ_LIMIT - 1, "1", True, None, b"\x01"]))
    if body["seq"] == -(2**64):  # libipld cannot encode it; CBOR can: major type 1, 2**64 - 1
        return libipld.encode_dag_cbor(seed.header) + body_with(seed.body, "seq", b"\x3b" + b"\xff" * 8)
    return frame(seed.header, body)


def _time(rng: random.Random, seed: Seed) -> bytes:
    body = dict(seed.body, time=rng.choice(["", "now", "2025-04-16", "2025-02-30T00:00:00Z", "x" * 100_000,
                                            "2025-04-16T23:40:33.895", "9999-12-31T23:59:59Z", 1744846833]))
    return frame(seed.header, body)


def _duplicate_keys(rng: random.Random, seed: Seed) -> bytes:
    items = [(k, libipld.encode_dag_cbor(v)) for k, v in seed.body.items()]
    key, value = rng.choice(items)
    other = libipld.encode_dag_cbor(_junk(rng)) if rng.random() < 0.5 else value
    items = sorted(items, key=lambda kv: (len(kv[0].encode()), kv[0].encode()))
    i = next(i for i, (k, _) in enumerate(items) if k == key)
    items.insert(i + 1, (key, other))
    target = rng.randrange(3)
    if target == 0:
        return libipld.encode_dag_cbor(seed.header) + raw_map(items, sort=False)
    if target == 1:  # in the header
        return raw_map([("op", b"\x01"), ("t", libipld.encode_dag_cbor(seed.header.get("t", "#commit"))),
                        ("t", b"\x60")], sort=False) + libipld.encode_dag_cbor(seed.body)
    return libipld.encode_dag_cbor(seed.header) + raw_map(rng.sample(items, len(items)), sort=False)


def _header(rng: random.Random, seed: Seed) -> bytes:
    header = rng.choice([
        {"op": -1}, {"op": 2, "t": "#commit"}, {"op": 1}, {"op": 1, "t": _junk(rng)}, {"t": "#commit"},
        {"op": True, "t": "#commit"}, {"op": 1, "t": rng.choice(["#commit", "#sync", "#identity", "#account", "#info"])},
        [1, "#commit"], {"op": -1, "t": "#commit"},
    ])
    try:
        return frame(header, seed.body)
    except ValueError:
        return _bit_flips(rng, seed)


def _items(rng: random.Random, seed: Seed) -> bytes:
    """Too many or too few CBOR items, or items out of place."""
    other = rng.choice(seeds())
    return rng.choice([
        seed.raw + other.raw, libipld.encode_dag_cbor(seed.header), libipld.encode_dag_cbor(seed.body),
        seed.raw + b"\x00", b"", libipld.encode_dag_cbor(seed.body) + libipld.encode_dag_cbor(seed.header),
    ])


def _many_ops(rng: random.Random, seed: Seed) -> bytes:
    ops = seed.body.get("ops")
    if not isinstance(ops, list) or not ops:
        return _type_swap(rng, seed)
    return frame(seed.header, dict(seed.body, ops=ops * rng.choice((50, 1000, 20_000))))


def _oversize(rng: random.Random, seed: Seed) -> bytes:
    return frame(seed.header, dict(seed.body, padding=bytes(MAX_FRAME_SIZE + rng.randint(1, 1000))))


# (mutator, weight): the oversize one costs ~5 MB per input, so it is rare.
MUTATORS: Final[dict[str, tuple[Mutator, int]]] = {
    "type_swap": (_type_swap, 12),
    "drop_field": (_drop_field, 4),
    "cid_garbage": (_cid_garbage, 12),
    "block_tamper": (_block_tamper, 10),
    "block_swap": (_block_swap, 8),
    "car_structure": (_car_structure, 8),
    "deep_nesting": (_deep_nesting, 8),
    "truncate": (_truncate, 6),
    "bit_flips": (_bit_flips, 10),
    "byte_edits": (_byte_edits, 6),
    "seq": (_seq, 5),
    "time": (_time, 3),
    "duplicate_keys": (_duplicate_keys, 4),
    "header": (_header, 3),
    "items": (_items, 2),
    "many_ops": (_many_ops, 1),
    "oversize": (_oversize, 1),
}


def mutants(n: int, seed: int) -> Iterator[tuple[str, str, bytes]]:
    """n (mutator name, seed frame name, bytes), deterministic in `seed`."""
    rng = random.Random(seed)
    names = list(MUTATORS)
    weights = [MUTATORS[name][1] for name in names]
    pool = seeds()
    for _ in range(n):
        name = rng.choices(names, weights)[0]
        base = rng.choice(pool)
        yield name, base.name, MUTATORS[name][0](rng, base)


# -- checking one input ------------------------------------------------------------------------


class _Hang(Exception):
    pass


@contextmanager
def _hang_guard(seconds: float) -> Iterator[None]:
    """SIGALRM after `seconds` (main thread only; elsewhere, no guard)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _alarm(signum: int, frame: object) -> None:
        raise _Hang

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_input(data: bytes) -> str:
    """The outcome label of one input ("event:commit", "error:bad_op", ...). Raises AssertionError
    when the contract is broken: another exception, an unknown kind, a seq out of range, or an
    event that violates what the parser promises."""
    try:
        event = parse_frame(data)
    except FrameError as exc:
        assert exc.kind in FRAME_ERROR_KINDS, f"unknown FrameError kind {exc.kind!r}"
        assert exc.seq is None or (type(exc.seq) is int and 0 <= exc.seq < SEQ_LIMIT), f"FrameError.seq {exc.seq!r}"
        return "error:" + exc.kind
    if isinstance(event, (Commit, Sync, Identity, Account)):
        assert type(event.seq) is int and 0 <= event.seq < SEQ_LIMIT, f"seq {event.seq!r}"
        assert type(event.time) is str and is_did(event.did), (event.time, event.did)
    if isinstance(event, Commit):
        if not event.too_big:
            assert event.commit_block is not None, "a commit without its block"
            assert cid_of(event.commit_block) == _cid_bytes(event.commit_cid), "commit block does not hash to its CID"
        for op in event.ops:
            if op.record is not None:
                assert isinstance(orjson.loads(op.record), dict)
    elif isinstance(event, Sync):
        assert cid_of(event.commit_block) == _cid_bytes(event.commit_cid), "sync block does not hash to its CID"
    else:
        assert isinstance(event, (Identity, Account, Info, StreamError)), type(event)
    return "event:" + type(event).__name__.lower()


def _cid_bytes(text: str) -> bytes:
    return CID_PREFIX + libipld.decode_cid(text)["hash"]["digest"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# -- the parser run ----------------------------------------------------------------------------


def run(n: int, seed: int, *, daemon: bool = True) -> dict[str, Any]:
    """Fuzz the parser with n mutants (and, with `daemon`, a daemon with min(n, 400) of them).

    Returns the figures; `failures` lists every broken contract (empty = pass), each with the
    mutator, the seed frame and the first bytes of the input in hex.
    """
    started = time.perf_counter()
    rss_before = _rss_mb()
    outcomes: Counter[str] = Counter()
    by_mutator: dict[str, Counter[str]] = {}
    failures: list[str] = []
    slowest = 0.0
    for name, base, data in mutants(n, seed):
        t0 = time.perf_counter()
        try:
            with _hang_guard(HANG_SECONDS):
                outcome = check_input(data)
        except _Hang:
            outcome = "FAIL:hang"
            failures.append(f"{name} on {base}: no answer within {HANG_SECONDS} s (input {data[:48].hex()}...)")
        except AssertionError as exc:
            outcome = "FAIL:contract"
            failures.append(f"{name} on {base}: {exc} (input {data[:48].hex()}...)")
        except BaseException as exc:  # noqa: BLE001 - the point is to catch what escapes the parser
            if isinstance(exc, KeyboardInterrupt):
                raise
            outcome = "FAIL:" + type(exc).__name__
            failures.append(f"{name} on {base}: {type(exc).__name__}: {str(exc)[:200]} (input {data[:48].hex()}...)")
        slowest = max(slowest, time.perf_counter() - t0)
        outcomes[outcome] += 1
        by_mutator.setdefault(name, Counter())[outcome] += 1
    rss_growth = _rss_mb() - rss_before
    if rss_growth > RSS_BOUND_MB:
        failures.append(f"peak RSS grew by {rss_growth:.0f} MB (bound {RSS_BOUND_MB} MB)")
    stats: dict[str, Any] = {
        "inputs": n,
        "seed": seed,
        "parsed": sum(v for k, v in outcomes.items() if k.startswith("event:")),
        "errors": {k[6:]: v for k, v in sorted(outcomes.items()) if k.startswith("error:")},
        "events": {k[6:]: v for k, v in sorted(outcomes.items()) if k.startswith("event:")},
        "by_mutator": {k: dict(sorted(v.items())) for k, v in sorted(by_mutator.items())},
        "slowest_input_seconds": round(slowest, 3),
        "peak_rss_growth_mb": round(rss_growth, 1),
        "seconds": 0.0,
        "failures": failures,
    }
    if daemon:
        stats["daemon"] = run_daemon_check(min(n, 400), seed)
        failures.extend(f"daemon: {f}" for f in stats["daemon"]["failures"])
    stats["seconds"] = round(time.perf_counter() - started, 2)
    return stats


# -- the daemon run ----------------------------------------------------------------------------

_GAP: Final = 10  # valid frames are renumbered 10 apart; a mutant takes a seq between two of them


def _spaced(frames: list[bytes]) -> list[bytes]:
    out = []
    for i, data in enumerate(frames):
        header, body = libipld.decode_dag_cbor_multi(data)
        body["seq"] = _GAP * (i + 1)
        out.append(frame(header, body))
    return out


def daemon_mix(n_mutants: int, seed: int) -> tuple[list[bytes], list[bytes], Counter[str]]:
    """(valid frames, valid frames with rejected mutants interleaved, mutants kept by mutator).

    A mutant of valid frame i takes a seq between frames i-1 and i before it is mutated, and is
    kept only if the parser rejects it with no seq or a seq still in that gap: rejected frames
    must change nothing but the cursor, and the cursor must not leave the relay's order.
    """
    rng = random.Random(seed)
    valid = _spaced(list(World(seed, n_dids=8, retain_blocks=False).frames(150)))
    decoded = [libipld.decode_dag_cbor_multi(f) for f in valid]
    names = list(MUTATORS)
    weights = [MUTATORS[name][1] if name not in ("oversize", "many_ops") else 0 for name in names]
    inserted: dict[int, list[bytes]] = {}
    kept: Counter[str] = Counter()
    tries = 0
    while sum(kept.values()) < n_mutants and tries < n_mutants * 20:
        tries += 1
        i = rng.randrange(1, len(valid))
        header, body = decoded[i]
        body = dict(body, seq=_GAP * (i + 1) - rng.randint(1, _GAP - 1))
        base = Seed(f"valid-{i}", frame(header, body), header, body)
        name = rng.choices(names, weights)[0]
        data = MUTATORS[name][0](rng, base)
        try:
            parse_frame(data)
        except FrameError as exc:
            if exc.seq is not None and not _GAP * i < exc.seq < _GAP * (i + 1):
                continue
        except Exception:  # noqa: BLE001 - a parser bug: the daemon must meet it too (run() reports it)
            pass
        else:
            continue
        inserted.setdefault(i, []).append(data)
        kept[name] += 1
    mixed: list[bytes] = []
    for i, data in enumerate(valid):
        mixed.extend(inserted.get(i, ()))
        mixed.append(data)
    return valid, mixed, kept


def _state(db: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        records = con.execute("SELECT did, collection, rkey, cid, rev, record FROM records ORDER BY ALL").fetchall()
        repos = con.execute("SELECT did, rev, data_cid, commit_cid, last_seq, handle, active, status, sync_state, "
                            "desync_reason FROM repos ORDER BY did").fetchall()
    finally:
        con.close()
    return records, repos


async def _consume(db: Path, frames: list[bytes], until: int) -> dict[str, int]:
    # `until`, not relay.head: a mutant may carry a seq no relay would send (2**64 - 1)
    with LocalRelay(frames) as relay:
        daemon = await consume_until(db, relay, until, cursor=0)
    return daemon.counts


def run_daemon_check(n_mutants: int, seed: int) -> dict[str, Any]:
    """Mirror of a daemon fed valid + rejected mutants == mirror of a daemon fed the valid frames."""
    valid, mixed, kept = daemon_mix(n_mutants, seed)
    quiet = logging.getLogger("skyfill.consumer")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # one warning per skipped frame is the daemon's job, not ours
    try:
        with tempfile.TemporaryDirectory(prefix="skyfill-fuzz-") as tmp:
            last = _GAP * len(valid)
            ref_counts = asyncio.run(_consume(Path(tmp) / "valid.duckdb", valid, last))
            try:
                mix_counts = asyncio.run(_consume(Path(tmp) / "mixed.duckdb", mixed, last))
            except Exception as exc:  # noqa: BLE001 - the daemon died or stalled: that is the finding
                return {"valid_frames": len(valid), "mutants": len(mixed) - len(valid), "records": 0,
                        "errors": {}, "mutants_by_mutator": dict(sorted(kept.items())),
                        "failures": [f"the daemon fed the mix failed: {type(exc).__name__}: {str(exc)[:300]}"]}
            ref, mix = _state(Path(tmp) / "valid.duckdb"), _state(Path(tmp) / "mixed.duckdb")
    finally:
        quiet.setLevel(level)
    errors = {k[6:]: v for k, v in sorted(mix_counts.items()) if k.startswith("error:")}
    failures = []
    if ref != mix:
        failures.append(f"mirror differs: records {len(ref[0])} vs {len(mix[0])}, repos {len(ref[1])} vs {len(mix[1])}")
    if sum(errors.values()) != len(mixed) - len(valid):
        failures.append(f"{len(mixed) - len(valid)} mutants fed, {sum(errors.values())} counted as errors")
    if any(k.startswith("error:") for k in ref_counts):
        failures.append(f"the valid frames alone gave errors: {ref_counts}")
    return {"valid_frames": len(valid), "mutants": len(mixed) - len(valid), "records": len(mix[0]),
            "errors": errors, "mutants_by_mutator": dict(sorted(kept.items())), "failures": failures}


# -- the fixed corpus --------------------------------------------------------------------------


def _load(name: str) -> Seed:
    return next(s for s in seeds() if s.name == name)


def corpus_cases() -> dict[str, bytes]:
    """The regression inputs: file stem -> bytes. The stem starts with the expected FrameError kind."""
    post = _load("post_lifecycle__04.frame")      # an update with prev and prevData
    like = _load("post_lifecycle__00.frame")      # a create
    sync = _load("account_lifecycle__02.frame")
    ident = _load("account_lifecycle__00.frame")
    h = libipld.encode_dag_cbor(post.header)
    garbage = b"not a CID at all"

    def op(seed: Seed, **changes: Any) -> dict[str, Any]:
        body = copy.deepcopy(seed.body)
        body["ops"][0].update(changes)
        return body

    roots, blocks = read_car(post.body["blocks"])
    commit = post.body["commit"]
    record = post.body["ops"][0]["cid"]

    def with_block(cid: bytes, data: bytes) -> bytes:
        return frame(post.header, dict(post.body, blocks=car(roots, list({**blocks, cid: data}.items()))))

    def swapped(old: bytes, data: bytes) -> bytes:
        new = cid_of(data)
        body = copy.deepcopy(post.body)
        rest = [(k, v) for k, v in blocks.items() if k != old] + [(new, data)]
        if old == commit:
            body["commit"] = new
            body["blocks"] = car([new], rest)
        else:
            body["ops"][0]["cid"] = new
            body["blocks"] = car(roots, rest)
        return frame(post.header, body)

    def flip(block: bytes, at: int) -> bytes:
        return block[:at] + bytes([block[at] ^ 1]) + block[at + 1:]

    sync_roots, sync_blocks = read_car(sync.body["blocks"])
    signed = libipld.decode_dag_cbor(blocks[commit])
    return {
        "bad_body__prevData_not_a_cid": frame(post.header, dict(post.body, prevData=garbage)),
        "bad_op__op_prev_not_a_cid": frame(post.header, op(post, prev=garbage)),
        "bad_op__too_big_op_cid_not_a_cid": frame(post.header, dict(op(post, cid=garbage), tooBig=True)),
        "bad_body__too_big_commit_not_a_cid": frame(post.header, dict(post.body, tooBig=True, commit=garbage)),
        "bad_op__op_cid_raw_codec": frame(post.header, op(post, cid=b"\x01\x55" + record[2:])),
        "bad_op__op_not_a_map": frame(post.header, dict(post.body, ops=[b"op"])),
        "bad_commit__commit_data_not_a_cid": swapped(commit, libipld.encode_dag_cbor(dict(signed, data=garbage))),
        "cbor__2000_nested_arrays": h + nested(2000),
        "cbor__10000_nested_maps_as_header": nested(10_000, "map") + libipld.encode_dag_cbor(post.body),
        "cbor__nested_op_field": h + body_with(post.body, "ops", b"\x81" + raw_map([("action", nested(3000))])),
        "cbor__duplicate_seq": h + raw_map([(k, libipld.encode_dag_cbor(v)) for k, v in post.body.items()]
                                           + [("seq", b"\x03")]),
        "bad_commit__nested_commit_block": swapped(commit, nested(5000)),
        "bad_record__record_300_deep": swapped(record, deep_record(300)),
        "bad_car__nested_car_header": frame(post.header, dict(post.body, blocks=car([], [], header=nested(5000)))),
        "bad_car__block_length_past_end": frame(post.header, dict(post.body, blocks=post.body["blocks"] + b"\xff\x7f")),
        "bad_block_hash__record_tampered": with_block(record, flip(blocks[record], blocks[record].index(b"app.bsky") + 3)),
        "bad_block_hash__commit_tampered": with_block(commit, flip(blocks[commit], blocks[commit].rindex(b"3"))),
        "bad_block_hash__like_record_tampered": frame(like.header, dict(like.body, blocks=car(
            *_tampered_blocks(like)))),
        "bad_block_hash__too_big_record_tampered": frame(post.header, dict(
            post.body, tooBig=True, blocks=car(roots, list({**blocks, record: flip(blocks[record], 20)}.items())))),
        "bad_block_hash__sync_tampered": frame(sync.header, dict(sync.body, blocks=car(sync_roots, [
            (sync_roots[0], flip(sync_blocks[sync_roots[0]], sync_blocks[sync_roots[0]].rindex(b"3")))]))),
        "missing_block__commit_keyed_by_garbage": frame(post.header, dict(post.body, blocks=car(
            roots, [(b"\x01\x71\x12\x20" + bytes(32) if k == commit else k, v) for k, v in blocks.items()]))),
        "bad_body__seq_2_63": frame(ident.header, dict(ident.body, seq=SEQ_LIMIT)),
        "bad_body__seq_2_64_minus_1": frame(post.header, dict(post.body, seq=2**64 - 1)),
        "bad_body__seq_negative": frame(post.header, dict(post.body, seq=-3)),
        "bad_body__seq_minus_2_64": h + body_with(post.body, "seq", b"\x3b" + b"\xff" * 8),
        "bad_body__time_not_a_datetime": frame(ident.header, dict(ident.body, time="x" * 5000)),
        "bad_body__time_an_int": frame(post.header, dict(post.body, time=1744846833)),
        "unknown_op__op_true": frame({"op": True, "t": "#commit"}, post.body),
        "missing_body__truncated": post.raw[: len(h) + 0],
        "cbor__truncated_mid_body": post.raw[: len(post.raw) // 2],
    }


def _tampered_blocks(seed: Seed) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
    roots, blocks = read_car(seed.body["blocks"])
    cid = seed.body["ops"][0]["cid"]
    block = blocks[cid]
    at = block.index(b"createdAt") + 20
    blocks[cid] = block[:at] + bytes([block[at] ^ 1]) + block[at + 1:]
    return roots, list(blocks.items())


def write_corpus() -> list[Path]:
    CORPUS.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, data in corpus_cases().items():
        path = CORPUS / f"{stem}.frame"
        path.write_bytes(data)
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    if argv[:1] == ["--write-corpus"]:
        for path in write_corpus():
            print(path.relative_to(ROOT.parent))
        return 0
    n = int(argv[0]) if argv else 2000
    seed = int(argv[1]) if len(argv) > 1 else 1
    stats = run(n, seed)
    print(orjson.dumps(stats, option=orjson.OPT_INDENT_2).decode())
    return 1 if stats["failures"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
