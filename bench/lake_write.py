"""One writer's records/s into a DuckLake (Postgres catalog + Parquet) vs into a DuckDB file, same records.

    python -m bench.lake_write 100000            # starts a throwaway PostgreSQL (tests/support/postgres.py)
    python -m bench.lake_write 100000 --batch 5000

Writes `n` generated records (the bench mix of tests/support/generate, 20 records a DID) through `Store.apply` in batches of
`--batch` records, each batch one transaction with its cursor, then one compaction; prints one JSON
line per target: records/s of the writes, the compaction's seconds, and the bytes on disk per record
(the file; the lake's Parquet files, its catalog not counted). Issue 13's `lake.vs_file`, at smoke size.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import libipld

from skyfill.protocol.records import record_json
from skyfill.storage import Batch, RecordPut, Store
from skyfill.storage.lake import lake_db
from tests.support.generate.records import RecordMaker, iso_time, tid
from tests.support.postgres import PostgresCluster, lake_url

def _batches(n: int, per: int) -> list[Batch]:
    """`n` records of the bench mix (tests/support/generate's RecordMaker), 20 a DID, in batches of `per`."""
    rng = random.Random(13)
    dids = [f"did:plc:{rng.randbytes(12).hex()[:24]}" for _ in range(n // 20 + 1)]
    maker = RecordMaker(rng, peers=dids)
    out = []
    micros = 1_700_000_000_000_000
    for start in range(0, n, per):
        b = Batch()
        for i in range(start, min(n, start + per)):
            micros += rng.randrange(1, 5_000_000)
            collection = maker.collection()
            block, cid = maker.encode(collection, micros)
            record, created = record_json(block)
            rkey = tid(micros, rng.randrange(1024))
            b.put_record(dids[i // 20], collection, rkey,
                         RecordPut(libipld.encode_cid(cid), rkey, record, created, iso_time(micros)))
        b.cursor = ("bench", start)
        out.append(b)
    return out


def _disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _run(name: str, db: str, disk: Path, batches: list[Batch], n: int) -> dict[str, Any]:
    with Store(db) as store:
        started = time.perf_counter()
        for b in batches:
            store.apply(b)
        wrote = time.perf_counter() - started
        started = time.perf_counter()
        store.compact()
        compacted = time.perf_counter() - started
        assert store.fetchall("SELECT count(*) FROM records")[0][0] == n
    return {"target": name, "records": n, "batch": len(batches[0].records), "records_per_s": round(n / wrote),
            "write_s": round(wrote, 2), "compact_s": round(compacted, 2), "bytes_per_record": round(_disk(disk) / n, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("n", type=int)
    parser.add_argument("--batch", type=int, default=5000)
    args = parser.parse_args()
    batches = _batches(args.n, args.batch)
    with tempfile.TemporaryDirectory(prefix="skyfill-lake-bench-") as tmp, PostgresCluster() as pg:
        file = Path(tmp) / "file.duckdb"
        print(json.dumps(_run("file", str(file), file, batches, args.n)), flush=True)
        data = Path(tmp) / "lake"
        print(json.dumps(_run("lake", lake_db(lake_url(pg.dsn), data), data, batches, args.n)), flush=True)


if __name__ == "__main__":
    main()
