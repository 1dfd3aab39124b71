"""The sink's per-poll read of stored revs against a lake vs a file, same records.

    python -m bench.lake_read 100000,400000      # starts a throwaway PostgreSQL (tests/support/postgres.py)

For each size: the records of bench/lake_write.py written through `Store.apply` in batches of 2,500
(one transaction each, as a sink's poll), one compaction, then the read `skyfill sink` makes every
poll (publish/sink.py `_load`: the poll's keys LEFT JOIN `records`) for 2,500 sampled keys, best of
3, as written and with the base filtered to the keys' DIDs first. One JSON line per size and target.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from bench.lake_write import _batches
from skyfill.storage import Store
from skyfill.storage.lake import lake_db
from tests.support.postgres import PostgresCluster, lake_url

__all__ = ["main"]

PER_POLL = 2_500
JOIN = "SELECT count(r.rev) FROM _k k LEFT JOIN records r USING (did, collection, rkey)"
BY_DID = ("SELECT count(r.rev) FROM _k k LEFT JOIN (SELECT * FROM records WHERE did IN (SELECT did FROM _k)) r "
          "USING (did, collection, rkey)")


def _read(store: Store, keys: list[tuple[str, str, str]], sql: str) -> float:
    best = float("inf")
    table = pa.table({"did": [k[0] for k in keys], "collection": [k[1] for k in keys], "rkey": [k[2] for k in keys]})
    for _ in range(3):
        started = time.perf_counter()
        with store.read() as reader, reader.registered("_k", table):
            found = reader.fetchall(sql)[0][0]
        best = min(best, time.perf_counter() - started)
        assert found == len(keys)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sizes", help="comma-separated record counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="skyfill-lake-read-") as tmp, PostgresCluster() as pg:
        for n in (int(s) for s in args.sizes.split(",")):
            batches = _batches(n, PER_POLL)
            for target in ("lake", "file"):
                db = (lake_db(lake_url(pg.create_database(f"read{n}")), Path(tmp) / f"lake{n}") if target == "lake"
                      else str(Path(tmp) / f"file{n}.duckdb"))
                with Store(db) as store:
                    for b in batches:
                        store.apply(b)
                    store.compact()
                    keys = [(d, c, r) for d, c, r in store.fetchall(
                        f"SELECT did, collection, rkey FROM records USING SAMPLE {PER_POLL}")]
                    print(json.dumps({"records": n, "target": target, "keys": len(keys),
                                      "join_s": round(_read(store, keys, JOIN), 3),
                                      "by_did_s": round(_read(store, keys, BY_DID), 3)}), flush=True)


if __name__ == "__main__":
    main()
