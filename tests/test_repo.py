"""backfill.repo on real repo CARs (indigo test data) and on repos built by an independent MST
implementation (atmst + cbrrr), signed with fresh keys."""

from __future__ import annotations

import base64
import hashlib
import json
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import cbrrr
import coincurve
import libipld
import pytest
from atmst.blockstore import MemoryBlockStore
from atmst.mst.node_store import NodeStore
from atmst.mst.node_wrangler import NodeWrangler
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from skyfill.protocol.repo import RepoSnapshot, materialize, parse_repo
from skyfill.protocol.car import CarError, cid_to_str, read_car, verify_block
from skyfill.protocol.crypto import PublicKey, atproto_key_from_did_doc, parse_public_key
from skyfill.errors import RepoError, SignatureError

from .support.wire import read_varint, varint

VECTORS = Path(__file__).parent / "vectors" / "indigo"
BNEWBOLD = VECTORS / "repo-testdata" / "bnewbold.robocracy.org.20250310005405.car"
TESTING = VECTORS / "testing-testdata"
GREENGROUND = TESTING / "greenground.repo.car"
FAKERMAKER = TESTING / "fakermaker.repo.car"
DIVY = TESTING / "divy.repo"
BNEWBOLD_DID = "did:plc:nhxcyu4ewwhl5pqil4dotqjo"
GREENGROUND_DID = "did:plc:kzcqyc3unb33eh5sxzsfs25z"
DIVY_DID = "did:plc:fz36gecghqb353ek23nem3ca"
FAKERMAKER_DID = "did:plc:dpg45vsnuir2vqqqadsn6afg"


# ---- CAR plumbing for tests (independent of skyfill.car) ----------------------------------

def write_car(root: bytes, blocks: list[tuple[bytes, bytes]]) -> bytes:
    header = cbrrr.encode_dag_cbor({"version": 1, "roots": [cbrrr.CID(root)]})
    parts = [varint(len(header)), header]
    for cid, data in blocks:
        parts += [varint(len(cid) + len(data)), cid, data]
    return b"".join(parts)


def split_car(car: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], list[int]]:
    """(root, [(cid, data)], block end offsets), by hand; CIDs here are all 36 bytes."""
    n, pos = read_varint(car, 0)
    root = bytes(cbrrr.decode_dag_cbor(car[pos : pos + n])["roots"][0])
    pos += n
    blocks, ends = [], [pos]
    while pos < len(car):
        length, pos = read_varint(car, pos)
        blocks.append((car[pos : pos + 36], car[pos + 36 : pos + length]))
        pos += length
        ends.append(pos)
    return root, blocks, ends


def cid_of(data: bytes) -> bytes:
    return b"\x01\x71\x12\x20" + hashlib.sha256(data).digest()


# ---- signing keys -------------------------------------------------------------------------

class K256Signer:
    def __init__(self, seed: int) -> None:
        self.priv = coincurve.PrivateKey(seed.to_bytes(32, "big"))
        self.public = PublicKey("k256", self.priv.public_key.format(compressed=True))

    def sign(self, msg: bytes) -> bytes:
        r, s = decode_dss_signature(self.priv.sign(msg, hasher=lambda m: hashlib.sha256(m).digest()))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")  # libsecp256k1 signs low-S


class P256Signer:
    N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

    def __init__(self, seed: int) -> None:
        self.priv = ec.derive_private_key(seed, ec.SECP256R1())
        point = self.priv.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
        self.public = PublicKey("p256", point)

    def sign(self, msg: bytes) -> bytes:
        r, s = decode_dss_signature(self.priv.sign(msg, ec.ECDSA(hashes.SHA256())))
        s = min(s, self.N - s)  # atproto requires low-S; OpenSSL does not normalise
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


# ---- a repo built by atmst (an independent MST implementation) ------------------------------

def build_repo(
    did: str,
    records: dict[str, dict[str, Any]],
    signer: K256Signer | P256Signer,
    *,
    rev: str = "3lbbbbbbbbbb2",
    extra_blocks: tuple[tuple[bytes, bytes], ...] = (),
) -> tuple[bytes, dict[str, str]]:
    """Signed v3 repo CAR holding `records` ({"collection/rkey": record}) and {key: CID str}."""
    bs = MemoryBlockStore()
    wrangler = NodeWrangler(NodeStore(bs))
    root = NodeStore(bs).get_node(None).cid
    record_blocks: dict[bytes, bytes] = {}
    expected: dict[str, str] = {}
    for key, record in records.items():
        data = cbrrr.encode_dag_cbor(record)
        cid = cbrrr.CID.cidv1_dag_cbor_sha256_32_from(data)
        record_blocks[bytes(cid)] = data
        expected[key] = cid.encode()
        root = wrangler.put_record(root, key, cid)
    # only the nodes reachable from the final root: atmst keeps every intermediate version
    nodes: list[tuple[bytes, bytes]] = []

    def reach(cid: cbrrr.CID | None) -> None:
        if cid is None:
            return
        data = bs.get_block(bytes(cid))
        nodes.append((bytes(cid), data))
        node = cbrrr.decode_dag_cbor(data)
        reach(node["l"])
        for entry in node["e"]:
            reach(entry["t"])

    reach(root)
    unsigned = {"did": did, "version": 3, "data": root, "rev": rev, "prev": None}
    commit = cbrrr.encode_dag_cbor({**unsigned, "sig": signer.sign(cbrrr.encode_dag_cbor(unsigned))})
    blocks = [(cid_of(commit), commit), *nodes, *record_blocks.items(), *extra_blocks]
    return write_car(cid_of(commit), blocks), expected


