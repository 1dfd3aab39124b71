"""The daemon's negative filter in front of point reads: a DID the store never held is started
fresh without a read; a DID it holds, or one this process created, is always read back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from skyfill.consumer.known_dids import KnownDids
from skyfill.consumer.tracker import Tracker, Verdict
from skyfill.protocol.events import Identity
from skyfill.storage import Batch, RepoRow, Store, did_fingerprint


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "k.duckdb")
    yield s
    s.close()


def stored_rows(store: Store, dids: list[str]) -> None:
    batch = Batch()
    for i, did in enumerate(dids):
        batch.put_repo(RepoRow(did=did, rev=f"3l{i:011d}", handle=f"h{i}.test"))
    store.apply(batch)


def test_fingerprints_list_every_stored_did_base_and_log(store: Store) -> None:
    in_base = [f"did:plc:base{i}" for i in range(50)]
    stored_rows(store, in_base)
    store.compact()
    in_log = [f"did:plc:log{i}" for i in range(50)]
    stored_rows(store, in_log)
    stored_rows(store, in_base[:10])  # rows in the base and the log: such a DID may be listed twice
    fingerprints = store.did_fingerprints()
    assert list(fingerprints) == sorted(fingerprints) and len(fingerprints) == 110
    assert set(fingerprints) == {did_fingerprint(d) for d in in_base + in_log}
    known = KnownDids(fingerprints)
    assert all(known.may_hold(d) for d in in_base + in_log)
    strangers = [f"did:plc:new{i}" for i in range(1000)]
    # 32-bit fingerprints of 100 DIDs: a stranger collides with probability ~100 / 2^32
    assert sum(known.may_hold(d) for d in strangers) == sum(did_fingerprint(d) in set(fingerprints) for d in strangers)
    assert not any(known.may_hold(d) for d in strangers)


def test_the_tracker_reads_only_dids_the_store_may_hold(store: Store) -> None:
    old = [f"did:plc:old{i}" for i in range(5)]
    stored_rows(store, old)
    tracker = Tracker(load=store.repo_row, capacity=2, known=KnownDids(store.did_fingerprints()))
    seq = 0

    def identity(did: str, handle: str) -> Identity:
        nonlocal seq
        seq += 1
        return Identity(seq=seq, time="2026-01-01T00:00:00Z", did=did, handle=handle)

    batch = Batch()
    assert tracker.apply(identity(old[0], "renamed.test"), batch) is Verdict.APPLIED
    assert tracker.loads == 1 and tracker.rows[old[0]].rev == "3l00000000000"   # read: the store holds it
    for i in range(3):
        tracker.apply(identity(f"did:plc:fresh{i}", f"f{i}.test"), batch)
    assert tracker.loads == 1                                                   # never held: no read
    tracker.sealed()
    store.apply(batch)
    assert tracker.trim(committed=1) == 2
    evicted = [d for d in ("did:plc:fresh0", "did:plc:fresh1", "did:plc:fresh2", old[0]) if d not in tracker.rows]
    assert evicted
    for did in evicted:                     # created by this process, then evicted: read back
        row = tracker.row(did)
        assert row is not None and row.handle is not None
    assert tracker.loads == 1 + len(evicted)
