"""Claim and transition cost of the backfill queue at N queued DIDs (issue 12 part 4).

    python -m bench.queue_claims 1000000            # the queue as it is (storage/queue_log.py)
    python -m bench.queue_claims 1000000 --before   # the v1 table: VARCHAR PRIMARY KEY, UPDATE in place

Prints one JSON line: seconds per claim of 500 DIDs (first, median of the rest, which
includes reading the next in-memory chunk when one runs out) and per single-DID transition.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
from skyfill.storage import open_store

_V1 = """CREATE TABLE backfill_queue (did VARCHAR PRIMARY KEY, reasons VARCHAR[] NOT NULL,
 enqueued_at TIMESTAMPTZ NOT NULL, state VARCHAR NOT NULL DEFAULT 'pending', retry_after TIMESTAMPTZ,
 error VARCHAR, updated_at TIMESTAMPTZ NOT NULL)"""
_FILL = ("SELECT 'did:plc:' || lpad(i::VARCHAR, 24, '0'), ['unseen'], now(), 'pending', NULL, NULL, now(){host} "
         "FROM range({n}) t(i)")


def _before(path: Path, n: int, claims: int) -> dict[str, float]:
    con = duckdb.connect(str(path))
    con.execute(_V1)
    con.execute("INSERT INTO backfill_queue " + _FILL.format(n=n, host=""))
    con.execute("CHECKPOINT")
    claim, mark = [], []
    for _ in range(claims):
        t = time.perf_counter()
        con.execute("BEGIN")
        rows = con.execute(
            "UPDATE backfill_queue SET state = 'in_progress', updated_at = now() WHERE did IN ("
            "SELECT did FROM backfill_queue WHERE state = 'pending' AND (retry_after IS NULL OR retry_after <= now()) "
            "ORDER BY enqueued_at, did LIMIT 500) RETURNING did").fetchall()
        con.execute("COMMIT")
        claim.append(time.perf_counter() - t)
        for (did,) in rows[:5]:
            t = time.perf_counter()
            con.execute("BEGIN")
            con.execute("UPDATE backfill_queue SET state = 'done', error = NULL, updated_at = now() WHERE did = ?", [did])
            con.execute("COMMIT")
            mark.append(time.perf_counter() - t)
    con.close()
    return _summary(claim, mark)


def _after(path: Path, n: int, claims: int) -> dict[str, float]:
    open_store(path).close()  # the schema
    con = duckdb.connect(str(path))
    con.execute("INSERT INTO queue_base " + _FILL.format(
        n=n, host=", 'https://pds' || (i % 1000)::VARCHAR || '.example'"))
    con.execute("CHECKPOINT")
    con.close()
    store = open_store(path)
    claim, mark = [], []
    later = datetime.now(UTC) + timedelta(hours=1)
    for _ in range(claims):
        t = time.perf_counter()
        dids = store.claim_backfills(500)
        claim.append(time.perf_counter() - t)
        for did in dids[:5]:
            t = time.perf_counter()
            store.defer_backfill(did, later)
            mark.append(time.perf_counter() - t)
    store.close()
    return _summary(claim, mark)


def _summary(claim: list[float], mark: list[float]) -> dict[str, float]:
    return {"claim500_first_s": round(claim[0], 4), "claim500_median_s": round(statistics.median(claim[1:]), 4),
            "claim500_max_s": round(max(claim[1:]), 4), "transition_median_s": round(statistics.median(mark), 4),
            "transition_max_s": round(max(mark), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int)
    ap.add_argument("--before", action="store_true")
    ap.add_argument("--claims", type=int, default=60)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "queue.duckdb"
        run = _before if args.before else _after
        out = run(path, args.n, args.claims)
    print(json.dumps({"queued": args.n, "design": "v1 table" if args.before else "log + memory", **out}))


if __name__ == "__main__":
    main()
