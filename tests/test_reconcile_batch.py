"""Group commit of the backfill: `Store.reconcile_many` (many repos, one transaction) ends where
one `reconcile` per repo ends; a failed batch stores nothing, and the StoreReconciler retries its
repos one by one so that a bad repo fails alone."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from skyfill.backfill.reconcile import StoreReconciler
from skyfill.errors import SkyfillError
from skyfill.protocol.repo import RepoSnapshot, materialize, parse_repo
from skyfill.storage.reconcile import ReconcileItem
from tests.support.store import SetupStore

VECTORS = Path(__file__).parent / "vectors" / "indigo"
GREENGROUND = VECTORS / "testing-testdata" / "greenground.repo.car"
GREENGROUND_DID = "did:plc:kzcqyc3unb33eh5sxzsfs25z"


def snap(did: str, *, drop: int = 0, bogus: bool = False) -> RepoSnapshot:
    """greenground's repo as `did`'s; `drop` records left out; `bogus`: one record whose block is missing."""
    s = parse_repo(GREENGROUND.read_bytes(), did=GREENGROUND_DID, key=None)
    walked = dict(list(s.records.items())[drop:])
    if bogus:
        cid = next(iter(s.records.values()))
        walked[("app.bsky.feed.post", "zzzbogus")] = cid[:20] + ("a" if cid[20] != "a" else "b") + cid[21:]
    return dataclasses.replace(s, did=did, walked=walked)


def item(s: RepoSnapshot, *, trust: bool = True) -> ReconcileItem:
    return ReconcileItem(s.did, rev=s.rev, data_cid=s.data_cid, commit_cid=s.commit_cid,
                         fetched=lambda: s.records, materialize=lambda keys: materialize(s, keys),
                         trust_data_root=trust)


def state(store: SetupStore) -> tuple[list[tuple], list[tuple], list[tuple]]:
    records = store.fetchall("SELECT did, collection, rkey, cid, record::VARCHAR FROM records ORDER BY ALL")
    repos = store.fetchall("SELECT did, rev, data_cid, commit_cid, sync_state, backfill_status FROM repos ORDER BY did")
    queue = store.fetchall("SELECT did, state FROM backfill_queue ORDER BY did")
    return records, repos, queue


DIDS = [f"did:plc:batch{i}" for i in range(5)]


def test_reconcile_many_ends_where_one_by_one_ends(tmp_path: Path) -> None:
    rounds = [
        [snap(d) for d in DIDS[:3]],
        # unchanged, one record fewer (under the same root: diffed only when not trusted), new ones
        [snap(DIDS[0]), snap(DIDS[1], drop=1), snap(DIDS[2], drop=1), snap(DIDS[3]), snap(DIDS[4], drop=1)],
    ]
    untrusted = {DIDS[2]}
    with SetupStore(tmp_path / "a.duckdb") as batched, SetupStore(tmp_path / "b.duckdb") as single:
        for snaps in rounds:
            many = batched.reconcile_many([item(s, trust=s.did not in untrusted) for s in snaps])
            one = [single.reconcile(s.did, rev=s.rev, data_cid=s.data_cid, commit_cid=s.commit_cid,
                                    fetched=lambda s=s: s.records, materialize=lambda keys, s=s: materialize(s, keys),
                                    trust_data_root=s.did not in untrusted) for s in snaps]
            assert many == one
        assert state(batched) == state(single)
        assert len(state(batched)[0]) == 2 + 2 + 1 + 2 + 1  # DIDS[1] kept both: its root is trusted


def test_a_failed_batch_stores_none_of_its_repos(tmp_path: Path) -> None:
    with SetupStore(tmp_path / "m.duckdb") as store:
        with pytest.raises(SkyfillError):
            store.reconcile_many([item(snap(DIDS[0])), item(snap(DIDS[1], bogus=True)), item(snap(DIDS[2]))])
        assert state(store) == ([], [], [])
        with pytest.raises(ValueError):
            store.reconcile_many([item(snap(DIDS[0])), item(snap(DIDS[0]))])


def test_store_reconciler_batches_and_a_bad_repo_fails_alone(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with SetupStore(tmp_path / "m.duckdb") as store:
        calls: list[int] = []
        real = store.reconcile_many

        def spy(items: list[ReconcileItem]) -> object:
            calls.append(len(items))
            return real(items)

        monkeypatch.setattr(store, "reconcile_many", spy)
        sink = StoreReconciler(store)
        snaps = [snap(d, bogus=(d == DIDS[2])) for d in DIDS]

        async def go() -> list[object]:
            return await asyncio.gather(*(sink.commit(s.did, s) for s in snaps), return_exceptions=True)

        results = asyncio.run(go())
        # one batch of five, then one transaction per repo after its failure
        assert calls == [5, 1, 1, 1, 1, 1]
        assert isinstance(results[2], SkyfillError)
        assert all(not isinstance(r, BaseException) and r.added == 2 for i, r in enumerate(results) if i != 2)
        records, repos, _ = state(store)
        assert sorted({r[0] for r in records}) == sorted(DIDS[:2] + DIDS[3:])
        assert [r[0] for r in repos] == sorted(DIDS[:2] + DIDS[3:])
