"""`gaps`: `detect_gaps` for a 7-day window on a large store, each reason timed.

The store is built with DuckDB SQL (generate_series), not through skyfill: 1,000,000 DIDs in
every sync state and backfill outcome, 10,000,000 records spread over 60 days with realistic
JSON (likes and reposts of posts by other DIDs, follows, replies, quotes; a sixth of the
referenced DIDs are unknown to the store) so `referenced` has real work, and two coverage
spans with a 2-hour outage inside the window. Downtime runs without a PDS audit (its SQL is
what scales with the store; the audit is network-bound). Then 9,000,000 more DIDs are added (records unchanged) and it runs again (`gaps10m.*` rows).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb

from bench.harness import Context, Row, part
from bench.progress import step

PER_REASON_TARGET_S = 1.0
END = datetime(2025, 6, 30, tzinfo=UTC)
WINDOW = timedelta(days=7)


def _did(expr: str) -> str:
    return f"('did:plc:' || substr(md5(({expr})::VARCHAR), 1, 24))"


_REPOS_SQL = """
INSERT INTO repo_base (did, rev, data_cid, commit_cid, last_seq, last_event_at, active, status, sync_state,
                   desync_reason, desynced_at, first_seen_at, backfill_status, backfilled_at, backfilled_rev, k)
SELECT did, rev, cid_bin('bafyrei' || md5('d' || i)), cid_bin('bafyrei' || md5('c' || i)), i, last_event_at,
       h % 100 <> 0, CASE WHEN h % 100 = 0 THEN 'deactivated' ELSE 'active' END,
       CASE WHEN h % 50 = 1 THEN 'desynchronized' WHEN h % 3 = 0 THEN 'unknown' ELSE 'synchronized' END,
       CASE WHEN h % 50 = 1 THEN 'since_mismatch' END,
       CASE WHEN h % 50 = 1 THEN last_event_at END,
       first_seen_at,
       CASE WHEN h % 3 = 0 THEN NULL WHEN h % 97 = 0 THEN 'RepoTakendown' ELSE 'ok' END,
       CASE WHEN h % 3 = 0 THEN NULL ELSE first_seen_at + INTERVAL 1 HOUR END,
       CASE WHEN h % 3 = 0 THEN NULL ELSE rev END, md5_number_lower(did)