def post(i: int) -> dict[str, Any]:
    return {"$type": "app.bsky.feed.post", "text": f"post {i}", "createdAt": "2024-01-01T00:00:00.000Z"}


SYNTH_DID = "did:plc:synthsynthsynthsynth0001"


@pytest.fixture(scope="module")
def synthetic() -> tuple[bytes, dict[str, str], K256Signer]:
    signer = K256Signer(0x1234567)
    records: dict[str, dict[str, Any]] = {}
    for i in range(1500):
        records[f"app.bsky.feed.post/3k{i:011d}"] = post(i)
    for i in range(300):
        records[f"app.bsky.feed.like/3l{i:011d}"] = {
            "$type": "app.bsky.feed.like",
            "subject": {"uri": f"at://did:plc:x/app.bsky.feed.post/{i}", "cid": cbrrr.CID.cidv1_dag_cbor_sha256_32_from(bytes([i % 256]))},
            "createdAt": "2024-01-02T00:00:00Z",
        }
    records["app.bsky.actor.profile/self"] = {"$type": "app.bsky.actor.profile", "displayName": "x"}
    # an unreachable, garbage block: never hashed, never decoded
    junk = (b"\x01\x71\x12\x20" + b"\x00" * 32, b"not cbor at all")
    car, expected = build_repo(SYNTH_DID, records, signer, extra_blocks=(junk,))
    return car, expected, signer


def flip_byte_in_block(car: bytes, cid: bytes, offset: int = 0) -> bytes:
    """Same-length tamper: one byte of `cid`'s block data changed, the CAR stays well formed."""
    root, blocks, _ = split_car(car)
    assert cid in dict(blocks)
    changed = [
        (c, d[:offset] + bytes([d[offset] ^ 0x01]) + d[offset + 1 :] if c == cid else d) for c, d in blocks
    ]
    out = write_car(root, changed)
    assert len(out) == len(car) and out != car
    return out


def doc_key(name: str) -> PublicKey:
    return atproto_key_from_did_doc(json.loads((TESTING / name).read_text()))


# ---- real repos -------------------------------------------------------------------------------

def test_bnewbold_has_38_records_in_9_collections() -> None:
    car = BNEWBOLD.read_bytes()
    snap = parse_repo(car, did=BNEWBOLD_DID, key=None)
    assert (snap.version, snap.rev) == (3, "3ljlyqit2uk2l")
    assert len(snap.records) == 38
    counts = Counter(c for c, _ in snap.records)
    assert len(counts) == 9
    assert counts["app.bsky.feed.post"] == 23
    assert counts["com.atproto.lexicon.schema"] == 5
    assert ("app.bsky.actor.profile", "self") in snap.records
    root, _, _ = split_car(car)
    assert snap.commit_cid == cid_to_str(root)


def _independent_walk(car: bytes) -> tuple[dict[tuple[str, str], str], bytes]:
    """Live records via libipld.decode_car (decodes everything) and a naive recursive walk."""
    header, blocks = libipld.decode_car(car)
    commit = blocks[header["roots"][0]]
    out: dict[tuple[str, str], str] = {}

    def node(cid: bytes) -> None:
        n = blocks[cid]
        if n["l"]:
            node(n["l"])
        prev = b""
        for e in n["e"]:
            key = prev[: e["p"]] + e["k"]
            prev = key
            coll, rkey = key.decode().split("/")
            out[(coll, rkey)] = libipld.encode_cid(e["v"])
            if e["t"]:
                node(e["t"])

    node(commit["data"])
    return out, commit["data"]


@pytest.mark.parametrize(
    ("path", "did", "version"),
    [(BNEWBOLD, BNEWBOLD_DID, 3), (GREENGROUND, GREENGROUND_DID, 3), (DIVY, DIVY_DID, 2), (FAKERMAKER, FAKERMAKER_DID, 2)],
)
def test_walk_matches_an_independent_decode(path: Path, did: str, version: int) -> None:
    car = path.read_bytes()
    snap = parse_repo(car, did=did, key=None)
    expected, data = _independent_walk(car)
    assert snap.records == expected
    assert snap.data_cid == libipld.encode_cid(data)
    assert snap.version == version
    if version == 2:
        assert snap.rev is None


