"""Two writers of one DID on a lake end as if run one after the other, and the newest rev wins.

On a lake every transaction takes its write version v from a PostgreSQL sequence when it starts
writing, but two processes can COMMIT in the other order, and a reconcile diffs against a snapshot
that lacks the other's uncommitted write. These tests drive that interleaving deterministically
with two `Store`s on one lake in one process: A (a backfill reconcile of an older repo rev) opens
its transaction and stops inside it (its `fetched`/`materialize` callables wait on an Event); B
(a firehose batch or a reconcile of a newer rev) runs whole and commits; then A commits. The
mirror's rule (docs/events.md) is that per key and for the repo row the newest rev wins, whatever
the commit order; the file store keeps its meaning (tests/test_record_log.py, test_repos_log.py).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from skyfill.protocol.columns import RecordColumns
from skyfill.storage import Batch, RecordPut, RepoRow, Store
from skyfill.storage import compaction
from skyfill.storage.lake import lake_db
from tests.support.postgres import PostgresCluster, lake_url

DID = "did:plc:order"
POST = "app.bsky.feed.post"
R0, R1, R2 = "3kaaaaaaaaaa2", "3kbbbbbbbbbb2", "3kcccccccccc2"   # repo revs, oldest first
WAIT = 180.0  # generous: the machine is shared


def cid(n: int) -> str:
    return f"bafkreiorder{n:04d}"


def record(n: int) -> str:
    return f'{{"$type": "{POST}", "text": "v{n}", "createdAt": "2024-05-01T12:00:00.000Z"}}'


@pytest.fixture
def lake(postgres_cluster: PostgresCluster, tmp_path: Path) -> str:

    name = "order_" + secrets.token_hex(4)
    return lake_db(lake_url(postgres_cluster.create_database(name)), tmp_path / name)


@pytest.fixture
def stores(lake: str) -> Iterator[tuple[Store, Store]]:
    """Two writers of one lake (two connections, as two processes would have)."""
    Store(lake).close()  # the schema, once
    with Store(lake) as a, Store(lake) as b:
        yield a, b


def firehose(rev: str, puts: Mapping[str, int], deletes: tuple[str, ...] = ()) -> Batch:
    """One firehose commit of DID at `rev`: puts rkey -> record n, deletes rkeys."""
    batch = Batch()
    for rkey, n in puts.items():
        batch.put_record(DID, POST, rkey, RecordPut(cid(n), rev, record(n), "2024-05-01T12:00:00.000Z", None))
    for rkey in deletes:
        batch.delete_record(DID, POST, rkey, rev=rev)
    batch.put_repo(RepoRow(DID, rev=rev, data_cid=cid(9000 + int(rev == R2)), commit_cid=cid(9100), last_seq=1,
                           sync_state="synchronized"))
    return batch


def reconcile(store: Store, rev: str, repo: Mapping[str, int], *, pause: Callable[[], None] | None = None) -> None:
    """Reconcile DID to the repo `repo` (rkey -> record n) at `rev`; `pause` runs inside the
    transaction, once, after the stored records were read and the write version was taken."""
    paused: list[bool] = []

    def materialize(keys: list[tuple[str, str]]) -> RecordColumns:
        if pause is not None and not paused:
            paused.append(True)
            pause()
        ns = [repo[rkey] for _, rkey in keys]
        return RecordColumns(collection=[c for c, _ in keys], rkey=[k for _, k in keys], cid=[cid(n) for n in ns],
                             record=[record(n) for n in ns], created_at=["2024-05-01T12:00:00.000Z"] * len(ns))

    store.reconcile(DID, rev=rev, data_cid=f"bafyreidata{rev}", commit_cid=f"bafyreicommit{rev}",
                    fetched={(POST, rkey): cid(n) for rkey, n in repo.items()}, materialize=materialize,
                    trust_data_root=False)


def interleave(a: Callable[[Callable[[], None]], None], b: Callable[[], None]) -> None:
    """Begin A; inside A's transaction run B whole (it commits); then A commits."""
    inside, b_done = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    def pause() -> None:
        inside.set()
        assert b_done.wait(WAIT), "B never finished"

    def run_a() -> None:
        try:
            a(pause)
        except BaseException as exc:  # handed to the test thread
            failed.append(exc)
            inside.set()

    thread = threading.Thread(target=run_a, name="writer-a")
    thread.start()
    try:
        assert inside.wait(WAIT), "A never reached its transaction"
        if not failed:
            b()
    finally:
        b_done.set()
        thread.join(WAIT)
    assert not thread.is_alive()
    if failed:
        raise failed[0]


