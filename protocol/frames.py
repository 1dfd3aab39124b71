"""One binary subscribeRepos message -> one typed event. Pure: no I/O, no state.

A message is two concatenated DAG-CBOR objects, header then body. Only what skyfill stores is
decoded: the CAR slice is split without decoding, then the signed commit block (for its `data`
root) and the record blocks of the ops the collection filter wants (to JSON).

Every failure raises FrameError with a stable `kind` (a metric label) and the body's `seq`
when it could be read, so the caller can count the frame and still move past it:

    oversize        the message is larger than max_size
    cbor            not DAG-CBOR
    header          no header, a header that is not a map, or `t` missing on op 1
    unknown_op      header op other than 1 and -1
    missing_body    a header without a body
    too_many_items  more than two DAG-CBOR objects
    unknown_type    op 1 with a `t` skyfill does not know (e.g. "#d", the old "#handle")
    error_body      op -1 whose body is not {error: str, message?: str}
    bad_body        a body field missing or of the wrong type (seq, time, blocks, ops, a CID, ...);
                    seq must be an int in [0, 2**63) (a DuckDB BIGINT), time an atproto datetime
    bad_did / bad_nsid / bad_rkey / bad_tid    invalid identifier syntax (repo, op path, rev, since)
    bad_op          an op that is not a map, an unknown action, a path not `collection/rkey`, no CID on
                    create/update, or a `cid` / `prev` that is not a CID
    missing_block   the CAR lacks the commit block or an op's record block
    bad_block_hash  a block used (the signed commit, a record) does not hash to the CID naming it
    bad_commit      the signed commit block is not a commit, or its did/rev disagree with the body
    bad_car         the CAR slice is malformed
    bad_record      a record block is not valid DAG-CBOR / not a map

Contract: for ANY bytes parse_frame returns an Event or raises FrameError, nothing else (deep
nesting, which makes libipld raise RecursionError, is `cbor` in the frame itself and the block's
kind, bad_commit / bad_record / bad_car, inside a block). FrameError.seq is None or the body's
seq when that is an int in [0, 2**63): never negative, never beyond a BIGINT. It is not
checked against earlier frames: keeping the cursor monotonic is the caller's job.

Every CID the parser reads (commit, prevData, ops[].cid, ops[].prev, the commit's `data`, a
#sync root) must be a CIDv1 dag-cbor sha2-256 CID, the only form atproto repos use for them.
Every block the parser uses is hashed and compared with the CID that names it (one sha256 per
block; a #commit uses a few small ones), so a relay cannot substitute a body for a signed CID.

Decisions:
- One invalid op rejects the whole commit: a partial commit would store a state that never
  existed. The commit's rev is then never applied, so the DID's next commit has a `since` that
  does not match the held rev; the tracker marks it desynchronized and the backfill repairs it.
- A `tooBig` commit (deprecated by sync 1.1, but old relays still send it) may lack record
  blocks: it yields a Commit whose ops carry no record JSON (record=None) and whose data_cid
  is None when the commit block is absent. The tracker applies its deletes and desynchronizes
  the DID so the missing bodies come from a backfill.
- Record blocks of ops the filter does not want must still be present (the frame is checked
  the same way whatever the filter), but they are not converted to JSON (record=None).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Final

import libipld

from .car import CID_LEN, DAG_CBOR_CID_PREFIX, CarError, cid_to_str, read_car
from skyfill.errors import FrameError, InputError
from .records import is_valid_datetime, record_json
from .syntax import is_did, is_handle, is_nsid, is_record_key, is_tid

from .events import Account, Commit, Event, Identity, Info, Op, StreamError, Sync

__all__ = ["parse_frame", "MAX_FRAME_SIZE", "FRAME_ERROR_KINDS"]

MAX_FRAME_SIZE: Final = 5_000_000

FRAME_ERROR_KINDS: Final = frozenset(
    {
        "oversize", "cbor", "header", "unknown_op", "missing_body", "too_many_items", "unknown_type",
        "error_body", "bad_body", "bad_did", "bad_nsid", "bad_rkey", "bad_tid", "bad_op",
        "missing_block", "bad_block_hash", "bad_commit", "bad_car", "bad_record",
    }
)

_ACTIONS: Final = frozenset({"create", "update", "delete"})
_decode_multi: Final = libipld.decode_dag_cbor_multi
_decode: Final = libipld.decode_dag_cbor
_cid_str: Final = cid_to_str
_sha256: Final = hashlib.sha256
_SEQ_LIMIT: Final = 2**63  # seqs are stored as DuckDB BIGINT
# libipld raises RecursionError on deeply nested CBOR (~1,500 levels), not ValueError.
_DECODE_ERRORS: Final = (ValueError, RecursionError)
# Few distinct collections exist on the network: remember the valid ones (bounded).
_good_collections: set[str] = set()


class _Bad(Exception):
    """Internal: raised deep in the parsers, turned into FrameError with the frame's seq."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def parse_frame(
    data: bytes,
    *,
    want: Callable[[str], bool] | None = None,
    max_size: int = MAX_FRAME_SIZE,
) -> Event:
    """Decode one binary WebSocket message. `want(collection)` False = skip that op's record JSON."""
    if len(data) > max_size:
        raise FrameError(f"frame of {len(data)} bytes exceeds {max_size}", kind="oversize", seq=_peek_seq(data))
    try:
        items = _decode_multi(data)
    except _DECODE_ERRORS as exc:
        raise FrameError(f"frame is not DAG-CBOR: {_reason(exc)}", kind="cbor") from None
    n = len(items)
    if n != 2:
        if n == 0:
            raise FrameError("empty frame: no header", kind="header")
        if n == 1:
            raise FrameError("frame has a header but no body", kind="missing_body")
        raise FrameError(f"frame holds {n} DAG-CBOR objects, expected 2", kind="too_many_items",
                         seq=_seq_of(items[1]))
    header, body = items
    if type(header) is not dict:
        raise FrameError("frame header is not a map", kind="header", seq=_seq_of(body))
    op = header.get("op")
    if op == -1 and type(op) is int:
        return _error(body)
    if op != 1 or type(op) is not int:
        raise FrameError(f"unknown frame op {_short(op)}", kind="unknown_op", seq=_seq_of(body))
    t = header.get("t")
    if type(body) is not dict:
        raise FrameError("frame body is not a map", kind="bad_body")
    try:
        if t == "#commit":
            return _commit(body, want)
        if t == "#identity":
            return _identity(body)
        if t == "#account":
            return _account(body)
        if t == "#sync":
            return _sync(body)
        if t == "#info":
            return _info(body)
    except _Bad as exc:
        raise FrameError(f"{t}: {exc}", kind=exc.kind, seq=_seq_of(body)) from None
    except (KeyError, TypeError, AttributeError) as exc:
        # A required field missing (KeyError), or a safety net for a type the checks missed.
        raise FrameError(f"{t}: malformed body ({type(exc).__name__}: {_reason(exc)})", kind="bad_body",
                         seq=_seq_of(body)) from None
    if type(t) is not str:
        raise FrameError("message frame without a type `t`", kind="header", seq=_seq_of(body))
    raise FrameError(f"unknown message type {_short(t)}", kind="unknown_type", seq=_seq_of(body))


