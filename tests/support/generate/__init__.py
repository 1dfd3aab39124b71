"""Deterministic, realistic atproto data for benchmarks and tests.

Everything is drawn from a seed: identities (K-256 keys, did:plc DIDs, DID documents), records
in the live network's proportions, whole signed repos (real MST, commit v3, CAR v1) and
firehose frames whose per-DID chains (`since`/`prevData`) are intact.
"""

from .firehose import FIREHOSE_EPOCH_MICROS, FIRST_SEQ, World, generate_frames
from .identity import GeneratedIdentity, did_document, fake_did, make_identity, multikey
from .mst import Tree, cid_for, key_height
from .records import COLLECTION_WEIGHTS, RecordMaker, iso_time, tid
from .repo import generate_repo, iter_repo_car, sign_commit, write_car

__all__ = [
    "World",
    "generate_frames",
    "generate_repo",
    "iter_repo_car",
    "sign_commit",
    "write_car",
    "GeneratedIdentity",
    "make_identity",
    "fake_did",
    "did_document",
    "multikey",
    "Tree",
    "cid_for",
    "key_height",
    "RecordMaker",
    "COLLECTION_WEIGHTS",
    "tid",
    "iso_time",
    "FIREHOSE_EPOCH_MICROS",
    "FIRST_SEQ",
]