FROM (
    SELECT i, {did} AS did, hash(i) % 1000003 AS h, '3l' || substr(md5('r' || i), 1, 11) AS rev,
           TIMESTAMPTZ '{end}' - to_seconds((hash(i) % 2592000)::BIGINT) AS last_event_at,
           TIMESTAMPTZ '{end}' - to_seconds((hash(i) % 2592000)::BIGINT)
               - to_seconds((hash(i * 3) % 7776000)::BIGINT) AS first_seen_at
    FROM range({lo}, {hi}) t(i)
)
"""


def add_repos(path: Path, *, lo: int, hi: int) -> float:
    """Add DIDs number lo..hi-1 (each in some sync state / backfill outcome); returns seconds."""
    from skyfill.storage import Store

    started = time.perf_counter()
    Store(path).close()  # the schema; the rows are generated in SQL, around skyfill's writer
    with duckdb.connect(str(path)) as con:
        con.execute(_REPOS_SQL.format(did=_did("i"), end=END.isoformat(), lo=lo, hi=hi))
        con.execute("CHECKPOINT")
    return time.perf_counter() - started


def build_store(path: Path, *, n_dids: int, n_records: int) -> float:
    """Fill a fresh skyfill store; returns the seconds it took."""
    from skyfill.storage import Store, refs

    started = time.perf_counter()
    Store(path).close()  # the schema; the rows are generated in SQL, around skyfill's writer
    with duckdb.connect(str(path)) as con:
        end = END.isoformat()
        con.execute(_REPOS_SQL.format(did=_did("i"), end=end, lo=0, hi=n_dids))
        known = n_dids
        space = n_dids + n_dids // 5  # a sixth of the referenced DIDs are not in `repos`
        con.execute(f"""
        INSERT INTO record_base (did, collection, rkey, cid, rev, record, created_us, created_raw, indexed_at, event_at)
        SELECT did, collection, rkey, cid, rev, record, created_off(created_at, created_at),
               created_raw(created_at, created_at), indexed_at, created_at FROM (
        SELECT did, collection, rkey, cid_bin('bafyrei' || md5('v' || i)), '3l' || substr(md5('w' || i), 1, 11),
               CASE collection
                 WHEN 'app.bsky.feed.like' THEN '{{"$type":"app.bsky.feed.like","subject":{{"uri":"at://' || tgt
                      || '/app.bsky.feed.post/' || tid || '","cid":"' || cid || '"}},"createdAt":"' || ts || '"}}'
                 WHEN 'app.bsky.feed.repost' THEN '{{"$type":"app.bsky.feed.repost","subject":{{"uri":"at://' || tgt
                      || '/app.bsky.feed.post/' || tid || '","cid":"' || cid || '"}},"createdAt":"' || ts || '"}}'
                 WHEN 'app.bsky.graph.follow' THEN '{{"$type":"app.bsky.graph.follow","subject":"' || tgt
                      || '","createdAt":"' || ts || '"}}'
                 WHEN 'app.bsky.graph.block' THEN '{{"$type":"app.bsky.graph.block","subject":"' || tgt
                      || '","createdAt":"' || ts || '"}}'
                 ELSE '{{"$type":"app.bsky.feed.post","text":"post number ' || i || ' with some words in it","langs":["en"]'
                      || CASE WHEN h % 10 < 3 THEN ',"reply":{{"parent":{{"uri":"at://' || tgt || '/app.bsky.feed.post/'
                              || tid || '","cid":"' || cid || '"}},"root":{{"uri":"at://' || tgt2
                              || '/app.bsky.feed.post/' || tid || '","cid":"' || cid || '"}}}}' ELSE '' END
                      || CASE WHEN h % 20 = 7 THEN ',"embed":{{"$type":"app.bsky.embed.record","record":{{"uri":"at://'
                              || tgt2 || '/app.bsky.feed.post/' || tid || '","cid":"' || cid || '"}}}}' ELSE '' END
                      || ',"createdAt":"' || ts || '"}}'
               END::JSON,
               created_at, created_at + INTERVAL 2 SECOND
        FROM (
            SELECT i, h, {_did(f'i % {known}')} AS did,
                   CASE WHEN h < 45 THEN 'app.bsky.feed.like' WHEN h < 55 THEN 'app.bsky.feed.repost'
                        WHEN h < 67 THEN 'app.bsky.graph.follow' WHEN h < 70 THEN 'app.bsky.graph.block'
                        ELSE 'app.bsky.feed.post' END AS collection,
                   '3k' || lpad(i::VARCHAR, 11, '0') AS rkey, '3k' || substr(md5('t' || i), 1, 11) AS tid,
                   'bafyrei' || md5('s' || i) AS cid,
                   {_did(f'hash(i * 7) % {space}')} AS tgt, {_did(f'hash(i * 11) % {space}')} AS tgt2,
                   created_at, strftime(created_at AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%S.%gZ') AS ts
            FROM (SELECT i, hash(i) % 100 AS h,
                         TIMESTAMPTZ '{end}' - to_seconds((hash(i * 5) % 5184000)::BIGINT) AS created_at
                  FROM range({n_records}) t(i))
        )) AS g(did, collection, rkey, cid, rev, record, created_at, indexed_at) ORDER BY did, collection, rkey
        """)
        refs.fill_from(con, "record_base")  # the referenced DIDs by hour, as writes append them
        con.execute(f"""
        INSERT INTO coverage (source, first_seq, last_seq, first_event_at, last_event_at, started_at, stopped_at, ended)
        VALUES ('bench', 1, 1000, TIMESTAMPTZ '{end}' - INTERVAL 30 DAY, TIMESTAMPTZ '{end}' - INTERVAL 74 HOUR,
                TIMESTAMPTZ '{end}' - INTERVAL 30 DAY, TIMESTAMPTZ '{end}' - INTERVAL 74 HOUR, 'clean'),
               ('bench', 1001, 2000, TIMESTAMPTZ '{end}' - INTERVAL 72 HOUR, TIMESTAMPTZ '{end}',
                TIMESTAMPTZ '{end}' - INTERVAL 72 HOUR, TIMESTAMPTZ '{end}', 'clean')
        """)
        con.execute("CHECKPOINT")
    return time.perf_counter() - started


# the timing of the one pass over discovery listings (backfill/gaps.py)
NETWORK_PASS = "network"


def measure(path: Path) -> tuple[dict[str, float], dict[str, int]]:
    from skyfill.backfill.gaps import detect_gaps
    from skyfill.storage import Store

    with Store(path) as store:
        report = asyncio.run(detect_gaps(store, start=END - WINDOW, end=END, audit=None, now=END))
    return dict(report.timings), dict(report.counts)


def _rows(label: str, path: Path, setup_s: float, n_dids: int, n_records: int, smoke: bool) -> list[Row]:
    timings, counts = measure(path)
    rows = [Row(f"{label}.dids", float(n_dids), "DIDs"), Row(f"{label}.records", float(n_records), "records"),
            Row(f"{label}.build.seconds", setup_s, "s")]
    for reason, seconds in timings.items():
        if reason == NETWORK_PASS:  # unseen/stale/filter_changed: this store holds no listings (bench-network's part)
            rows.append(Row(f"{label}.{reason}", seconds, "s"))
            continue
        if counts.get(reason, 0) == 0 and not smoke:
            raise AssertionError(f"reason {reason} found nothing; the store does not exercise it")
        rows.append(Row.at_most(f"{label}.{reason}", seconds, "s", None if smoke else PER_REASON_TARGET_S))
        rows.append(Row(f"{label}.{reason}.found", float(counts.get(reason, 0)), "DIDs"))
    return rows


@part("gaps", order=60)
def gaps(ctx: Context) -> list[Row]:
    """1M DIDs and 10M records; then the same records with 10M DIDs (9M more repos rows)."""
    smoke = ctx.sizes.smoke
    n_dids, n_records, big = (2_000, 20_000, 20_000) if smoke else (1_000_000, 10_000_000, 10_000_000)
    with tempfile.TemporaryDirectory(prefix="skyfill-bench-") as tmp:
        path = Path(tmp) / "gaps.duckdb"
        step(f"gaps: building a store of {n_dids:,} DIDs and {n_records:,} records")
        build_s = build_store(path, n_dids=n_dids, n_records=n_records)
        step("gaps: timing each gap reason")
        rows = _rows("gaps", path, build_s, n_dids, n_records, smoke)
        step(f"gaps: adding repos rows up to {big:,} DIDs, then timing each reason again")
        extend_s = add_repos(path, lo=n_dids, hi=big)
        rows += _rows("gaps10m", path, extend_s, big, n_records, smoke)
    return rows