# -- event bodies -----------------------------------------------------------------------------


def _commit(body: dict[str, Any], want: Callable[[str], bool] | None) -> Commit:
    seq, time, did = _envelope(body, "repo")
    rev = body["rev"]
    if not is_tid(rev):
        raise _Bad("bad_tid", f"invalid rev {_short(rev)}")
    since = body.get("since")
    if since is not None and not is_tid(since):
        raise _Bad("bad_tid", f"invalid since {_short(since)}")
    commit_cid = _cid(body["commit"], "bad_body", "commit")
    prev_data = body.get("prevData")
    if prev_data is not None:
        prev_data = _cid(prev_data, "bad_body", "prevData")
    too_big = body.get("tooBig") is True
    raw_ops = body["ops"]
    if type(raw_ops) is not list:
        raise _Bad("bad_body", "ops is not a list")
    blocks = _car_blocks(body["blocks"], allow_empty=too_big)

    commit_block = blocks.get(commit_cid)
    data_cid: str | None = None
    if commit_block is not None:
        if _sha256(commit_block).digest() != commit_cid[4:]:
            raise _Bad("bad_block_hash", "the commit block does not hash to the commit CID")
        data_cid = _cid_str(_signed_commit(commit_block, did, rev))
    elif not too_big:
        raise _Bad("missing_block", "the CAR slice lacks the commit block")

    ops: list[Op] = []
    append = ops.append
    for raw in raw_ops:
        if type(raw) is not dict:
            raise _Bad("bad_op", "an op is not a map")
        action = raw["action"]
        path = raw["path"]
        if type(action) is not str or action not in _ACTIONS or type(path) is not str:
            raise _Bad("bad_op", f"op {_short(action)} {_short(path)}")
        collection, sep, rkey = path.partition("/")
        if not sep:
            raise _Bad("bad_op", f"op path {_short(path)} is not collection/rkey")
        if collection not in _good_collections:
            if not is_nsid(collection):
                raise _Bad("bad_nsid", f"invalid collection {_short(collection)}")
            if len(_good_collections) < 4096:
                _good_collections.add(collection)
        if not is_record_key(rkey):
            raise _Bad("bad_rkey", f"invalid record key {_short(rkey)}")
        prev = raw.get("prev")
        prev_str = _cid_str(_cid(prev, "bad_op", f"{path} prev")) if prev is not None else None
        if action == "delete":
            append(Op(action, collection, rkey, None, prev_str, None, None))
            continue
        cid = raw.get("cid")
        if type(cid) is not bytes or len(cid) != CID_LEN or cid[:4] != DAG_CBOR_CID_PREFIX:  # _cid, inlined: hot
            raise _Bad("bad_op", f"{action} {path} has no dag-cbor sha2-256 CID")
        block = blocks.get(cid)
        record: str | None = None
        created_at: str | None = None
        if block is None:
            if not too_big:
                raise _Bad("missing_block", f"the CAR slice lacks the record block of {path}")
        else:
            if _sha256(block).digest() != cid[4:]:
                raise _Bad("bad_block_hash", f"the record block of {path} does not hash to its CID")
            if not too_big and (want is None or want(collection)):
                try:
                    record, created_at = record_json(block)
                except (InputError, TypeError) as exc:  # orjson raises TypeError on >255 levels
                    raise _Bad("bad_record", f"{path}: {exc}") from None
        append(Op(action, collection, rkey, _cid_str(cid), prev_str, record, created_at))

    return Commit(
        seq=seq,
        time=time,
        did=did,
        rev=rev,
        since=since,
        commit_cid=_cid_str(commit_cid),
        data_cid=data_cid,
        prev_data=_cid_str(prev_data) if prev_data is not None else None,
        ops=tuple(ops),
        too_big=too_big,
        commit_block=commit_block,
    )