def test_fakermaker_v2_walks_only_live_records() -> None:
    car = FAKERMAKER.read_bytes()
    _, blocks, _ = split_car(car)
    assert len(blocks) == 690  # some blocks are written twice
    assert len(dict(blocks)) == 682  # most of them old commits and stale MST nodes
    snap = parse_repo(car, did=FAKERMAKER_DID, key=None)
    assert len(snap.records) == 142  # + 33 MST nodes + the commit = the 176 reachable blocks
    assert Counter(c for c, _ in snap.records) == {
        "app.bsky.graph.follow": 78, "app.bsky.feed.post": 26, "app.bsky.feed.like": 22,
        "app.bsky.feed.repost": 15, "app.bsky.actor.profile": 1,
    }


def test_greenground_and_divy_verify_against_the_greenground_did_doc() -> None:
    # Surprise in the test data: greenground.didDoc.json is for did:plc:wqgdnq..., yet its key
    # signed both greenground.repo.car (did:plc:kzcqyc...) and divy.repo (did:plc:fz36...).
    key = doc_key("greenground.didDoc.json")
    assert key.curve == "k256"
    assert len(parse_repo(GREENGROUND.read_bytes(), did=GREENGROUND_DID, key=key).records) == 2
    assert len(parse_repo(DIVY.read_bytes(), did=DIVY_DID, key=key).records) == 6


def test_fakermaker_high_s_signature_is_refused() -> None:
    # fakermaker's P-256 commit signature is mathematically valid ECDSA but high-S, which
    # atproto forbids; prove both halves so the refusal is for the right reason.
    key = doc_key("fakermaker.didDoc.json")
    car = FAKERMAKER.read_bytes()
    root, blocks, _ = split_car(car)
    commit = libipld.decode_dag_cbor(dict(blocks)[root])
    sig = commit.pop("sig")
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), key.compressed).verify(
        encode_dss_signature(r, s), libipld.encode_dag_cbor(commit), ec.ECDSA(hashes.SHA256())
    )
    with pytest.raises(SignatureError):
        parse_repo(car, did=FAKERMAKER_DID, key=key)


def test_signature_with_the_wrong_key_is_refused() -> None:
    with pytest.raises(SignatureError) as info:
        parse_repo(GREENGROUND.read_bytes(), did=GREENGROUND_DID, key=doc_key("did_plc_z5vnbioquyhivxirw3bbljmu.didDoc.json"))
    assert info.value.did == GREENGROUND_DID


def test_wrong_expected_did_is_refused() -> None:
    with pytest.raises(RepoError) as info:
        parse_repo(BNEWBOLD.read_bytes(), did="did:plc:someoneelse00000000000000", key=None)
    assert info.value.kind == "did_mismatch"
    assert not isinstance(info.value, SignatureError)


def test_tampered_mst_node_is_refused() -> None:
    car = BNEWBOLD.read_bytes()
    snap = parse_repo(car, did=BNEWBOLD_DID, key=None)
    root_node = libipld.decode_multibase(snap.data_cid)[1]  # binary form of the data CID
    with pytest.raises(RepoError) as info:
        parse_repo(flip_byte_in_block(car, root_node, offset=10), did=BNEWBOLD_DID, key=None)
    assert info.value.kind == "bad_block_hash"


def test_tampered_record_block_is_refused_when_materialized() -> None:
    car = BNEWBOLD.read_bytes()
    snap = parse_repo(car, did=BNEWBOLD_DID, key=None)
    target = ("app.bsky.actor.profile", "self")
    cid = libipld.decode_multibase(snap.records[target])[1]
    bad = parse_repo(flip_byte_in_block(car, cid, offset=5), did=BNEWBOLD_DID, key=None)
    assert bad.records == snap.records  # the record set is authenticated by the MST alone
    with pytest.raises(RepoError) as info:
        materialize(bad, [target])
    assert info.value.kind == "bad_block_hash"
    others = [k for k in bad.records if k != target]
    assert len(materialize(bad, others).record) == 37


def test_tampered_signature_is_refused(synthetic: tuple[bytes, dict[str, str], K256Signer]) -> None:
    car, _, signer = synthetic
    root, blocks, _ = split_car(car)
    commit = cbrrr.decode_dag_cbor(dict(blocks)[root])
    assert parse_repo(car, did=SYNTH_DID, key=signer.public).rev == commit["rev"]
    sig = bytearray(commit["sig"])
    sig[7] ^= 0x40
    forged = cbrrr.encode_dag_cbor({**commit, "sig": bytes(sig)})
    forged_car = write_car(cid_of(forged), [(cid_of(forged), forged), *[b for b in blocks if b[0] != root]])
    with pytest.raises(SignatureError):
        parse_repo(forged_car, did=SYNTH_DID, key=signer.public)
    # the same bytes are accepted when no key is asked for (verify=False deployments)
    assert len(parse_repo(forged_car, did=SYNTH_DID, key=None).records) == 1801


def test_truncated_at_every_block_boundary_is_missing_block() -> None:
    car = BNEWBOLD.read_bytes()
    _, _, ends = split_car(car)
    for end in ends[:-1]:
        with pytest.raises(RepoError) as info:
            parse_repo(car[:end], did=BNEWBOLD_DID, key=None)
        assert info.value.kind == "missing_block", end
        assert not isinstance(info.value, CarError)


