"""The backfill queue as an append-only log (storage/queue_log.py): the view, compaction,
claims from memory, a v1 file's indexed table migrated."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import duckdb

from skyfill.storage import BackfillStatus, RetryPolicy

from .support.store import SetupStore

V1_SCHEMA = Path(__file__).parent / "fixtures" / "schema_v1.sql"
POLICY = RetryPolicy(max_attempts=3, backoff_min=timedelta(hours=1), backoff_max=timedelta(hours=2))


def states(store: SetupStore) -> dict[str, str]:
    return dict(store.fetchall("SELECT did, state FROM backfill_queue"))


def test_transitions_append_and_compaction_keeps_the_view(tmp_path: Path) -> None:
    dids = [f"did:plc:{i:024d}" for i in range(50)]
    with SetupStore(tmp_path / "q.duckdb") as store:
        assert store.enqueue({d: ["unseen"] for d in dids}) == 50
        claimed = store.claim_backfills(20)
        assert len(claimed) == 20 and len(set(claimed)) == 20
        store.record_backfill_failure(claimed[0], status=BackfillStatus.RETRYING, error="x", policy=POLICY)
        store.record_backfill_failure(claimed[1], status=BackfillStatus.REPO_NOT_FOUND, error="gone", policy=POLICY)
        before = states(store)
        assert sorted(before.values()).count("in_progress") == 18
        # every transition was an append: no row was updated in place
        assert store.fetchall("SELECT count(*) FROM queue_log")[0][0] == 50 + 20 + 2
        store.compact()
        assert store.fetchall("SELECT count(*) FROM queue_log") == [(0,)]
        assert store.fetchall("SELECT count(*) FROM queue_base") == [(50,)]
        assert states(store) == before
        # after the fold: the remaining 30 pending are claimed, none twice, the retrying one is not due
        rest = store.claim_backfills(100)
        assert sorted(rest) == sorted(d for d, s in before.items() if s == "pending" and d != claimed[0])
        assert store.claim_backfills(100) == []
        assert store.recover_queue() == 48
        due = sorted(d for d, s in states(store).items() if s == "pending" and d != claimed[0])
        assert sorted(store.claim_backfills(100)) == due and len(due) == 48
        # a re-enqueue of a failed DID starts afresh; of an open one only adds the reason
        assert store.enqueue({claimed[1]: ["explicit"], claimed[2]: ["explicit"]}) == 1
        rows = dict(store.fetchall("SELECT did, reasons FROM backfill_queue WHERE did IN (?, ?)",
                                   [claimed[1], claimed[2]]))
        assert rows == {claimed[1]: ["explicit"], claimed[2]: ["explicit", "unseen"]}


def test_a_v1_indexed_queue_table_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "v1.duckdb"
    con = duckdb.connect(str(path))
    con.execute(V1_SCHEMA.read_text())
    con.execute("INSERT INTO backfill_queue SELECT 'did:plc:' || lpad(i::VARCHAR, 24, '0'), ['unseen'], now(), "
                "CASE WHEN i % 2 = 0 THEN 'pending' ELSE 'done' END, NULL, NULL, now() FROM range(10) t(i)")
    con.close()
    with SetupStore(path) as store:
        assert store.fetchall("SELECT table_type FROM information_schema.tables "
                              "WHERE table_name = 'backfill_queue'") == [("VIEW",)]
        assert dict(store.fetchall("SELECT state, count(*) FROM backfill_queue GROUP BY 1")) == {
            "pending": 5, "done": 5}
        assert len(store.claim_backfills(100)) == 5