def _sync(body: dict[str, Any]) -> Sync:
    seq, time, did = _envelope(body, "did")
    rev = body["rev"]
    if not is_tid(rev):
        raise _Bad("bad_tid", f"invalid rev {_short(rev)}")
    raw = body["blocks"]
    if type(raw) is not bytes:
        raise _Bad("bad_body", "blocks is not bytes")
    roots, blocks = _read_car(raw)
    if len(roots) != 1:
        raise _Bad("bad_car", f"a #sync CAR must have exactly one root, not {len(roots)}")
    root = _cid(roots[0], "bad_car", "the CAR root")
    block = blocks.get(root)
    if block is None:
        raise _Bad("missing_block", "the CAR lacks the commit block")
    if _sha256(block).digest() != root[4:]:
        raise _Bad("bad_block_hash", "the commit block does not hash to the CAR root")
    data = _signed_commit(block, did, rev)
    return Sync(seq=seq, time=time, did=did, rev=rev, commit_cid=_cid_str(root),
                data_cid=_cid_str(data), commit_block=block)


def _identity(body: dict[str, Any]) -> Identity:
    seq, time, did = _envelope(body, "did")
    handle = body.get("handle")
    if handle is not None and not is_handle(handle):
        raise _Bad("bad_body", f"invalid handle {_short(handle)}")
    return Identity(seq=seq, time=time, did=did, handle=handle)


def _account(body: dict[str, Any]) -> Account:
    seq, time, did = _envelope(body, "did")
    active = body["active"]
    if type(active) is not bool:
        raise _Bad("bad_body", "active is not a boolean")
    status = body.get("status")
    if status is not None and type(status) is not str:
        raise _Bad("bad_body", "status is not a string")
    return Account(seq=seq, time=time, did=did, active=active, status=status)


