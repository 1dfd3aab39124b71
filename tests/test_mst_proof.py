"""skyfill.mst: sync 1.1 commit proofs (undo a commit's ops on the partial MST its frame carries).

Reference cases: the six commit-proof fixtures of bluesky-social/atproto-interop-tests (keys,
adds, dels, the roots before and after, the CIDs of the blocks in the proof). The trees are
built with the `atmst` package, an independent MST implementation used here as an oracle only:
the proof is checked on exactly the fixture's blocks, so a missing node or a wrong result fails.
Then real generated firehose frames (tests.support.generate), and real MST nodes from the network.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import libipld
import pytest
from atmst.blockstore import MemoryBlockStore
from atmst.mst.node_store import NodeStore
from atmst.mst.node_wrangler import NodeWrangler
from cbrrr import CID

from tests.support.generate import World
from skyfill.protocol.car import read_car
from skyfill.errors import RepoError
from skyfill.protocol.mst import EMPTY_NODE, PartialTree, encode_node, invert_commit

VECTORS = Path(__file__).parent / "vectors"
FIXTURES = json.loads((VECTORS / "interop/firehose/commit-proof-fixtures.json").read_text())

Op = tuple[str, str, bytes | None, bytes | None]


def _cid(text: str) -> bytes:
    return bytes(CID.decode(text))


def _fixture(case: dict[str, Any]) -> tuple[bytes, bytes, list[Op], dict[bytes, bytes]]:
    """(root after, root before, ops, the proof's blocks) of one fixture, built with atmst."""
    store: dict[bytes, bytes] = {}
    nodes = NodeStore(MemoryBlockStore(store))
    wrangler = NodeWrangler(nodes)
    leaf = CID.decode(case["leafValue"])
    root = nodes.get_node(None).cid
    for key in case["keys"]:
        root = wrangler.put_record(root, key, leaf)
    assert root.encode("base32") == case["rootBeforeCommit"]
    for key in case["adds"]:
        root = wrangler.put_record(root, key, leaf)
    for key in case["dels"]:
        root = wrangler.del_record(root, key)
    assert root.encode("base32") == case["rootAfterCommit"]
    proof = {_cid(c): store[_cid(c)] for c in case["blocksInProof"]}
    ops: list[Op] = [("create", k, bytes(leaf), None) for k in case["adds"] if k not in case["dels"]]
    ops += [("delete", k, None, bytes(leaf)) for k in case["dels"] if k not in case["adds"]]
    return bytes(root), _cid(case["rootBeforeCommit"]), ops, proof


@pytest.mark.parametrize("case", FIXTURES, ids=[c["comment"] for c in FIXTURES])
def test_fixture_proof_inverts_to_the_root_before(case: dict[str, Any]) -> None:
    after, before, ops, proof = _fixture(case)
    invert_commit(after, before, ops, proof)
    invert_commit(after, before, list(reversed(ops)), proof)  # the order of the ops does not matter


@pytest.mark.parametrize("case", FIXTURES, ids=[c["comment"] for c in FIXTURES])
def test_tampered_fixture_fails(case: dict[str, Any]) -> None:
    after, before, ops, proof = _fixture(case)
    leaf = _cid(case["leafValue"])
    other = _cid(case["rootAfterCommit"])  # any CID but the leaf value

    def fails(root: bytes, prev: bytes, ops_: list[Op], blocks: dict[bytes, bytes]) -> str:
        with pytest.raises(RepoError) as info:
            invert_commit(root, prev, ops_, blocks)
        assert info.value.kind == "bad_inversion"
        return str(info.value)

    fails(after, after, ops, proof)                                     # wrong prevData
    fails(after, before, ops[1:], proof)                                # an op left out
    fails(after, before, [*ops, ("create", "Z9/000001", leaf, None)], proof)   # an op the tree lacks
    fails(after, before, [*ops, ops[0]], proof)                         # one key twice
    action, path, cid, prev = ops[0]
    if action == "create":
        fails(after, before, [("create", path, other, None), *ops[1:]], proof)      # another value
        fails(after, before, [("update", path, leaf, other), *ops[1:]], proof)      # create said update
    else:
        fails(after, before, [("delete", path, None, None), *ops[1:]], proof)       # no prev: no undo
    needed = 0
    for cid in proof:  # without a node the undo opens, it fails; the rest are not needed by this walk
        short = {c: b for c, b in proof.items() if c != cid}
        try:
            invert_commit(after, before, ops, short)
        except RepoError as exc:
            assert "lacks MST node" in str(exc)
            needed += 1
    assert needed >= len(proof) - 2
    assert "lacks MST node" in fails(after, before, ops, {c: b for c, b in proof.items() if c != after})
    root_block = bytearray(proof[after])
    root_block[-3] ^= 1
    assert "does not hash" in fails(after, before, ops, {**proof, after: bytes(root_block)})


def test_random_edits_match_the_oracle() -> None:
    """Insert and remove through PartialTree (every block present) give atmst's roots, across
    splits, merges, a growing root and a trimmed one, and back to the empty tree."""
    rng = random.Random(7)
    store: dict[bytes, bytes] = {}
    nodes = NodeStore(MemoryBlockStore(store))
    wrangler = NodeWrangler(nodes)
    root = nodes.get_node(None).cid
    assert bytes(root) == bytes(CID.cidv1_dag_cbor_sha256_32_from(EMPTY_NODE))
    live: dict[str, bytes] = {}
    for step in range(1500):
        if live and rng.random() < 0.4:
            key = rng.choice(sorted(live))
            tree = PartialTree(bytes(root), store)
            assert tree.remove(key.encode()) == live.pop(key)
            root = wrangler.del_record(root, key)
        else:
            key = f"app.bsky.feed.{rng.choice(['like', 'post'])}/{rng.getrandbits(40):012x}"
            value = bytes(CID.cidv1_dag_cbor_sha256_32_from(step.to_bytes(4, "big")))
            tree = PartialTree(bytes(root), store)
            assert tree.insert(key.encode(), value) == live.get(key)
            live[key] = value
            root = wrangler.put_record(root, key, CID(value))
        assert tree.root_cid() == bytes(root), step
        if step % 100 == 0:
            for key, value in live.items():
                assert PartialTree(bytes(root), store).get(key.encode()) == value
    for key in list(live):  # empty it again
        tree = PartialTree(bytes(root), store)
        tree.remove(key.encode())
        root = wrangler.del_record(root, key)
        assert tree.root_cid() == bytes(root)
    assert tree.root_cid() == bytes(CID.cidv1_dag_cbor_sha256_32_from(EMPTY_NODE))


def _commit_proof(frame: bytes) -> tuple[bytes, bytes, list[Op], dict[bytes, bytes]] | None:
    header, body = libipld.decode_dag_cbor_multi(frame)
    if header.get("t") != "#commit":
        return None
    blocks = read_car(body["blocks"])[1]
    data = libipld.decode_dag_cbor(blocks[body["commit"]])["data"]
    ops = [(o["action"], o["path"], o.get("cid"), o.get("prev")) for o in body["ops"]]
    return data, body["prevData"], ops, blocks


def test_generated_frames_invert() -> None:
    """Every commit of a generated stream (creates, updates, deletes, multi-op) proves itself;
    the same commit with its ops swapped for another's does not."""
    proofs = [p for p in map(_commit_proof, World(3, n_dids=20, retain_blocks=False).frames(1500)) if p]
    actions = {a for p in proofs for a, *_ in p[2]}
    assert actions == {"create", "update", "delete"}
    assert any(len(p[2]) > 1 for p in proofs)
    for data, prev, ops, blocks in proofs:
        invert_commit(data, prev, ops, blocks)
    data, prev, _ops, blocks = proofs[-1]
    with pytest.raises(RepoError):
        invert_commit(data, prev, proofs[-2][2], blocks)


def _mst_nodes(blocks: dict[bytes, bytes]) -> list[tuple[bytes, bytes, dict[str, Any]]]:
    out = []
    for cid, block in blocks.items():
        node = libipld.decode_dag_cbor(block)
        if type(node) is dict and set(node) == {"e", "l"}:
            out.append((cid, block, node))
    return out


def test_rebuilt_nodes_encode_byte_for_byte() -> None:
    """encode_node (what a rebuilt node is hashed as) gives the original bytes of real nodes:
    a repo exported by the network, relay frames, generated frames; and libipld agrees."""
    nodes = _mst_nodes(read_car((VECTORS / "indigo/repo-testdata/bnewbold.robocracy.org.20250310005405.car").read_bytes())[1])
    for path in sorted((VECTORS / "derived/firehose").glob("*.frame")):
        header, body = libipld.decode_dag_cbor_multi(path.read_bytes())
        if header.get("t") == "#commit":
            nodes += _mst_nodes(read_car(body["blocks"])[1])
    for frame in World(4, n_dids=5, retain_blocks=False).frames(200):
        header, body = libipld.decode_dag_cbor_multi(frame)
        if header.get("t") == "#commit":
            nodes += _mst_nodes(read_car(body["blocks"])[1])
    assert len(nodes) > 100
    for _cid_bytes, block, node in nodes:
        keys, prev = [], b""
        for e in node["e"]:
            prev = prev[: e["p"]] + e["k"]
            keys.append(prev)
        subs = [node["l"], *(e["t"] for e in node["e"])]
        assert encode_node(keys, [e["v"] for e in node["e"]], subs) == block
        assert libipld.encode_dag_cbor(node) == block


def test_structurally_invalid_nodes_are_refused() -> None:
    leaf = bytes(CID.cidv1_dag_cbor_sha256_32_from(b"x"))

    def root_of(node: dict[str, Any]) -> tuple[bytes, dict[bytes, bytes]]:
        block = libipld.encode_dag_cbor(node)
        cid = bytes(CID.cidv1_dag_cbor_sha256_32_from(block))
        return cid, {cid: block}

    unsorted = {"e": [{"k": b"b/2", "p": 0, "t": None, "v": leaf}, {"k": b"a/1", "p": 0, "t": None, "v": leaf}],
                "l": None}
    bad_prefix = {"e": [{"k": b"a/1", "p": 9, "t": None, "v": leaf}], "l": None}
    not_a_key = {"e": [{"k": b"\x01q\x12 " + bytes(32), "p": 0, "t": None, "v": leaf}], "l": None}
    extra = {"e": [], "l": None, "x": 1}
    for node in (unsorted, bad_prefix, not_a_key, extra):
        cid, blocks = root_of(node)
        with pytest.raises(RepoError):
            PartialTree(cid, blocks)
