"""The benchmark data generator, its local servers and the harness.

Everything the generator emits is checked with independent decoders: the atproto SDK for
frames and CARs, `atmst` (a separate MST implementation) for tree roots and walks, coincurve
for signatures.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import cbrrr
import coincurve
import httpx
import libipld
import pytest
import websockets
from atmst.blockstore import MemoryBlockStore
from atmst.blockstore.car_file import ReadOnlyCARBlockStore
from atmst.mst.node_store import NodeStore
from atmst.mst.node_walker import NodeWalker
from atmst.mst.node_wrangler import NodeWrangler
from atproto import CAR, firehose_models, models, parse_subscribe_repos_message
from coincurve.ecdsa import cdata_to_der, deserialize_compact
from websockets.sync.client import connect

from tests.support.generate import (
    COLLECTION_WEIGHTS,
    Tree,
    World,
    cid_for,
    did_document,
    generate_frames,
    generate_repo,
    iter_repo_car,
    make_identity,
)
from tests.support.generate.repo import _draw_records
from bench.servers import FirehoseServer, RepoServer
from skyfill.protocol.car import read_car, verify_block
from skyfill.protocol.records import is_valid_datetime

ROOT = Path(__file__).resolve().parents[1]
DID_RE = re.compile(r"^did:plc:[a-z2-7]{24}$")
TID_RE = re.compile(r"^[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}$")
HALF_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141 // 2


def decode_frame(frame: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    header, body = libipld.decode_dag_cbor_multi(frame)
    return header, body


def commit_of(body: dict[str, Any]) -> dict[str, Any]:
    roots, blocks = read_car(body["blocks"])
    assert roots == [body["commit"]]
    return libipld.decode_dag_cbor(blocks[body["commit"]])


def verify_commit(commit_block: bytes, doc: dict[str, Any]) -> bool:
    """Check a signed commit against the DID document's #atproto key, as a consumer would."""
    commit = cbrrr.decode_dag_cbor(commit_block)
    sig = commit.pop("sig")
    assert len(sig) == 64 and int.from_bytes(sig[32:], "big") <= HALF_ORDER  # compact, low-S
    method = next(m for m in doc["verificationMethod"] if m["id"].endswith("#atproto"))
    multicodec = libipld.decode_multibase(method["publicKeyMultibase"])[1]
    assert multicodec[:2] == b"\xe7\x01"
    public = coincurve.PublicKey(multicodec[2:])
    digest = hashlib.sha256(cbrrr.encode_dag_cbor(commit)).digest()
    return public.verify(cdata_to_der(deserialize_compact(sig)), digest, hasher=None)