def test_truncated_mid_block_is_car_error() -> None:
    car = BNEWBOLD.read_bytes()
    _, _, ends = split_car(car)
    for end in (ends[1] - 1, ends[10] + 20, len(car) - 1, 3):
        with pytest.raises(CarError):
            parse_repo(car[:end], did=BNEWBOLD_DID, key=None)


def test_not_a_car_is_car_error() -> None:
    with pytest.raises(CarError):
        parse_repo(b"\x05hello world", did=BNEWBOLD_DID, key=None)


# ---- materialize ----------------------------------------------------------------------------

def _same(json_value: Any, ipld_value: Any, cbrrr_value: Any) -> None:
    """atproto JSON vs libipld (links as bytes) vs cbrrr (links as CID objects)."""
    if isinstance(cbrrr_value, cbrrr.CID):
        assert json_value == {"$link": libipld.encode_cid(ipld_value)} == {"$link": cbrrr_value.encode()}
    elif isinstance(cbrrr_value, bytes):
        assert set(json_value) == {"$bytes"}
        assert base64.b64decode(json_value["$bytes"] + "==") == ipld_value == cbrrr_value
    elif isinstance(cbrrr_value, dict):
        assert set(json_value) == set(ipld_value) == set(cbrrr_value)
        for k in cbrrr_value:
            _same(json_value[k], ipld_value[k], cbrrr_value[k])
    elif isinstance(cbrrr_value, list):
        assert len(json_value) == len(ipld_value) == len(cbrrr_value)
        for a, b, c in zip(json_value, ipld_value, cbrrr_value):
            _same(a, b, c)
    else:
        assert json_value == ipld_value == cbrrr_value


@pytest.mark.parametrize(("path", "did"), [(BNEWBOLD, BNEWBOLD_DID), (FAKERMAKER, FAKERMAKER_DID)])
def test_materialize_links_are_exact(path: Path, did: str) -> None:
    car = path.read_bytes()
    snap = parse_repo(car, did=did, key=None)
    keys = sorted(snap.records)
    cols = materialize(snap, keys)
    assert (cols.collection, cols.rkey) == ([c for c, _ in keys], [r for _, r in keys])
    assert cols.cid == [snap.records[k] for k in keys]
    _, decoded = libipld.decode_car(car)
    raw = dict(split_car(car)[1])
    links = 0
    for key, cid, text, created in zip(keys, cols.cid, cols.record, cols.created_at):
        cid_bytes = libipld.decode_multibase(cid)[1]
        assert text is not None
        _same(json.loads(text), decoded[cid_bytes], cbrrr.decode_dag_cbor(raw[cid_bytes]))
        links += text.count('"$link"')
        value = json.loads(text).get("createdAt")
        assert created == (value if created is not None else created)
    assert links > 0


def test_profile_blob_link_is_exact() -> None:
    snap = parse_repo(BNEWBOLD.read_bytes(), did=BNEWBOLD_DID, key=None)
    cols = materialize(snap, [("app.bsky.actor.profile", "self")])
    record = json.loads(cols.record[0])
    assert record["avatar"]["ref"] == {"$link": "bafkreif6m4szk2vccbzl7zf5mm33ifs3ugxuwbxlbku3dj75bczfc7gqiy"}
    assert record["avatar"]["size"] == 224248


# ---- repos built by atmst ---------------------------------------------------------------------

def test_atmst_repo_round_trips(synthetic: tuple[bytes, dict[str, str], K256Signer]) -> None:
    car, expected, signer = synthetic
    snap = parse_repo(car, did=SYNTH_DID, key=signer.public)
    assert isinstance(snap, RepoSnapshot)
    assert {f"{c}/{r}": cid for (c, r), cid in snap.records.items()} == expected
    cols = materialize(snap, [("app.bsky.feed.post", "3k00000000042")])
    assert json.loads(cols.record[0])["text"] == "post 42"
    assert cols.created_at == ["2024-01-01T00:00:00.000Z"]
    like = materialize(snap, [("app.bsky.feed.like", "3l00000000007")])
    assert json.loads(like.record[0])["subject"]["cid"] == {
        "$link": cbrrr.CID.cidv1_dag_cbor_sha256_32_from(bytes([7])).encode()
    }


def test_p256_signed_repo_verifies() -> None:
    signer = P256Signer(0xC0FFEE)
    car, expected = build_repo("did:plc:p256p256p256p256p256p256", {f"app.bsky.feed.post/3k{i:011d}": post(i) for i in range(50)}, signer)
    snap = parse_repo(car, did="did:plc:p256p256p256p256p256p256", key=parse_public_key(signer.public.did_key()))
    assert len(snap.records) == 50 == len(expected)
    with pytest.raises(SignatureError):
        parse_repo(car, did="did:plc:p256p256p256p256p256p256", key=K256Signer(5).public)


def test_empty_repo_has_no_records() -> None:
    signer = K256Signer(99)
    car, _ = build_repo("did:plc:emptyemptyemptyempty0000", {}, signer)
    snap = parse_repo(car, did="did:plc:emptyemptyemptyempty0000", key=signer.public)
    assert snap.records == {}