def _info(body: dict[str, Any]) -> Info:
    name = _str(body["name"], "name")
    message = body.get("message")
    return Info(name=name, message=message if type(message) is str else None)


def _error(body: object) -> StreamError:
    if type(body) is not dict or type(body.get("error")) is not str:
        raise FrameError("error frame body has no `error` string", kind="error_body")
    message = body.get("message")
    if message is not None and type(message) is not str:
        raise FrameError("error frame `message` is not a string", kind="error_body")
    return StreamError(error=body["error"], message=message)


# -- helpers ----------------------------------------------------------------------------------


def _cid(value: object, kind: str, name: str) -> bytes:
    """`value` itself when it is a CIDv1 dag-cbor sha2-256 CID in binary form, else _Bad(kind).

    libipld decodes tag-42 links and byte strings alike to bytes, so a byte string of any
    content can stand where a CID belongs: only its form tells them apart.
    """
    if type(value) is not bytes or len(value) != CID_LEN or value[:4] != DAG_CBOR_CID_PREFIX:
        raise _Bad(kind, f"{name} is not a dag-cbor sha2-256 CID")
    return value


def _read_car(raw: bytes) -> tuple[list[bytes], dict[bytes, bytes]]:
    try:
        return read_car(raw)
    except CarError as exc:
        raise _Bad("bad_car", str(exc)) from None
    except _DECODE_ERRORS as exc:  # read_car lets RecursionError from its header decode escape
        raise _Bad("bad_car", f"bad CAR header: {_reason(exc)}") from None


def _car_blocks(raw: object, *, allow_empty: bool) -> dict[bytes, bytes]:
    if type(raw) is not bytes:
        raise _Bad("bad_body", "blocks is not bytes")
    if not raw and allow_empty:
        return {}
    return _read_car(raw)[1]


def _signed_commit(block: bytes, did: str, rev: str) -> bytes:
    """Decode the signed commit block and return its `data` (MST root) CID bytes."""
    try:
        commit = _decode(block)
    except _DECODE_ERRORS as exc:
        raise _Bad("bad_commit", f"commit block is not DAG-CBOR: {_reason(exc)}") from None
    if type(commit) is not dict:
        raise _Bad("bad_commit", "commit block is not a map")
    if commit.get("did") != did:
        raise _Bad("bad_commit", f"commit block is for {_short(commit.get('did'))}, not {did!r}")
    if commit.get("rev") != rev:
        raise _Bad("bad_commit", f"commit block rev {_short(commit.get('rev'))} != {rev!r}")
    return _cid(commit.get("data"), "bad_commit", "the commit block's data")


def _envelope(body: dict[str, Any], did_field: str) -> tuple[int, str, str]:
    """(seq, time, DID) that every repo event carries; #commit names its DID `repo`."""
    did = body[did_field]
    if not is_did(did):
        raise _Bad("bad_did", f"invalid {did_field} DID {_short(did)}")
    seq = body["seq"]
    if type(seq) is not int or not 0 <= seq < _SEQ_LIMIT:
        raise _Bad("bad_body", f"seq {_short(seq)} is not an integer in [0, 2**63)")
    time = body["time"]
    if not is_valid_datetime(time):
        raise _Bad("bad_body", f"time {_short(time)} is not an atproto datetime")
    return seq, time, did


def _str(value: object, name: str) -> str:
    if type(value) is not str:
        raise _Bad("bad_body", f"{name} is not a string")
    return value


def _short(value: object) -> str:
    """A bounded repr for error messages: a frame field can be megabytes long."""
    if type(value) is str or type(value) is bytes:
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    if type(value) in (int, bool) or value is None:  # DAG-CBOR ints fit in 65 bits
        return repr(value)
    return type(value).__name__


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:197] + "..."


def _seq_of(body: object) -> int | None:
    """The body's seq when it is a valid one (an int in [0, 2**63)), else None."""
    if type(body) is dict:
        seq = body.get("seq")
        if type(seq) is int and 0 <= seq < _SEQ_LIMIT:
            return seq
    return None


def _peek_seq(data: bytes) -> int | None:
    """Best effort: the seq of a frame rejected before decoding, so the cursor can pass it."""
    try:
        items = _decode_multi(data)
    except _DECODE_ERRORS:
        return None
    return _seq_of(items[1]) if len(items) >= 2 else None