def state(store: Store) -> dict[str, str]:
    return dict(store.fetchall("SELECT rkey, cid FROM records WHERE did = ?", [DID]))


def repo_head(store: Store) -> tuple[Any, ...]:
    return store.fetchall("SELECT rev, data_cid FROM repos WHERE did = ?", [DID])[0]


def check_and_compact(store: Store, want: dict[str, str], rev: str) -> None:
    """`want` and the repo row at `rev`, from the logs and again once compacted into the bases."""
    for _ in range(2):
        assert state(store) == want
        assert repo_head(store)[0] == rev
        store.compact()


def seed(store: Store) -> None:
    """The stored repo at R0: k1 -> 1, k2 -> 2, k3 -> 3, k5 -> 5."""
    reconcile(store, R0, {"k1": 1, "k2": 2, "k3": 3, "k5": 5})


def test_an_older_backfill_loses_to_a_newer_firehose_commit_committed_first(stores: tuple[Store, Store]) -> None:
    """(a) and (c): A reconciles the repo at R1 (k1 updated, k2 deleted, k3 updated) while the
    firehose applies R2 (k1 and k2 updated, k3 deleted) and commits first."""
    a, b = stores
    seed(a)
    interleave(lambda pause: reconcile(a, R1, {"k1": 11, "k3": 13, "k5": 5}, pause=pause),
               lambda: b.apply(firehose(R2, {"k1": 21, "k2": 22}, deletes=("k3",))))
    check_and_compact(b, {"k1": cid(21), "k2": cid(22), "k5": cid(5)}, R2)


def test_an_older_backfill_folded_under_a_newer_compacted_commit(stores: tuple[Store, Store]) -> None:
    """A's log rows commit after B's newer rows were compacted into the base: the base's newer rev
    still wins (on a lake the base is not older than every log row)."""
    a, b = stores
    seed(a)

    def b_then_compact() -> None:
        b.apply(firehose(R2, {"k1": 21, "k3": 23}))
        b.compact()

    interleave(lambda pause: reconcile(a, R1, {"k1": 11, "k2": 2, "k3": 3, "k5": 15}, pause=pause), b_then_compact)
    check_and_compact(b, {"k1": cid(21), "k2": cid(2), "k3": cid(23), "k5": cid(15)}, R2)


def test_an_older_put_committed_after_a_newer_delete_was_compacted(stores: tuple[Store, Store]) -> None:
    a, b = stores
    seed(a)

    def b_then_compact() -> None:
        b.apply(firehose(R2, {}, deletes=("k2",)))
        b.compact()

    interleave(lambda pause: reconcile(a, R1, {"k1": 1, "k2": 12, "k3": 3, "k5": 5}, pause=pause), b_then_compact)
    check_and_compact(b, {"k1": cid(1), "k3": cid(3), "k5": cid(5)}, R2)