def atmst_records(car: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(commit, {key: record cid}) walked by atmst from the CAR's signed root."""
    bs = ReadOnlyCARBlockStore(io.BytesIO(car))
    commit = cbrrr.decode_dag_cbor(bs.get_block(bytes(bs.car_root)))
    walker = NodeWalker(NodeStore(bs), commit["data"])
    return commit, {k: bytes(v) for k, v in walker.iter_kv()}


# -- determinism --------------------------------------------------------------------------


def test_same_seed_gives_same_bytes_and_another_seed_does_not() -> None:
    a = list(generate_frames(7, n_dids=10, n_frames=200))
    b = list(generate_frames(7, n_dids=10, n_frames=200))
    c = list(generate_frames(8, n_dids=10, n_frames=200))
    assert a == b
    assert a != c
    ident = make_identity(random.Random(3))
    repo1 = generate_repo(5, did=ident.did, key=ident.secret, n_records=300)
    assert repo1 == generate_repo(5, did=ident.did, key=ident.secret, n_records=300)
    assert repo1 == b"".join(iter_repo_car(5, did=ident.did, key=ident.secret, n_records=300))
    assert repo1 != generate_repo(6, did=ident.did, key=ident.secret, n_records=300)


# -- identities ---------------------------------------------------------------------------


def test_identity_and_did_document_are_well_formed() -> None:
    ident = make_identity(random.Random(11))
    assert DID_RE.match(ident.did)
    doc = did_document(ident, "http://127.0.0.1:1234/")
    assert doc["id"] == ident.did
    assert doc["alsoKnownAs"] == [f"at://{ident.handle}"]
    (method,) = doc["verificationMethod"]
    assert method["id"] == f"{ident.did}#atproto" and method["type"] == "Multikey"
    assert method["publicKeyMultibase"].startswith("zQ3s")  # base58btc of 0xe7 0x01 + point
    base, raw = libipld.decode_multibase(method["publicKeyMultibase"])
    assert base == "z" and raw == b"\xe7\x01" + ident.public_key
    (service,) = doc["service"]
    assert service == {
        "id": "#atproto_pds",
        "type": "AtprotoPersonalDataServer",
        "serviceEndpoint": "http://127.0.0.1:1234",
    }


# The atproto handle syntax (atproto.com/specs/handle), and the TLDs the reference refuses at
# registration; `.test` is reserved for testing and explicitly allowed.
HANDLE_RE = re.compile(r"^([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$")
DISALLOWED_TLDS = (".local", ".arpa", ".invalid", ".localhost", ".internal", ".example", ".alt", ".onion")


def test_generated_handles_are_valid_atproto_handles() -> None:
    world = World(1, n_dids=1000, retain_blocks=False)
    handles = [i.handle for i in world.identities]
    for handle in handles:
        assert len(handle) <= 253 and HANDLE_RE.match(handle), handle
        assert not handle.endswith(DISALLOWED_TLDS), handle
    assert handles == [i.handle for i in World(1, n_dids=1000, retain_blocks=False).identities]


# -- MST ----------------------------------------------------------------------------------


def test_mst_matches_atmst_through_random_puts_and_deletes() -> None:
    rng = random.Random(5)
    for trial in range(12):
        ns = NodeStore(MemoryBlockStore())
        wrangler = NodeWrangler(ns)
        ref_root = ns.get_node(None).cid
        tree = Tree()
        live: dict[bytes, bytes] = {}
        for _ in range(rng.randint(1, 300)):
            if live and rng.random() < 0.3:
                key = rng.choice(sorted(live))
                del live[key]
                ref_root = wrangler.del_record(ref_root, key.decode())
                assert tree.delete(key)
            else:
                coll = rng.choice(["app.bsky.feed.like", "app.bsky.feed.post", "app.bsky.graph.follow"])
                key = f"{coll}/3k{rng.randrange(10**9):011d}".encode()
                live[key] = cid_for(rng.randbytes(8))
                ref_root = wrangler.put_record(ref_root, key.decode(), cbrrr.CID(live[key]))
                tree.put(key, live[key])
            if rng.random() < 0.25:
                assert tree.seal()[0] == bytes(ref_root), trial
        root, _ = tree.seal()
        assert root == bytes(ref_root)
        assert Tree.build(sorted(live.items())).seal()[0] == root
        assert list(tree.items()) == sorted(live.items())
        for cid, block in tree.blocks():  # hand-rolled encoding is canonical DAG-CBOR
            assert cbrrr.encode_dag_cbor(cbrrr.decode_dag_cbor(block)) == block
            assert cid_for(block) == cid


# -- repos --------------------------------------------------------------------------------


def test_repo_walks_to_exactly_its_records_and_its_signature_verifies() -> None:
    ident = make_identity(random.Random(21))
    car = generate_repo(9, did=ident.did, key=ident.key, n_records=700)

    sdk_car = CAR.from_bytes(car)  # the SDK accepts it
    assert str(sdk_car.root) == libipld.encode_cid(read_car(car)[0][0])

    commit, walked = atmst_records(car)
    assert commit["did"] == ident.did and commit["version"] == 3 and commit["prev"] is None
    assert TID_RE.match(commit["rev"])
    _roots, blocks = read_car(car)
    assert verify_commit(blocks[read_car(car)[0][0]], did_document(ident, "http://pds.invalid"))

    # the records the generator drew (same sub-seed as generate_repo uses)
    sub_seed = random.Random(9).getrandbits(64)
    expected = {k.decode(): (cid, block) for k, block, cid in _draw_records(sub_seed, 700, None)}
    assert len(expected) == 700
    assert walked == {k: cid for k, (cid, _) in expected.items()}
    for key, (cid, block) in expected.items():
        assert blocks[cid] == block and verify_block(cid, block)
        record = libipld.decode_dag_cbor(block)
        collection, rkey = key.split("/")
        assert record["$type"] == collection
        assert rkey == "self" if collection == "app.bsky.actor.profile" else TID_RE.match(rkey)
        assert is_valid_datetime(record["createdAt"])
        assert models.get_or_create(record, strict=False) is not None

    # a bad signature is caught by the same check (the check can fail)
    forged = cbrrr.decode_dag_cbor(blocks[read_car(car)[0][0]])
    forged["rev"] = "2222222222222"
    assert not verify_commit(cbrrr.encode_dag_cbor(forged), did_document(ident, "http://pds.invalid"))


# -- firehose -----------------------------------------------------------------------------


def test_frames_decode_with_the_atproto_sdk() -> None:
    frames = list(generate_frames(3, n_dids=30, n_frames=1500))
    kinds: Counter[str] = Counter()
    for frame in frames:
        message = parse_subscribe_repos_message(firehose_models.Frame.from_bytes(frame))
        kinds[type(message).__name__] += 1
        if not isinstance(message, models.ComAtprotoSyncSubscribeRepos.Commit):
            continue
        car = CAR.from_bytes(message.blocks)
        assert str(car.root) == str(message.commit)
        assert TID_RE.match(message.rev) and TID_RE.match(message.since or "")
        assert is_valid_datetime(message.time)
        for op in message.ops:
            if op.action == "delete":
                assert op.cid is None
                continue
            record = models.get_or_create(car.blocks.get(op.cid), strict=False)
            assert record is not None
            assert op.path.split("/")[0] == record.py_type
    assert kinds["Commit"] > 1400
    assert kinds["Identity"] + kinds["Account"] > 0


def test_frames_have_realistic_proportions() -> None:
    actions: Counter[str] = Counter()
    creates: Counter[str] = Counter()
    for frame in generate_frames(4, n_dids=100, n_frames=8000):
        header, body = decode_frame(frame)
        if header["t"] != "#commit":
            continue
        for op in body["ops"]:
            actions[op["action"]] += 1
            if op["action"] != "delete":
                creates[op["path"].split("/")[0]] += 1
    total_ops = sum(actions.values())
    assert 0.04 <= actions["delete"] / total_ops <= 0.09
    total = sum(creates.values())
    share = {c: creates[c] / total for c in COLLECTION_WEIGHTS}
    assert 0.50 <= share["app.bsky.feed.like"] <= 0.60
    assert 0.12 <= share["app.bsky.graph.follow"] <= 0.18
    assert 0.12 <= share["app.bsky.feed.post"] <= 0.18
    assert 0.07 <= share["app.bsky.feed.repost"] <= 0.13


def test_chains_are_intact_and_each_commit_is_invertible_from_its_own_blocks() -> None:
    world = World(12, n_dids=8)
    docs = {i.did: did_document(i, "http://pds.invalid") for i in world.identities}
    # state before the first frame: what getRepo would have served
    held: dict[str, dict[str, bytes]] = {}
    heads: dict[str, tuple[str, bytes]] = {}
    for did in world.dids:
        commit, records = atmst_records(world.repo_car(did))
        held[did] = records
        heads[did] = (commit["rev"], bytes(commit["data"]))
        assert (commit["rev"], bytes(commit["data"])) == (world.head(did)[0], world.head(did)[2])

    last_seq = 0
    commits = 0
    for frame in world.frames(600):
        header, body = decode_frame(frame)
        assert body["seq"] > last_seq
        last_seq = body["seq"]
        if header["t"] != "#commit":
            continue
        commits += 1
        did = body["repo"]
        prev_rev, prev_data = heads[did]
        assert body["since"] == prev_rev
        assert body["prevData"] == prev_data
        assert body["rev"] > prev_rev

        roots, blocks = read_car(body["blocks"])
        assert all(verify_block(c, b) for c, b in blocks.items())
        commit = libipld.decode_dag_cbor(blocks[body["commit"]])
        assert commit["rev"] == body["rev"] and commit["did"] == did
        assert verify_commit(blocks[body["commit"]], docs[did])
        assert commit["data"] in blocks  # the new MST root travels with the frame

        # apply the ops to what we hold; an independent MST build must reach `data`
        records = held[did]
        for op in body["ops"]:
            path = op["path"]
            if op["action"] == "create":
                assert path not in records and "prev" not in op
            else:
                assert records[path] == op["prev"]
            if op["action"] == "delete":
                del records[path]
            else:
                assert op["cid"] in blocks
                records[path] = op["cid"]
        ns = NodeStore(MemoryBlockStore())
        wrangler = NodeWrangler(ns)
        root = ns.get_node(None).cid
        for key, cid in records.items():
            root = wrangler.put_record(root, key, cbrrr.CID(cid))
        assert bytes(root) == commit["data"]

        # sync 1.1 inversion with nothing but the frame's blocks: undo the ops -> prevData
        inv = NodeWrangler(NodeStore(MemoryBlockStore(dict(blocks))))
        root = cbrrr.CID(commit["data"])
        for op in body["ops"]:
            if op["action"] == "create":
                root = inv.del_record(root, op["path"])
            else:
                root = inv.put_record(root, op["path"], cbrrr.CID(op["prev"]))
        assert bytes(root) == prev_data
        heads[did] = (body["rev"], commit["data"])
    assert commits > 550

    # after the stream, getRepo's CAR is exactly the state the frames built
    for did in world.dids:
        commit, records = atmst_records(world.repo_car(did))
        assert records == held[did]
        assert (commit["rev"], bytes(commit["data"])) == heads[did]


# -- servers ------------------------------------------------------------------------------


async def test_firehose_server_streams_frames_and_honours_cursor() -> None:
    frames = list(generate_frames(2, n_dids=5, n_frames=50))
    seqs = [decode_frame(f)[1]["seq"] for f in frames]
    async with FirehoseServer(frames, close_when_done=True) as server:
        async with websockets.connect(server.url, max_size=None) as ws:
            got = [msg async for msg in ws]
        assert got == frames
        async with websockets.connect(f"{server.url}?cursor={seqs[19]}", max_size=None) as ws:
            got = [msg async for msg in ws]
        assert got == frames[20:]
        async with websockets.connect(f"{server.url}?cursor={seqs[-1] + 10}") as ws:
            error = await ws.recv()
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
        header, body = decode_frame(error)  # type: ignore[arg-type]
        assert header == {"op": -1} and body["error"] == "FutureCursor"
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        with pytest.raises(websockets.InvalidStatus):
            async with websockets.connect(f"{server.host_url}/xrpc/other"):
                pass


def test_firehose_server_runs_in_a_thread_for_sync_callers() -> None:
    frames = list(generate_frames(2, n_dids=3, n_frames=10))
    with FirehoseServer(frames, close_when_done=True).threaded() as server:
        with connect(server.url) as ws:
            assert [ws.recv() for _ in frames] == frames


def test_repo_server_serves_repos_heads_and_did_documents() -> None:
    world = World(6, n_dids=4)
    list(world.frames(40))
    repos = {did: world.repo_car(did) for did in world.dids}
    with RepoServer(repos, world.identities) as server, httpx.Client(base_url=server.url) as http:
        did = world.dids[0]
        r = http.get("/xrpc/com.atproto.sync.getRepo", params={"did": did})
        assert r.status_code == 200 and r.content == repos[did]
        r = http.get("/xrpc/com.atproto.sync.getRepo", params={"did": "did:plc:" + "a" * 24})
        assert r.status_code == 400 and r.json()["error"] == "RepoNotFound"
        r = http.get("/xrpc/com.atproto.sync.getLatestCommit", params={"did": did})
        rev, commit_cid, _data = world.head(did)
        assert r.json() == {"cid": libipld.encode_cid(commit_cid), "rev": rev}
        r = http.get("/xrpc/com.atproto.sync.listRepos", params={"limit": 3})
        page = r.json()
        assert [x["did"] for x in page["repos"]] == sorted(world.dids)[:3]
        rest = http.get("/xrpc/com.atproto.sync.listRepos", params={"cursor": page["cursor"]}).json()
        assert [x["did"] for x in rest["repos"]] == sorted(world.dids)[3:]
        doc = http.get(f"/{did}").json()
        assert doc == json.loads(json.dumps(did_document(world.identities[0], server.url)))
        assert http.get("/did:plc:" + "b" * 24).status_code == 404
        # the reference resolver (@atproto/identity) asks for /{encodeURIComponent(did)}
        assert http.get("/" + did.replace(":", "%3A")).json() == doc
        assert server.requests["getRepo"] == 2 and server.requests["plc"] == 3


def test_servers_run_as_their_own_process() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.servers", "--seed", "3", "--dids", "4", "--frames", "30", "--close-when-done"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        with connect(info["firehose"], max_size=None) as ws:
            got = list(ws)
        assert len(got) == info["frames"] == 30
        assert decode_frame(got[-1])[1]["seq"] == info["last_seq"]
        did = info["dids"][0]
        car = httpx.get(f"{info['pds']}/xrpc/com.atproto.sync.getRepo", params={"did": did}).content
        assert atmst_records(car)[0]["did"] == did
        doc = httpx.get(f"{info['plc']}/{did}").json()
        assert doc["service"][0]["serviceEndpoint"] == info["pds"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
