"""`backfill`: whole repos from a local PDS (own process) -> the real backfiller -> DuckDB.

100 signed repos (a few large, many small) are generated and served by a RepoServer process
that is also the PLC directory. Measured: records/s from the first request to the last
committed row on a fresh DuckDB file, again with nothing changed, the original pipeline's way
(atproto SDK `CAR.from_bytes`, one model per record, one INSERT per row) on a subset, and the
extra RSS of backfilling the largest repo alone in a fresh process.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import Context, Row, part
from bench.progress import step

from ._workers import repo_spec, run_json, spawn

FRESH_TARGET = 100_000.0
UNCHANGED_TARGET = 300_000.0
ORIGINAL_RATIO_TARGET = 3.0
RSS_CAR_RATIO_TARGET = 4.0


def repo_sizes(ctx: Context) -> list[int]:
    """A few large repos and many small ones; 1,000,000 records in 100 repos at full size."""
    if ctx.sizes.smoke:
        return [1_500, 800] + [60 + (i * 37) % 200 for i in range(8)]
    large = [300_000, 200_000, 150_000, 100_000]
    small = [500 + (i * 977) % 4_200 for i in range(96)]
    small[-1] += 1_000_000 - sum(large) - sum(small)
    return large + small


def _config(plc: str, concurrency: int) -> Any:
    from skyfill.backfill.config import BackfillConfig

    return BackfillConfig(plc_url=plc, allow_private_hosts=True, per_host_rps=1e6, concurrency=concurrency,
                          per_host_concurrency=concurrency)


def _backfill(db: Path, plc: str, dids: list[str], concurrency: int) -> tuple[float, Any]:
    from skyfill.app.jobs import run_backfill
    from skyfill.storage import Store

    with Store(db) as store:
        started = time.perf_counter()
        summary = asyncio.run(run_backfill(store, dids=dids, config=_config(plc, concurrency), progress=False))
        seconds = time.perf_counter() - started
    if summary.repos_failed:
        raise AssertionError(f"backfill failed for some repos: {summary.to_json()}")
    return seconds, summary


def original_way(db: Path, pds: str, dids: list[str]) -> tuple[int, float]:
    """The pipeline skyfill replaces: SDK CAR decode, a model per record, one INSERT per row.

    Returns (records stored, seconds spent in the INSERTs)."""
    from datetime import UTC, datetime

    import duckdb
    import httpx
    from atproto import CAR, CID, models
    from atproto_client.models.utils import get_model_as_json


    # the records table as it was before skyfill's versioned layout: a primary key, upserted
    v1_schema = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "schema_v1.sql"
    with duckdb.connect(str(db)) as setup:
        setup.execute(v1_schema.read_text())
    con = duckdb.connect(str(db))
    stored = 0
    inserting = 0.0
    with httpx.Client(timeout=120) as http:
        for did in dids:
            body = http.get(f"{pds}/xrpc/com.atproto.sync.getRepo", params={"did": did}).content
            car = CAR.from_bytes(body)
            blocks = car.blocks
            commit = blocks[car.root]
            rev = commit["rev"]
            stack = [commit["data"]]
            rows = []
            while stack:
                node = blocks[CID.from_decoded_bytes(stack.pop())]
                if node["l"] is not None:
                    stack.append(node["l"])
                key = b""
                for e in node["e"]:
                    key = key[: e["p"]] + e["k"]
                    record = blocks[CID.from_decoded_bytes(e["v"])]
                    model = models.get_or_create(record, strict=False)
                    collection, rkey = key.decode().split("/", 1)
                    rows.append((did, collection, rkey, str(CID.from_decoded_bytes(e["v"])), rev,
                                 get_model_as_json(model), record.get("createdAt"), datetime.now(UTC)))
                    if e["t"] is not None:
                        stack.append(e["t"])
            t0 = time.perf_counter()
            con.execute("BEGIN TRANSACTION")
            con.executemany(
                "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, TRY_CAST(? AS TIMESTAMPTZ), ?) "
                "ON CONFLICT (did, collection, rkey) DO UPDATE SET cid = excluded.cid, rev = excluded.rev, "
                "record = excluded.record, created_at = excluded.created_at, indexed_at = excluded.indexed_at",
                rows,
            )
            con.execute("COMMIT")
            inserting += time.perf_counter() - t0
            stored += len(rows)
    con.close()
    return stored, inserting


def _original_subset(info: dict[str, Any], smoke: bool) -> list[str]:
    """Small repos up to ~5,000 records: row-by-row INSERTs run at a few hundred records/s."""
    budget = 1_000 if smoke else 5_000
    out: list[str] = []
    total = 0
    for did in reversed(info["dids"]):
        n = info["records"][did]
        if total + n > budget:
            continue
        out.append(did)
        total += n
    return out


@part("backfill", order=50)
def backfill(ctx: Context) -> list[Row]:
    smoke = ctx.sizes.smoke
    sizes = repo_sizes(ctx)
    total = sum(sizes)
    concurrency = 4
    with tempfile.TemporaryDirectory(prefix="skyfill-bench-") as tmp, spawn(
        "repos", json.dumps(repo_spec(ctx.seed, sizes))
    ) as info:
        url, dids = info["url"], info["dids"]
        db = Path(tmp) / "backfill.duckdb"
        step(f"backfill: fresh, {len(dids)} repos, {total:,} records")
        fresh_s, fresh = _backfill(db, url, dids, concurrency)
        step("backfill: unchanged re-run")
        rerun_s, rerun = _backfill(db, url, dids, concurrency)
        if fresh.records_added != total or rerun.records_unchanged != total:
            raise AssertionError(f"expected {total} records: fresh {fresh.to_json()}, re-run {rerun.to_json()}")
        subset = _original_subset(info, smoke)
        sub_records = sum(info["records"][d] for d in subset)
        step(f"backfill: the original way, {len(subset)} repos, {sub_records:,} records")
        t0 = time.perf_counter()
        stored, inserting = original_way(Path(tmp) / "original.duckdb", url, subset)
        original_s = time.perf_counter() - t0
        if stored != sub_records:
            raise AssertionError(f"original way stored {stored} of {sub_records} records")
        # skyfill on the same subset, fresh, for a like-for-like ratio
        step("backfill: skyfill on the same subset")
        same_s, _ = _backfill(Path(tmp) / "same.duckdb", url, subset, concurrency)
        step("backfill: the largest repo alone (peak RSS)")
        largest = max(dids, key=lambda d: info["records"][d])
        one = run_json("backfill", str(Path(tmp) / "one.duckdb"), url, "1", largest)
        car_bytes = info["car_bytes"][largest]
    fresh_rate = total / fresh_s
    original_rate = sub_records / original_s
    extra = (one["peak_rss"] - one["base_rss"]) / car_bytes
    return [
        Row("backfill.repos", float(len(dids)), "repos"),
        Row("backfill.records", float(total), "records"),
        Row("backfill.server_gen.seconds", info["gen_seconds"], "s"),
        Row.at_least("backfill.fresh", fresh_rate, "records/s", None if smoke else FRESH_TARGET),
        Row.at_least("backfill.unchanged_rerun", total / rerun_s, "records/s", None if smoke else UNCHANGED_TARGET),
        Row("backfill.original_way", original_rate, "records/s"),
        Row("backfill.original_way.without_inserts", sub_records / max(1e-9, original_s - inserting), "records/s"),
        Row("backfill.subset.records", float(sub_records), "records"),
        Row("backfill.subset.skyfill", sub_records / same_s, "records/s"),
        Row.at_least("backfill.vs_original", fresh_rate / original_rate, "x",
                     None if smoke else ORIGINAL_RATIO_TARGET),
        Row(f"backfill.one_repo.{info['records'][largest]}.car_size", car_bytes / 1e6, "MB"),
        Row(f"backfill.one_repo.{info['records'][largest]}.seconds", one["seconds"], "s"),
        Row.at_most("backfill.one_repo.extra_rss_per_car_byte", extra, "x CAR",
                    None if smoke else RSS_CAR_RATIO_TARGET),
    ]
