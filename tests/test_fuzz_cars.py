"""Hostile repo CARs: the kept fuzz corpus (tests/fuzz/corpus/cars), a few hundred fresh mutants
(tests/fuzz/cars.py), and the corpus served by a real HTTP server to a real backfiller writing a
real DuckDB file: every input ends in a snapshot or a counted RepoError, and every DID in a
recorded outcome, never a crash."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.faultserver import FaultServer, Reply, json_reply, xrpc_error
from tests.fuzz.cars import REPO_ERROR_KINDS, CorpusCase, check_input, corpus_cases, run, sources

from skyfill.backfill.backfiller import BackfillSummary, open_backfiller
from skyfill.backfill.config import BackfillConfig
from skyfill.protocol.repo import parse_repo
from tests.support.generate.identity import GeneratedIdentity, did_document, make_identity
from tests.support.store import SetupStore

CASES = corpus_cases()
GET_REPO = "/xrpc/com.atproto.sync.getRepo"


@pytest.mark.parametrize("case", CASES, ids=[c.file for c in CASES])
def test_corpus_input_ends_as_recorded(case: CorpusCase) -> None:
    outcome, records = check_input(case.car, case.did, case.key)
    assert outcome == case.expect
    # the deferred-walk path (the stored data root matches) may meet the problems in another
    # order, but it ends the same way: a snapshot with the same records, or a known error
    seed = next(s for s in sources() if s.name == case.source)
    deferred, deferred_records = check_input(
        case.car, case.did, case.key, defer=_data_cid(seed.car, seed.did)
    )
    assert (deferred == "ok") == (outcome == "ok")
    assert deferred_records == records
    assert deferred == "ok" or deferred in REPO_ERROR_KINDS


def _data_cid(car: bytes, did: str) -> str:
    return parse_repo(car, did=did, key=None).data_cid


def test_corpus_holds_the_issues_cases() -> None:
    expect = {c.mutation: c.expect for c in CASES if c.mutation.startswith("issue-")}
    assert expect == {
        "issue-dag-bomb-40": "mst_revisit",
        "issue-bad-collection": "bad_mst_key",
        "issue-e-is-a-map": "bad_mst_node",
        "issue-deep-node-100000": "too_deep",
        "issue-deep-header-3000": "car_too_deep",
    }
    assert {c.expect for c in CASES if c.mutation == "shared-record-100x20k"} == {"record_amplification"}
    kinds = {c.expect for c in CASES}
    assert len(kinds) >= 12 and "ok" in kinds


def test_random_mutants_end_in_a_snapshot_or_a_repo_error() -> None:
    stats = run(300, 20261201)
    assert stats["failures"] == []
    assert stats["snapshots"] + sum(stats["errors"].values()) == 300
    assert set(stats["errors"]) <= REPO_ERROR_KINDS
    assert len(stats["errors"]) >= 10 and stats["snapshots"] > 0  # the mutants reach deep code


# ---- through the backfiller ------------------------------------------------------------------


@pytest.fixture
def srv() -> Iterator[FaultServer]:
    with FaultServer() as s:
        yield s


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SetupStore]:
    s = SetupStore(tmp_path / "hostile.duckdb")
    yield s
    s.close()


def _doc(did: str, secret: bytes | None, url: str) -> dict[str, object]:
    """The seed's DID document: its real key for generated seeds, any key for the vectors."""
    ident = GeneratedIdentity(did=did, handle="hostile.test", secret=secret) if secret else make_identity(random.Random(3))
    doc = did_document(ident, url)
    doc["id"] = did
    for vm in doc["verificationMethod"]:  # type: ignore[union-attr]
        vm["controller"] = did
        vm["id"] = f"{did}#atproto"
    return doc


async def test_hostile_cars_leave_every_did_with_a_recorded_outcome(srv: FaultServer, store: SetupStore) -> None:
    served: dict[str, bytes] = {}
    srv.script(GET_REPO, lambda seen: Reply(200, served[seen.query["did"]]) if seen.query.get("did") in served
               else xrpc_error("RepoNotFound", "?"))
    for seed in sources():
        srv.script(f"/{seed.did}", lambda seen, seed=seed: json_reply(_doc(seed.did, seed.secret, srv.url)))
    # signatures checked when the seed's key is known (generated repos), as in production
    configs = {verify: BackfillConfig(plc_url=srv.url, allow_private_hosts=True, concurrency=2, request_backoff=0.01,
                                      verify=verify, max_attempts=100) for verify in (True, False)}
    async with (open_backfiller(store, config=configs[True], progress=False) as verified,
                open_backfiller(store, config=configs[False], progress=False) as unverified):
        for case in CASES:
            seed = next(s for s in sources() if s.name == case.source)
            served[case.did] = case.car
            # each case starts from a never-backfilled DID (a stored root would skip unchanged walks)
            store.delete_records("did = ?", [case.did])
            store.delete_repo(case.did)
            summary = await (verified if seed.secret is not None else unverified).run([case.did])
            _assert_outcome(store, case, summary)


def _assert_outcome(store: SetupStore, case: CorpusCase, summary: BackfillSummary) -> None:
    row = store.fetchall(
        "SELECT backfill_status, backfill_error, backfill_retry_after FROM repos WHERE did = ?", [case.did])
    assert row, case.file
    status, error, retry_after = row[0]
    if case.expect == "ok":
        assert summary.repos_ok == 1, (case.file, error)
        assert status == "ok"
        stored = dict(((c, k), cid) for c, k, cid in store.fetchall(
            "SELECT collection, rkey, cid FROM records WHERE did = ?", [case.did]))
        assert stored == check_input(case.car, case.did, case.key)[1]
    elif case.expect == "bad_signature":
        assert status == "SignatureFailed", (case.file, error)
    else:
        # a parse refusal is a retry with backoff, recorded with its kind; never a crash
        assert summary.failed == {"retrying": 1}, (case.file, error)
        assert status == "retrying" and retry_after is not None
        # (a record block is hashed when it is decoded, inside the store's reconcile)
        assert error.startswith(f"{case.expect}: ") or (
            case.expect == "bad_block_hash" and error.startswith("storing failed: record ")
        ), (case.file, error)