def test_missing_record_block_is_missing_block(synthetic: tuple[bytes, dict[str, str], K256Signer]) -> None:
    car, expected, signer = synthetic
    root, blocks, _ = split_car(car)
    gone = libipld.decode_multibase(expected["app.bsky.feed.post/3k00000000100"])[1]
    holed = write_car(root, [b for b in blocks if b[0] != gone])
    with pytest.raises(RepoError) as info:
        parse_repo(holed, did=SYNTH_DID, key=signer.public)
    assert info.value.kind == "missing_block"


def _hand_built(
    entries: list[dict[str, Any]], signer: K256Signer, did: str = "did:plc:handhandhandhandhand0000", *, left: Any = None
) -> bytes:
    """A one-node MST written by hand (entries as given, not validated by any library)."""
    record = cbrrr.encode_dag_cbor(post(1))
    rcid = cbrrr.CID(cid_of(record))
    node = cbrrr.encode_dag_cbor({"l": left, "e": [{"v": rcid, "t": None, **e} for e in entries]})
    unsigned = {"did": did, "version": 3, "data": cbrrr.CID(cid_of(node)), "rev": "3lbbbbbbbbbb2", "prev": None}
    commit = cbrrr.encode_dag_cbor({**unsigned, "sig": signer.sign(cbrrr.encode_dag_cbor(unsigned))})
    return write_car(cid_of(commit), [(cid_of(commit), commit), (cid_of(node), node), (bytes(rcid), record)])


@pytest.mark.parametrize(
    ("entries", "kind"),
    [
        ([{"p": 0, "k": b"app.bsky.feed.post/b"}, {"p": 0, "k": b"app.bsky.feed.post/a"}], "mst_unsorted"),
        ([{"p": 0, "k": b"app.bsky.feed.post/a"}, {"p": 19, "k": b"a"}], "mst_unsorted"),  # duplicate key
        ([{"p": 0, "k": b"no-slash-here"}], "bad_mst_key"),
        ([{"p": 0, "k": b"app.bsky.feed.post/a/b"}], "bad_mst_key"),
        ([{"p": 0, "k": b"app.bsky.feed.post/"}], "bad_mst_key"),
        ([{"p": 0, "k": b"/3k2a"}], "bad_mst_key"),
        ([{"p": 0, "k": b"app.bsky.feed.post/.."}], "bad_mst_key"),
        ([{"p": 0, "k": b"app.bsky.feed.post/a\napp.bsky.feed.post/b"}], "bad_mst_key"),
        ([{"p": 0, "k": b"app.bsky.feed.post/a b"}], "bad_mst_key"),
        ([{"p": 0, "k": b"app_bsky.feed.post/a"}], "bad_mst_key"),
        ([{"p": 3, "k": b"app.bsky.feed.post/a"}], "bad_mst_node"),  # prefix longer than the previous key
        ([{"p": 0, "k": "app.bsky.feed.post/a"}], "bad_mst_node"),  # key is text, not bytes
        ([{"p": 0, "k": b"app.bsky.feed.post/a", "t": "bafyreinotacid"}], "bad_mst_node"),
        ([{"p": 0, "k": b"app.bsky.feed.post/a", "t": 7}], "bad_mst_node"),
        ([{"p": 0, "k": b"app.bsky.feed.post/a", "v": b"\x01\x71\x12\x20" + b"\x00" * 31}], "bad_mst_node"),
        ([{"p": 0, "k": b"app.bsky.feed.post/a", "v": None}], "bad_mst_node"),
        ([{"p": 0, "k": b"app.bsky.feed.post/a", "v": cbrrr.CID(b"\x01\x55\x12\x20" + b"\x00" * 32)}], "bad_mst_node"),
        ([{"p": 0, "k": b"app.bsky.feed.post/a", "t": cbrrr.CID(b"\x01\x71\x12\x20" + b"\x00" * 32)}], "missing_block"),
    ],
)
def test_malformed_mst_is_refused(entries: list[dict[str, Any]], kind: str) -> None:
    signer = K256Signer(7)
    with pytest.raises(RepoError) as info:
        parse_repo(_hand_built(entries, signer), did="did:plc:handhandhandhandhand0000", key=signer.public)
    assert info.value.kind == kind


def test_left_link_that_is_not_a_cid_is_refused() -> None:
    signer = K256Signer(7)
    car = _hand_built([{"p": 0, "k": b"app.bsky.feed.post/a"}], signer, left=12)
    with pytest.raises(RepoError) as info:
        parse_repo(car, did="did:plc:handhandhandhandhand0000", key=signer.public)
    assert info.value.kind == "bad_mst_node"


def test_hand_built_valid_node_parses() -> None:
    signer = K256Signer(7)
    car = _hand_built([{"p": 0, "k": b"app.bsky.feed.post/a"}, {"p": 19, "k": b"b"}], signer)
    snap = parse_repo(car, did="did:plc:handhandhandhandhand0000", key=signer.public)
    assert set(snap.records) == {("app.bsky.feed.post", "a"), ("app.bsky.feed.post", "b")}


# ---- hostile repos (issue 9, item 8) ---------------------------------------------------------