def test_a_compaction_drops_the_deletes_it_kept_once_they_are_old(
    stores: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deletion rows a lake compaction keeps (for writers still in flight) go once older than
    DELETES_KEPT; the records stay as they were."""
    a, b = stores
    seed(a)
    b.apply(firehose(R2, {}, deletes=("k2",)))
    b.compact()
    assert b.fetchall("SELECT count(*) FROM record_log WHERE cid IS NULL") == [(1,)]
    assert b.fetchall("SELECT count(*) FROM record_log WHERE cid IS NOT NULL") == [(0,)]
    monkeypatch.setattr(compaction, "DELETES_KEPT", timedelta(0))
    b.compact()
    assert b.fetchall("SELECT count(*) FROM record_log") == [(0,)]
    assert state(b) == {"k1": cid(1), "k3": cid(3), "k5": cid(5)}


def test_two_reconciles_of_different_revs_end_at_the_newer(stores: tuple[Store, Store]) -> None:
    """(b): A reconciles R1 while B reconciles R2 and commits first."""
    a, b = stores
    seed(a)
    interleave(lambda pause: reconcile(a, R1, {"k1": 11, "k3": 3, "k4": 4, "k5": 5}, pause=pause),
               lambda: reconcile(b, R2, {"k1": 21, "k2": 22, "k3": 3, "k4": 4}))
    check_and_compact(b, {"k1": cid(21), "k2": cid(22), "k3": cid(3), "k4": cid(4)}, R2)
    assert repo_head(b)[1] == f"bafyreidata{R2}"


def test_a_firehose_commit_loses_to_a_newer_reconcile_committed_first(stores: tuple[Store, Store]) -> None:
    """The other way round: a firehose batch of R1 (a slow sink) commits after a reconcile at R2."""
    a, b = stores
    seed(a)
    batch = firehose(R1, {"k1": 11, "k6": 16}, deletes=("k2",))
    original = a._apply_in  # noqa: SLF001  (the hook: pause inside the batch's transaction)

    def apply_then_commit(pause: Callable[[], None]) -> None:
        def paused(*args: Any) -> None:
            original(*args)
            pause()
        a._apply_in = paused  # type: ignore[method-assign]
        a.apply(batch)

    interleave(apply_then_commit, lambda: reconcile(b, R2, {"k1": 21, "k2": 22, "k3": 3, "k5": 5, "k6": 16}))
    check_and_compact(b, {"k1": cid(21), "k2": cid(22), "k3": cid(3), "k5": cid(5), "k6": cid(16)}, R2)


@pytest.mark.xfail(strict=True, reason="a key created at R1 and deleted again before R2 leaves no trace in the "
                   "R2 reconcile's diff (its snapshot never held the key), so A's older put survives: needs "
                   "same-DID writers to conflict (see _notes/order.md)")
def test_a_key_born_and_gone_between_two_concurrent_reconciles(stores: tuple[Store, Store]) -> None:
    a, b = stores
    seed(a)
    interleave(lambda pause: reconcile(a, R1, {"k1": 11, "k2": 2, "k3": 3, "k5": 5, "k7": 7}, pause=pause),
               lambda: reconcile(b, R2, {"k1": 21, "k2": 2, "k3": 3, "k5": 5}))
    check_and_compact(b, {"k1": cid(21), "k2": cid(2), "k3": cid(3), "k5": cid(5)}, R2)


def test_on_a_file_the_same_rule_is_v_order_and_the_newest_rev_wins(tmp_path: Path) -> None:
    """The file store, one transaction at a time: versions without a rev keep v order (they take
    the rev before them), before and after a compaction; a backfill of an older rev run after a
    newer commit leaves the newer keys and repo version alone."""
    with Store(tmp_path / "f.duckdb") as store:
        seed(store)
        steps: list[tuple[str, str | None, int | None]] = [  # (rkey, rev, record n or None: delete)
            ("k1", R2, 21), ("k1", None, None),             # a delete without rev after R2: gone
            ("k6", None, 6), ("k6", R1, 16), ("k6", None, 26),  # NULL, then R1, then NULL again: v order
        ]
        for i, (rkey, rev, n) in enumerate(steps):
            batch = Batch()
            if n is None:
                batch.delete_record(DID, POST, rkey, rev=rev)
            else:
                batch.put_record(DID, POST, rkey, RecordPut(cid(n), rev, record(n), None, None))
            store.apply(batch)
            if i == 3:
                store.compact()
        want = {"k2": cid(2), "k3": cid(3), "k5": cid(5), "k6": cid(26)}
        assert state(store) == want
        store.compact()
        assert state(store) == want
        store.apply(firehose(R2, {"k2": 22}))
        reconcile(store, R1, {"k2": 12, "k3": 13, "k5": 5, "k6": 26})  # older than the stored R2
        check_and_compact(store, {"k2": cid(22), "k3": cid(13), "k5": cid(5), "k6": cid(26)}, R2)
