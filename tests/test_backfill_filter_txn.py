"""The backfill filter is recorded in the reconcile's own transaction (storage/reconcile.py,
`backfill_filter`): a reconcile that fails records no filter, one that commits records it, the
unchanged fast path included (real DuckDB, a real signed repo CAR)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from skyfill.storage import Change
from tests.support.store import SetupStore

from .test_backfill_unchanged import reconcile, snap


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SetupStore]:
    with SetupStore(tmp_path / "f.duckdb") as s:
        yield s


def filters(store: SetupStore) -> list[tuple[str, str]]:
    return store.fetchall("SELECT did, filter FROM backfill_filters ORDER BY recorded_at")


def test_the_filter_commits_with_the_reconcile_or_not_at_all(store: SetupStore) -> None:
    s = snap()

    def crash(changes: list[Change]) -> None:
        raise RuntimeError("the process dies before COMMIT")

    with pytest.raises(RuntimeError):
        reconcile(store, s, backfill_filter="app.bsky.feed.post", emit=crash)
    assert filters(store) == [] and store.fetchall("SELECT count(*) FROM records") == [(0,)]
    reconcile(store, s, backfill_filter="app.bsky.feed.post")
    assert filters(store) == [(s.did, "app.bsky.feed.post")]
    reconcile(store, s, backfill_filter="*")  # the unchanged fast path records it too
    assert filters(store)[-1] == (s.did, "*")
    reconcile(store, s)  # no filter given (the daemon's reconciler): nothing recorded
    assert len(filters(store)) == 2
