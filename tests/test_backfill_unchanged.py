"""Backfill fast paths: an unchanged data root skips the walk and the diff; records decoded
before the write lock stay correct when the stored records change in between."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from skyfill.backfill.reconcile import premade
from skyfill.metrics import REGISTRY
from skyfill.protocol.car import read_car
from skyfill.protocol.repo import RepoSnapshot, materialize, parse_repo
from tests.support.store import SetupStore

from .support.wire import encode_car

VECTORS = Path(__file__).parent / "vectors" / "indigo"
GREENGROUND = VECTORS / "testing-testdata" / "greenground.repo.car"
GREENGROUND_DID = "did:plc:kzcqyc3unb33eh5sxzsfs25z"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SetupStore]:
    with SetupStore(tmp_path / "m.duckdb") as s:
        yield s


def snap(defer: str | None = None) -> RepoSnapshot:
    return parse_repo(GREENGROUND.read_bytes(), did=GREENGROUND_DID, key=None, defer_walk_if_data=defer)


def reconcile(store: SetupStore, s: RepoSnapshot, fetched: object = None, **kw: object) -> object:
    return store.reconcile(
        s.did, rev=s.rev, data_cid=s.data_cid, commit_cid=s.commit_cid,
        fetched=fetched if fetched is not None else (lambda: s.records),
        materialize=lambda keys: materialize(s, keys), **kw,  # type: ignore[arg-type]
    )


def stored(store: SetupStore) -> dict[tuple[str, str], str]:
    return {(c, k): cid for c, k, cid in store.fetchall("SELECT collection, rkey, cid FROM records")}


def never() -> Mapping[tuple[str, str], str]:
    raise AssertionError("the unchanged fast path must not need the record list")


def test_deferred_walk_lists_the_same_records() -> None:
    full = snap()
    lazy = snap(defer=full.data_cid)
    assert lazy.walked is None
    assert lazy.records == full.records and len(full.records) == 2
    assert lazy.blocks == full.blocks  # split on first use when the commit was read on its own
    assert snap(defer="bafy-other").walked == full.records


def test_unchanged_root_skips_diff_and_keeps_records(store: SetupStore) -> None:
    s = snap()
    first = reconcile(store, s)
    assert first.added == len(s.records)  # type: ignore[attr-defined]
    again = reconcile(store, snap(defer=s.data_cid), fetched=never)
    assert (again.added, again.updated, again.deleted, again.unchanged) == (0, 0, 0, len(s.records))  # type: ignore[attr-defined]
    assert stored(store) == s.records
    assert store.trusted_root(s.did) == s.data_cid


@pytest.mark.parametrize(
    "breakage",
    [
        "sync_state = 'desynchronized'",
        "backfill_status = 'retrying'",
        "active = false, status = 'deactivated'",
    ],
)
def test_untrusted_row_gets_a_full_reconcile(store: SetupStore, breakage: str) -> None:
    s = snap()
    reconcile(store, s)
    store.delete_records("rkey = (SELECT min(rkey) FROM records)")
    store.update_repos(breakage)
    assert store.trusted_root(s.did) is None
    counts = reconcile(store, s)
    assert counts.added == 1  # type: ignore[attr-defined]
    assert stored(store) == s.records


def test_fast_path_off_when_the_caller_says_so(store: SetupStore) -> None:
    s = snap()
    reconcile(store, s)
    store.delete_records("rkey = (SELECT min(rkey) FROM records)")
    assert reconcile(store, s, trust_data_root=False).added == 1  # type: ignore[attr-defined]
    assert stored(store) == s.records


def test_records_decoded_before_the_lock_survive_a_concurrent_change(store: SetupStore) -> None:
    s = snap()
    decode = premade(store, s, every=False)  # fresh DID: decodes every record now (consumes its blocks)
    reconcile(store, snap())  # meanwhile another writer stores the repo
    store.delete_records("rkey = (SELECT min(rkey) FROM records)")
    store.update_repos("sync_state = 'desynchronized'")
    counts = store.reconcile(s.did, rev=s.rev, data_cid=s.data_cid, commit_cid=s.commit_cid,
                             fetched=s.records, materialize=decode)
    assert (counts.added, counts.unchanged) == (1, len(s.records) - 1)
    assert stored(store) == s.records
    rows = store.fetchall("SELECT count(*) FROM records WHERE record IS NOT NULL")
    assert rows[0][0] == len(s.records)


def test_chunked_reconcile_decodes_ahead_and_emits_every_change(
    store: SetupStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import skyfill.backfill.reconcile as backfill_reconcile
    import skyfill.storage.reconcile as storage_reconcile

    monkeypatch.setattr(storage_reconcile, "RECONCILE_CHUNK", 1)  # 2 records -> 2 chunks, each decoded ahead
    monkeypatch.setattr(backfill_reconcile, "RECONCILE_CHUNK", 1)
    s = snap()
    sent: list[object] = []
    counts = store.reconcile(s.did, rev=s.rev, data_cid=s.data_cid, commit_cid=s.commit_cid,
                             fetched=s.records, materialize=premade(store, s, every=False), emit=sent.extend)
    assert counts.added == len(s.records) == 2
    assert stored(store) == s.records
    assert sorted((c.collection, c.rkey) for c in sent if hasattr(c, "rkey")) == sorted(s.records)  # type: ignore[attr-defined]
    assert store.fetchall("SELECT count(*) FROM records WHERE record IS NOT NULL")[0][0] == 2


def commit_first(car: bytes) -> bytes:
    """The same CAR with the commit as its first block (how PDSes write getRepo)."""
    roots, blocks = read_car(car)
    return encode_car(roots, {roots[0]: blocks[roots[0]], **blocks})


def test_deferred_parse_reads_only_the_commit_and_still_checks_it() -> None:
    import json

    from skyfill.protocol.crypto import atproto_key_from_did_doc
    from skyfill.errors import RepoError, SignatureError

    testing = VECTORS / "testing-testdata"
    own = atproto_key_from_did_doc(json.loads((testing / "greenground.didDoc.json").read_text()))
    other = atproto_key_from_did_doc(json.loads((testing / "fakermaker.didDoc.json").read_text()))
    car = commit_first(GREENGROUND.read_bytes())
    full = parse_repo(car, did=GREENGROUND_DID, key=own)
    lazy = parse_repo(car, did=GREENGROUND_DID, key=own, defer_walk_if_data=full.data_cid)
    assert lazy.split is None and lazy.walked is None  # nothing past the commit block was read
    assert (lazy.rev, lazy.commit_cid) == (full.rev, full.commit_cid)
    assert lazy.records == full.records and lazy.blocks == full.blocks
    with pytest.raises(SignatureError):
        parse_repo(car, did=GREENGROUND_DID, key=other, defer_walk_if_data=full.data_cid)
    with pytest.raises(RepoError):
        parse_repo(car, did="did:plc:someoneelse", key=None, defer_walk_if_data=full.data_cid)


def test_trusted_root_with_no_stored_records_is_reconciled_in_full(store: SetupStore) -> None:
    # a purged account that comes back keeps its row synchronized under the old root
    s = snap()
    reconcile(store, s)
    store.delete_records()
    assert reconcile(store, s).added == len(s.records)  # type: ignore[attr-defined]
    assert stored(store) == s.records


def _reads(outcome: str) -> float:
    return REGISTRY.get_sample_value("skyfill_store_reconcile_reads_total", {"outcome": outcome}) or 0.0


def test_a_did_new_to_the_store_is_reconciled_without_reading_stored_rows(store: SetupStore) -> None:
    """The store holds nothing of the DID (no record, no repos row, base or log): the reconcile
    writes the whole repo without reading stored records or the repos row; once the DID has a
    row of any kind (here: only a stale record, no repos row) every reconcile reads them."""
    s = snap()
    other = "did:plc:someoneelse"
    store.put_records([(other, "app.bsky.feed.like", "3k", "bafyx", '{"a":1}', None, None)])
    store.compact()
    read, skipped = _reads("read"), _reads("skipped")
    assert store.stored_cids(s.did) == {} and store.trusted_root(s.did) is None
    counts = reconcile(store, s)
    assert (_reads("read"), _reads("skipped")) == (read, skipped + 1)
    assert counts.added == len(s.records) == 2 and stored(store).keys() == s.records.keys() | {("app.bsky.feed.like", "3k")}
    assert store.fetchall("SELECT sync_state, backfill_status FROM repos WHERE did = ?", [s.did]) == [("synchronized", "ok")]

    # a stale record of a DID that has no repos row: read, and removed by the reconcile
    fresh = SetupStore(store.path + ".2")
    try:
        fresh.put_records([(s.did, "app.bsky.feed.post", "stale", "bafystale", '{"t":1}', None, None)])
        fresh.delete_repo(s.did)
        assert fresh.fetchall("SELECT count(*) FROM repos")[0][0] == 0
        read, skipped = _reads("read"), _reads("skipped")
        counts = reconcile(fresh, s)
        assert (_reads("read"), _reads("skipped")) == (read + 1, skipped)
        assert counts.deleted == 1 and stored(fresh) == dict(s.records)
    finally:
        fresh.close()