HOSTILE_DID = "did:plc:hostilehostilehostile000"


def _signed(data: bytes, blocks: list[bytes], signer: K256Signer, did: str = HOSTILE_DID) -> bytes:
    """A signed v3 commit over MST root `data` (binary CID), then `blocks` (each under its CID)."""
    unsigned = {"did": did, "version": 3, "data": cbrrr.CID(data), "rev": "3lbbbbbbbbbb2", "prev": None}
    commit = cbrrr.encode_dag_cbor({**unsigned, "sig": signer.sign(cbrrr.encode_dag_cbor(unsigned))})
    return write_car(cid_of(commit), [(cid_of(commit), commit), *[(cid_of(b), b) for b in blocks]])


def _node(left: bytes | None, entries: list[tuple[int, bytes, bytes, bytes | None]]) -> bytes:
    """A real DAG-CBOR MST node: entries are (p, k, v, t), links given as binary CIDs."""
    link = lambda c: None if c is None else cbrrr.CID(c)  # noqa: E731
    return cbrrr.encode_dag_cbor(
        {"l": link(left), "e": [{"p": p, "k": k, "v": cbrrr.CID(v), "t": link(t)} for p, k, v, t in entries]}
    )


def _dag_bomb(levels: int, signer: K256Signer) -> bytes:
    """The issue's repo: each node links its child twice (as `l` and as its entry's `t`), so a
    walk that follows links without remembering them makes 2^levels visits."""
    record = cbrrr.encode_dag_cbor(post(0))
    rcid = cid_of(record)
    blocks = [record]
    child = None
    for i in range(levels):
        node = _node(child, [(0, f"app.bsky.feed.post/3k{i:011d}".encode(), rcid, child)])
        blocks.append(node)
        child = cid_of(node)
    assert child is not None
    return _signed(child, blocks, signer)


@pytest.mark.parametrize("levels", [2, 22, 40])
def test_mst_whose_nodes_link_their_child_twice_is_refused(levels: int) -> None:
    # 40 levels: a 9 KB CAR that took 2.2 GB and 43 s before the process died
    signer = K256Signer(8)
    car = _dag_bomb(levels, signer)
    assert len(car) < 300 + 220 * levels  # 40 levels: 9 KB
    for key in (signer.public, None):
        with pytest.raises(RepoError) as info:
            parse_repo(car, did=HOSTILE_DID, key=key)
        assert info.value.kind == "mst_revisit"


def test_deferred_walk_of_a_dag_is_refused_on_first_use() -> None:
    signer = K256Signer(8)
    car = _dag_bomb(40, signer)
    root, blocks, _ = split_car(car)
    data = libipld.decode_dag_cbor(dict(blocks)[root])["data"]
    snap = parse_repo(car, did=HOSTILE_DID, key=signer.public, defer_walk_if_data=cid_to_str(data))
    with pytest.raises(RepoError) as info:
        snap.records
    assert info.value.kind == "mst_revisit"


def test_two_entries_sharing_one_subtree_are_refused() -> None:
    signer = K256Signer(8)
    record = cbrrr.encode_dag_cbor(post(0))
    rcid = cid_of(record)
    leaf = _node(None, [(0, b"app.bsky.feed.post/3k00000000005", rcid, None)])
    top = _node(None, [(0, b"app.bsky.feed.post/3k00000000001", rcid, cid_of(leaf)),
                       (28, b"9", rcid, cid_of(leaf))])
    with pytest.raises(RepoError) as info:
        parse_repo(_signed(cid_of(top), [top, leaf, record], signer), did=HOSTILE_DID, key=signer.public)
    assert info.value.kind == "mst_revisit"


def test_prefix_compressed_keys_cannot_grow_quadratically() -> None:
    # each entry reuses the whole previous key and adds one byte: 20,000 entries in a 0.9 MB
    # node would rebuild 200 MB of keys; the walk stops at the first key longer than 830 bytes
    signer = K256Signer(8)
    record = cbrrr.encode_dag_cbor(post(0))
    rcid = cid_of(record)
    first = b"app.bsky.feed.post/a"
    entries = [(0, first, rcid, None)] + [(len(first) + i, b"a", rcid, None) for i in range(20_000)]
    node = _node(None, entries)
    car = _signed(cid_of(node), [node, record], signer)
    tracemalloc.start()
    try:
        with pytest.raises(RepoError) as info:
            parse_repo(car, did=HOSTILE_DID, key=signer.public)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.kind == "bad_mst_key"
    assert peak < 20 * len(car)  # the decoded node and the keys up to the refusal, not 200 MB


def _one_node(node: Any, signer: K256Signer) -> bytes:
    """A repo whose MST root is `node`, any DAG-CBOR value (CID objects for links)."""
    record = cbrrr.encode_dag_cbor(post(1))
    raw = cbrrr.encode_dag_cbor(node)
    return _signed(cid_of(raw), [raw, record], signer)


_RCID = cbrrr.CID(cid_of(cbrrr.encode_dag_cbor(post(1))))
_GOOD_ENTRY = {"p": 0, "k": b"app.bsky.feed.post/a", "v": _RCID, "t": None}


