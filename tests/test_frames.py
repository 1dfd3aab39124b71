"""consumer.frames.parse_frame on real wire bytes: the derived firehose frames (re-encoded indigo
captures), the reference xrpc-server framing cases, and real frames altered one field at a time."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import libipld
import orjson
import pytest

from consumer import Account, Commit, Identity, Info, StreamError, Sync, parse_frame
from skyfill.car import cid_from_str, read_car
from skyfill.errors import FrameError

VECTORS = Path(__file__).parent / "vectors"
FIREHOSE = VECTORS / "derived" / "firehose"
INDEX: list[dict[str, Any]] = json.loads((FIREHOSE / "index.json").read_text())

# Two rev_ordering frames were hand-edited upstream (indigo cmd/relay/testing/testdata): the body
# `rev` was changed but the signed commit block inside `blocks` was left as it was (its rev is
# 3lmxjzbfkb522). 01 also uses the rev "3lmxjza3nva00", which is not a TID ('0' is outside the
# base32-sortable alphabet). The indigo relay drops both (both carry drop=true): it checks that
# the body rev equals the signed commit's rev. So does parse_frame, so these two never reach
# the tracker as events.
REJECTED = {"rev_ordering__01.frame": "bad_tid", "rev_ordering__02.frame": "bad_commit"}


# -- wire helpers (shared with test_tracker) ----------------------------------------------------


def from_json(value: Any) -> Any:
    """atproto JSON form -> the values libipld encodes: {"$bytes"} -> bytes, {"$link"} -> CID bytes."""
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            text = value["$bytes"]
            return base64.b64decode(text + "=" * (-len(text) % 4))
        if set(value) == {"$link"}:
            return cid_from_str(value["$link"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def encode_frame(header: dict[str, Any], body: Any) -> bytes:
    return libipld.encode_dag_cbor(header) + libipld.encode_dag_cbor(body)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def encode_car(roots: list[bytes], blocks: dict[bytes, bytes]) -> bytes:
    header = libipld.encode_dag_cbor({"version": 1, "roots": roots})
    parts = [_varint(len(header)), header]
    for cid, data in blocks.items():
        parts += [_varint(len(cid) + len(data)), cid, data]
    return b"".join(parts)


def load(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, body = libipld.decode_dag_cbor_multi((FIREHOSE / name).read_bytes())
    return header, body


# -- the derived firehose frames ----------------------------------------------------------------


@pytest.mark.parametrize("entry", INDEX, ids=[e["file"] for e in INDEX])
def test_derived_frame_decodes_as_indexed(entry: dict[str, Any]) -> None:
    data = (FIREHOSE / entry["file"]).read_bytes()
    assert len(data) == entry["size"]
    if entry["file"] in REJECTED:
        with pytest.raises(FrameError) as info:
            parse_frame(data)
        assert info.value.kind == REJECTED[entry["file"]]
        assert info.value.seq == libipld.decode_dag_cbor_multi(data)[1]["seq"]
        return
    event = parse_frame(data)
    expected_type = {"#commit": Commit, "#sync": Sync, "#identity": Identity, "#account": Account}[entry["t"]]
    assert type(event) is expected_type
    if "seq" in entry:
        assert event.seq == entry["seq"]
    if isinstance(event, Commit):
        assert event.rev == entry["rev"]
        assert event.since == entry["since"]
        assert (event.prev_data is not None) == entry["has_prevData"]
        assert [[op.action, f"{op.collection}/{op.rkey}"] for op in event.ops] == entry["ops"]
        assert event.data_cid is not None and event.data_cid.startswith("bafyrei")
        assert event.commit_block is not None
        assert libipld.decode_dag_cbor(event.commit_block)["did"] == event.did
        for op in event.ops:
            if op.action == "delete":
                assert op.cid is None and op.record is None
            else:
                assert op.record is not None
                assert orjson.loads(op.record)["$type"] == op.collection
    elif isinstance(event, Sync):
        assert event.rev == entry["rev"]
        commit = libipld.decode_dag_cbor(event.commit_block)
        assert commit["did"] == event.did and commit["rev"] == event.rev


def test_rejected_rev_ordering_frames_really_disagree_with_their_signed_commit() -> None:
    for name in REJECTED:
        _, body = load(name)
        _, blocks = read_car(body["blocks"])
        signed = libipld.decode_dag_cbor(blocks[body["commit"]])
        assert signed["rev"] == "3lmxjzbfkb522" != body["rev"]


def test_commit_matches_the_indigo_json_capture() -> None:
    """The four relay captures: every CID and field as the JSON form states it."""
    for path in sorted((VECTORS / "indigo" / "repo-testdata").glob("firehose_commit_*.json")):
        capture = json.loads(path.read_text())
        event = parse_frame(encode_frame({"op": 1, "t": "#commit"}, from_json(capture)))
        assert isinstance(event, Commit)
        assert (event.did, event.rev, event.seq, event.time) == (
            capture["repo"], capture["rev"], capture["seq"], capture["time"])
        assert event.commit_cid == capture["commit"]["$link"]
        assert [(op.action, f"{op.collection}/{op.rkey}", op.cid) for op in event.ops] == [
            (op["action"], op["path"], op["cid"]["$link"] if op["cid"] else None) for op in capture["ops"]]
    # one of them carries 42 ops
    assert max(len(json.loads(p.read_text())["ops"])
               for p in (VECTORS / "indigo" / "repo-testdata").glob("firehose_commit_*.json")) == 42


def test_record_json_keeps_links_and_blobs_in_atproto_json_form() -> None:
    event = parse_frame((FIREHOSE / "post_lifecycle__04.frame").read_bytes())  # profile update
    assert isinstance(event, Commit)
    (op,) = event.ops
    assert (op.action, op.collection, op.rkey) == ("update", "app.bsky.actor.profile", "self")
    assert op.prev is not None and op.prev.startswith("bafyrei")
    record = orjson.loads(op.record or "")
    assert record["avatar"]["$type"] == "blob"
    assert set(record["avatar"]["ref"]) == {"$link"}
    like = parse_frame((FIREHOSE / "post_lifecycle__00.frame").read_bytes())
    assert isinstance(like, Commit)
    subject = orjson.loads(like.ops[0].record or "")["subject"]
    assert subject["uri"].startswith("at://") and subject["cid"].startswith("bafyrei")
    assert like.ops[0].created_at == orjson.loads(like.ops[0].record or "")["createdAt"]


def test_filter_skips_record_json_but_keeps_ops() -> None:
    data = (FIREHOSE / "post_lifecycle__05.frame").read_bytes()
    event = parse_frame(data, want=lambda c: c == "app.bsky.feed.post")
    assert isinstance(event, Commit)
    kept = {op.collection: op.record is not None for op in event.ops}
    assert kept == {"app.bsky.feed.post": True, "app.bsky.feed.threadgate": False, "app.bsky.feed.postgate": False}
    assert all(op.cid for op in event.ops)


def test_identity_account_sync_fields() -> None:
    identity = parse_frame((FIREHOSE / "account_lifecycle__00.frame").read_bytes())
    assert identity == Identity(seq=110, time="2025-04-16T23:40:33.895Z",
                                did="did:plc:vvpy7d6y2li5yo73cgbszibl", handle="pengua.bsky.social")
    deleted = parse_frame((FIREHOSE / "account_lifecycle__03.frame").read_bytes())
    assert deleted == Account(seq=140, time="2025-04-16T23:41:33.895Z",
                              did="did:plc:vvpy7d6y2li5yo73cgbszibl", active=False, status="deleted")
    sync = parse_frame((FIREHOSE / "account_lifecycle__02.frame").read_bytes())
    assert isinstance(sync, Sync)
    assert sync.commit_cid.startswith("bafyrei") and sync.data_cid.startswith("bafyrei")


# -- the reference framing cases (xrpc-server frames.test.ts) -----------------------------------

XRPC = json.loads((VECTORS / "derived" / "xrpc-frames.json").read_text())["vectors"]
XRPC_KINDS = {
    "message frame t=#d": "unknown_type",   # valid framing, but not a subscribeRepos message
    "not CBOR": "cbor",
    "empty": "header",
    "unknown op -2": "unknown_op",
    "missing body": "missing_body",
    "too many data items": "too_many_items",
    "error frame invalid body": "error_body",
}


@pytest.mark.parametrize("case", XRPC, ids=[c["name"] for c in XRPC])
def test_xrpc_framing_cases(case: dict[str, Any]) -> None:
    data = bytes.fromhex(case["hex"])
    if case["name"] == "error frame":
        assert parse_frame(data) == StreamError(error="BigOops", message="Something went awry")
        return
    with pytest.raises(FrameError) as info:
        parse_frame(data)
    assert info.value.kind == XRPC_KINDS[case["name"]]
    assert case["valid"] == (case["name"] == "message frame t=#d")


def test_info_frame() -> None:
    data = encode_frame({"op": 1, "t": "#info"}, {"name": "OutdatedCursor", "message": "too old"})
    assert parse_frame(data) == Info(name="OutdatedCursor", message="too old")


# -- real frames, altered -----------------------------------------------------------------------


def test_oversize_frame_is_rejected_with_its_seq() -> None:
    data = (FIREHOSE / "post_lifecycle__05.frame").read_bytes()
    with pytest.raises(FrameError) as info:
        parse_frame(data, max_size=len(data) - 1)
    assert (info.value.kind, info.value.seq) == ("oversize", 35986865)
    assert isinstance(parse_frame(data, max_size=len(data)), Commit)


def _without_block(name: str, drop: bytes) -> bytes:
    header, body = load(name)
    roots, blocks = read_car(body["blocks"])
    assert drop in blocks
    del blocks[drop]
    body["blocks"] = encode_car(roots, blocks)
    return encode_frame(header, body)


def test_commit_lacking_an_op_block_is_rejected_whole() -> None:
    _, body = load("post_lifecycle__05.frame")
    threadgate = body["ops"][1]["cid"]  # the second of three ops
    with pytest.raises(FrameError) as info:
        parse_frame(_without_block("post_lifecycle__05.frame", threadgate))
    assert (info.value.kind, info.value.seq) == ("missing_block", 35986865)
    # the filter does not relax it: the frame is incomplete whatever we keep
    with pytest.raises(FrameError) as info:
        parse_frame(_without_block("post_lifecycle__05.frame", threadgate), want=lambda c: False)
    assert info.value.kind == "missing_block"


def test_commit_lacking_its_commit_block_is_rejected() -> None:
    _, body = load("post_lifecycle__02.frame")
    with pytest.raises(FrameError) as info:
        parse_frame(_without_block("post_lifecycle__02.frame", body["commit"]))
    assert info.value.kind == "missing_block"


def test_too_big_commit_yields_ops_without_bodies() -> None:
    header, body = load("post_lifecycle__02.frame")
    _, blocks = read_car(body["blocks"])
    body["tooBig"] = True
    body["blocks"] = encode_car([body["commit"]], {body["commit"]: blocks[body["commit"]]})
    event = parse_frame(encode_frame(header, body))
    assert isinstance(event, Commit) and event.too_big
    assert [(op.action, op.record) for op in event.ops] == [("create", None)]
    assert event.data_cid is not None


def _altered(name: str, **changes: Any) -> bytes:
    header, body = load(name)
    for key, value in changes.items():
        if key == "path":
            body["ops"][0]["path"] = value
        elif key == "action":
            body["ops"][0]["action"] = value
        else:
            body[key] = value
    return encode_frame(header, body)


@pytest.mark.parametrize(
    ("changes", "kind"),
    [
        ({"repo": "did:plc:UPPER CASE"}, "bad_did"),
        ({"repo": "did:plc:vvpy7d6y2li5yo73cgbszibl"}, "bad_commit"),  # valid, but not the signer's DID
        ({"path": "app.bsky.feed.post/has space"}, "bad_rkey"),
        ({"path": "app.bsky.feed.post/.."}, "bad_rkey"),
        ({"path": "app.bsky..post/3lmxjzlexp22k"}, "bad_nsid"),
        ({"path": "app.bsky.feed.post"}, "bad_op"),
        ({"action": "upsert"}, "bad_op"),
        ({"since": "not-a-tid"}, "bad_tid"),
        ({"blocks": b"\x05garbage"}, "bad_car"),
        ({"seq": "35949840"}, "bad_body"),
        ({"ops": None}, "bad_body"),
    ],
)
def test_invalid_fields_in_a_real_commit(changes: dict[str, Any], kind: str) -> None:
    with pytest.raises(FrameError) as info:
        parse_frame(_altered("post_lifecycle__02.frame", **changes))
    assert info.value.kind == kind


def test_missing_required_field_is_bad_body() -> None:
    header, body = load("post_lifecycle__02.frame")
    del body["repo"]
    with pytest.raises(FrameError) as info:
        parse_frame(encode_frame(header, body))
    assert (info.value.kind, info.value.seq) == ("bad_body", 35949840)


def test_invalid_did_in_identity_and_account() -> None:
    for name in ("account_lifecycle__00.frame", "account_lifecycle__01.frame", "account_lifecycle__02.frame"):
        header, body = load(name)
        body["did"] = "did:method:val:"
        with pytest.raises(FrameError) as info:
            parse_frame(encode_frame(header, body))
        assert info.value.kind == "bad_did"