@pytest.mark.parametrize(
    "node",
    [
        {"e": {}, "l": None},  # the issue's "empty repo"
        {"e": None, "l": None},
        {"e": b"", "l": None},
        {"l": None},
        {"e": []},
        {"e": [], "l": None, "x": 1},
        [[], None],
        {"e": [[0, b"app.bsky.feed.post/a", _RCID, None]], "l": None},
        {"e": [{**_GOOD_ENTRY, "x": None}], "l": None},
        {"e": [{"p": 0, "k": b"app.bsky.feed.post/a", "v": _RCID}], "l": None},
        {"e": [{**_GOOD_ENTRY, "p": True}], "l": None},
        {"e": [{**_GOOD_ENTRY, "p": -1}], "l": None},
        {"e": [{**_GOOD_ENTRY, "p": 1.0}], "l": None},
        {"e": [{**_GOOD_ENTRY, "p": "0"}], "l": None},
        {"e": [{**_GOOD_ENTRY, "k": 5}], "l": None},
        {"e": [_GOOD_ENTRY], "l": b"\x01\x71\x12\x20" + b"\x00" * 20},  # bytes, not a 36-byte link
        {"e": [_GOOD_ENTRY], "l": cbrrr.CID(b"\x01\x71\x12\x20\x00")},  # a link too short for a digest
    ],
)
def test_mst_node_of_the_wrong_shape_is_refused(node: Any) -> None:
    signer = K256Signer(7)
    with pytest.raises(RepoError) as info:
        parse_repo(_one_node(node, signer), did=HOSTILE_DID, key=signer.public)
    assert info.value.kind == "bad_mst_node"


@pytest.mark.parametrize(
    "keys",
    [
        [b"1bad.collection/x"],  # the issue's key: the collection is no NSID
        [b"app.bsky/x"],  # two segments
        [b"app.bsky.feed.post-/x"],  # the name segment has a hyphen
        [b"app.-bsky.feed.post/x"],
        [b""],  # an empty key
        [b"", b"app.bsky.feed.post/a"],
        [b"app.bsky.feed.post/a", b"app.bsky.feed.post/a" + b"b" * 900],  # longer than any key
    ],
)
def test_invalid_keys_are_refused(keys: list[bytes]) -> None:
    signer = K256Signer(7)
    entries = [{"p": 0, "k": k, "v": _RCID, "t": None} for k in keys]
    with pytest.raises(RepoError) as info:
        parse_repo(_one_node({"e": entries, "l": None}, signer), did=HOSTILE_DID, key=signer.public)
    assert info.value.kind == "bad_mst_key"


def test_keys_out_of_order_across_subtrees_are_refused() -> None:
    signer = K256Signer(7)
    record = cbrrr.encode_dag_cbor(post(1))
    rcid = cid_of(record)
    # the left subtree holds a key greater than its parent's first entry
    left = _node(None, [(0, b"app.bsky.feed.post/z", rcid, None)])
    top = _node(cid_of(left), [(0, b"app.bsky.feed.post/m", rcid, None)])
    with pytest.raises(RepoError) as info:
        parse_repo(_signed(cid_of(top), [top, left, record], signer), did=HOSTILE_DID, key=signer.public)
    assert info.value.kind == "mst_unsorted"
    # and the well-ordered tree of the same shape parses
    left = _node(None, [(0, b"app.bsky.feed.post/a", rcid, None)])
    top = _node(cid_of(left), [(0, b"app.bsky.feed.post/m", rcid, None)])
    snap = parse_repo(_signed(cid_of(top), [top, left, record], signer), did=HOSTILE_DID, key=signer.public)
    assert sorted(snap.records) == [("app.bsky.feed.post", "a"), ("app.bsky.feed.post", "m")]


def _nested(depth: int) -> bytes:
    """DAG-CBOR of `depth` nested one-element arrays around 0 (1 byte per level)."""
    return b"\x81" * depth + b"\x00"


def _car_with_header(header: bytes, rest: bytes = b"") -> bytes:
    return varint(len(header)) + header + rest


@pytest.mark.parametrize("depth", [3_000, 100_000])
def test_deeply_nested_car_header_is_a_car_error(depth: int) -> None:
    # {"roots": [[[[...]]]], "version": 1}
    header = b"\xa2\x65roots\x81" + _nested(depth) + b"\x67version\x01"
    car = _car_with_header(header, BNEWBOLD.read_bytes()[60:])
    for hint in (None, "bafyreiabc"):
        with pytest.raises(CarError) as info:
            parse_repo(car, did=BNEWBOLD_DID, key=None, defer_walk_if_data=hint)
        assert info.value.kind == ("car_too_deep" if depth < 60_000 else "car_malformed")


@pytest.mark.parametrize("depth", [3_000, 100_000])
def test_deeply_nested_mst_node_is_refused(depth: int) -> None:
    signer = K256Signer(7)
    node = _nested(depth)
    with pytest.raises(RepoError) as info:
        parse_repo(_signed(cid_of(node), [node], signer), did=HOSTILE_DID, key=signer.public)
    assert info.value.kind == "too_deep"


@pytest.mark.parametrize("depth", [3_000, 100_000])
def test_deeply_nested_commit_is_refused(depth: int) -> None:
    commit = _nested(depth)
    car = write_car(cid_of(commit), [(cid_of(commit), commit)])
    for hint in (None, "bafyreiabc"):
        with pytest.raises(RepoError) as info:
            parse_repo(car, did=HOSTILE_DID, key=None, defer_walk_if_data=hint)
        assert info.value.kind == "too_deep"


@pytest.mark.parametrize("depth", [300, 3_000, 100_000])
def test_deeply_nested_record_is_kept_without_body(depth: int) -> None:
    signer = K256Signer(7)
    shallow = cbrrr.encode_dag_cbor({"$type": "app.bsky.feed.post", "text": "x"})
    # {"z": [[[...0...]]], "text": "x", "$type": ...}: keys in canonical (length-first) order
    record = b"\xa3\x61z" + _nested(depth) + shallow[1:]
    assert cbrrr.decode_dag_cbor(record)["text"] == "x"
    node = _node(None, [(0, b"app.bsky.feed.post/a", cid_of(record), None),
                        (19, b"b", cid_of(cbrrr.encode_dag_cbor(post(1))), None)])
    car = _signed(cid_of(node), [node, record, cbrrr.encode_dag_cbor(post(1))], signer)
    snap = parse_repo(car, did=HOSTILE_DID, key=signer.public)
    cols = materialize(snap, sorted(snap.records))
    assert cols.rkey == ["a", "b"]
    assert cols.record[0] is None
    assert json.loads(cols.record[1] or "")["text"] == "post 1"


# ---- skyfill.car bounds ---------------------------------------------------------------------

def _header_car(header: Any) -> bytes:
    raw = cbrrr.encode_dag_cbor(header)
    return varint(len(raw)) + raw


@pytest.mark.parametrize(
    ("car", "kind"),
    [
        (_header_car({"version": True, "roots": []}), "car_malformed"),  # True == 1 in Python
        (_header_car({"version": 1, "roots": [b"\x01"]}), "car_malformed"),
        (_header_car({"version": 1, "roots": ["bafyrei"]}), "car_malformed"),
        (_header_car({"version": 1, "roots": [cbrrr.CID(b"\x01\x71\x12\x20" + b"\x00" * 32)] * 65}), "car_malformed"),
        (_header_car({"version": 1, "roots": [], "pad": b"\x00" * 70_000}), "car_malformed"),  # > 64 KiB
        (b"\xff" * 11, "car_malformed"),  # a varint longer than 64 bits
        # a block whose CIDv1 claims a 2^53-byte digest
        (_header_car({"version": 1, "roots": []}) + b"\x0f\x01\x71\x12" + b"\x80" * 7 + b"\x10" + b"\x00" * 4, "car_malformed"),
    ],
)
def test_read_car_bounds(car: bytes, kind: str) -> None:
    with pytest.raises(CarError) as info:
        read_car(car)
    assert info.value.kind == kind


def test_verify_block_checks_the_hash_function() -> None:
    block = cbrrr.encode_dag_cbor(post(1))
    digest = hashlib.sha256(block).digest()
    assert verify_block(b"\x01\x71\x12\x20" + digest, block)
    assert verify_block(b"\x01\x55\x12\x20" + digest, block)  # raw codec (blobs)
    assert verify_block(b"\x12\x20" + digest, block)  # CIDv0
    assert not verify_block(b"\x01\x71\x12\x20" + digest, block + b"x")
    # the same 32 bytes named as another hash function, or a non-CIDv1, are not a match
    assert not verify_block(b"\x01\x71\x13\x20" + digest, block)  # sha2-512 code
    assert not verify_block(b"\x01\x71\x00\x20" + digest, block)  # identity code
    assert not verify_block(b"\x00\x71\x12\x20" + digest, block)
    assert not verify_block(b"\x01\x71\x12\x20" + digest[:31], block)


def test_one_big_record_named_by_thousands_of_keys_is_refused() -> None:
    # identical records may share a block, but 20,000 keys naming one 300 KB body (a 1.5 MB
    # CAR) would materialize 6 GB of JSON and rows
    signer = K256Signer(7)
    record = cbrrr.encode_dag_cbor({**post(0), "text": "x" * 300_000})
    rcid = cid_of(record)
    entries = [(0, b"app.bsky.feed.post/00000000", rcid, None)]
    entries += [(19, f"{i:08d}".encode(), rcid, None) for i in range(1, 20_000)]
    node = _node(None, entries)
    car = _signed(cid_of(node), [node, record], signer)
    assert len(car) < 1_600_000
    with pytest.raises(RepoError) as info:
        parse_repo(car, did=HOSTILE_DID, key=signer.public)
    assert info.value.kind == "record_amplification"
    # a few identical records sharing a block are fine
    node = _node(None, entries[:3])
    snap = parse_repo(_signed(cid_of(node), [node, record], signer), did=HOSTILE_DID, key=signer.public)
    assert len(set(snap.records.values())) == 1 and len(snap.records) == 3
