"""Cached DuckDB stores of N records for `python -m bench.scale`, built in SQL from real bodies.

Python draws records at ~20k/s, too slow for 10^8, so a pool of real record bodies is drawn
once with the generator's `RecordMaker` (the bench's realistic collection mix) and turned into
stored JSON text by the same function the mirror uses (`protocol.records.record_json`). DuckDB
then synthesises the keys around them:

- N/10 DIDs `did:plc:` + 24 base32 chars of md5(DID number); records per DID are skewed like a
  real network (DID d holds floor(N*sqrt((d+1)/D)) - floor(N*sqrt(d/D)): a few accounts with
  tens of thousands of records, most with 5-10), the DID numbers scattered in key order;
- record number i takes pool body p = i mod P; its TID rkey is that body's createdAt time with
  clock id q = i div P (unique as long as N < 1024 * P), its CID 'bafyrei' + 50 random base32
  chars drawn for p + 2 chars of q (unique, 59 chars in the canonical form of a real dag-cbor
  CIDv1, so the store keeps its 32-byte digest); created_at and
  event_at are the body's createdAt (so a one-day window holds P/60 distinct bodies, each ~N/P times);
- one repos row per DID (98% synchronized and backfilled; 1% desynchronized, 1% never
  backfilled, so every gap reason has rows to find), a cursor and two coverage spans with a
  two-hour outage in the last day.

Rows go straight into the store's tables with INSERT ... SELECT, sorted by (did, collection, rkey),
in chunks of DIDs so no sort holds the whole table. A store is cached under .cache/scale/<label>.duckdb
and rebuilt only when it is missing or was built by another BUILD_VERSION, layout or DuckDB version.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbrrr
import duckdb
import pyarrow as pa

from skyfill.protocol.records import record_json
from skyfill.storage import Store
from skyfill.storage.records import BASE_COLUMNS
from tests.support.generate import FIREHOSE_EPOCH_MICROS, RecordMaker, tid

__all__ = [
    "BUILD_VERSION",
    "CACHE_DIR",
    "END_MICROS",
    "SPAN_MICROS",
    "Built",
    "current_layout",
    "ensure_store",
    "build_store",
    "did_of",
    "make_pool",
]

BUILD_VERSION = 5                             # 3: canonical record CIDs, stored binary (schema 3); 4: no refs column (ref_base); 5: created_at as parsed from the body (ms), stored after event_at, repo_base CIDs binary, the DID key k (schema 5)
ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = ROOT / ".cache" / "scale"
END_MICROS = FIREHOSE_EPOCH_MICROS            # a built store's history ends where the bench firehose begins
SPAN_MICROS = 60 * 86_400_000_000             # ... and starts 60 days earlier
POOL_SIZE = 200_000
CHUNK_RECORDS = 2_000_000                     # records per INSERT (one sort each)
RECORDS_PER_DID = 10
BUILD_MEMORY = "4GB"                          # DuckDB's buffer pool while building (default: 80% of RAM)
UNKNOWN_PEERS = 6                             # 1 in 6 referenced DIDs has no repos row
_S32 = "234567abcdefghijklmnopqrstuvwxyz"
_Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Built:
    path: Path
    records: int
    dids: int
    layout: str          # "v1": records/repos tables; "v2": record_base/repo_base under views (_layout_of)
    seconds: float       # how long the file took to build (a cached file: when it was built)
    cached: bool


_KINDS_SQL = "SELECT table_name, table_type FROM information_schema.tables WHERE table_name IN ('records', 'repos')"


def _layout_of(kinds: dict[str, str]) -> str:
    """"v2": `records` and `repos` are views over record_base / repo_base; "v1": both tables;
    "v2-records" / "v2-repos": only one of them is a view (a branch with half of the new layout)."""
    views = {name for name, kind in kinds.items() if kind == "VIEW"}
    return "v2" if views == {"records", "repos"} else "v1" if not views else f"v2-{views.pop()}"


def current_layout() -> str:
    """The layout `Store` creates today (see `_layout_of`)."""
    with Store(":memory:") as store:
        return _layout_of(dict(store.fetchall(_KINDS_SQL)))


def did_of(n: int) -> str:
    """The DID of DID number n, as the SQL `_did(n)` below spells it."""
    h = hashlib.md5(str(n).encode()).digest()
    up, lo = int.from_bytes(h[:8], "little"), int.from_bytes(h[8:], "little")
    return "did:plc:" + "".join(_S32[(x >> (5 * k)) & 31] for x in (up, lo) for k in range(12))


def _b32(expr: str, n: int) -> str:
    """SQL: n base32 chars from the low 5n bits of the UBIGINT `expr` (one concat: chained || copies)."""
    return "concat(" + ", ".join(f"b32c({expr}, {k})" for k in range(n)) + ")"


_DID_SQL = (
    "concat('did:plc:', " + _b32("md5_number_upper(d::VARCHAR)", 12) + ", "
    + _b32("md5_number_lower(d::VARCHAR)", 12) + ")"
)


def _peers(n_dids: int, count: int, rng: random.Random) -> list[str]:
    """Referenced DIDs: popular accounts more often (u^2 skew), 1 in UNKNOWN_PEERS outside the store."""
    out = []
    for _ in range(count):
        if rng.randrange(UNKNOWN_PEERS) == 0:
            out.append(did_of(n_dids + rng.randrange(max(1, n_dids))))
        else:
            out.append(did_of(int(n_dids * rng.random() ** 2)))
    return out


_REF_COLLECTIONS = ("app.bsky.feed.like", "app.bsky.feed.repost", "app.bsky.feed.post", "app.bsky.graph.follow")


def _refs(record: dict[str, Any]) -> list[str] | None:
    """DIDs a record references (as the store's record_refs): a like/repost/follow's subject (DID
    or URI), a post's reply parent/root and quoted record; None for other collections."""
    if record.get("$type") not in _REF_COLLECTIONS:
        return None
    uris: list[Any] = []
    subject = record.get("subject")
    uris.append(subject.get("uri") if isinstance(subject, dict) else subject)
    reply = record.get("reply") or {}
    uris += [(reply.get("parent") or {}).get("uri"), (reply.get("root") or {}).get("uri")]
    embed = record.get("embed") or {}
    quoted = embed.get("record") or {}
    uris += [quoted.get("uri"), (quoted.get("record") or {}).get("uri")]
    out: list[str] = []
    for u in uris:
        if isinstance(u, str):
            did = u if u.startswith("did:") else u.split("/")[2] if u.startswith("at://did:") else None
            if did and did not in out:
                out.append(did)
    return out


def make_pool(size: int, *, n_dids: int, seed: int = 1) -> pa.Table:
    """`size` real record bodies (stored JSON text), their collection, createdAt, TID prefix and refs."""
    rng = random.Random(seed)
    maker = RecordMaker(rng, peers=_peers(n_dids, min(100_000, max(100, n_dids)), rng))
    seen: set[int] = set()
    cols: dict[str, list[Any]] = {k: [] for k in ("p", "collection", "body", "micros", "tid11", "cid50", "refs")}
    while len(seen) < size:
        micros = END_MICROS - rng.randrange(SPAN_MICROS)
        if micros in seen:
            continue
        seen.add(micros)
        collection = maker.collection()
        record = maker.record(collection, micros)
        body, _created = record_json(cbrrr.encode_dag_cbor(record))
        cols["p"].append(len(seen) - 1)
        cols["collection"].append(collection)
        cols["body"].append(body)
        cols["micros"].append(micros)
        cols["tid11"].append(tid(micros, 0)[:11])
        cols["cid50"].append("".join(rng.choice(_S32) for _ in range(50)))
        cols["refs"].append(_refs(record))
    return pa.table(cols)


# -- the v2 tables, until the store creates them ---------------------------------------------------

_REPO_COLUMNS = """
    rev VARCHAR, data_cid VARCHAR, commit_cid VARCHAR, last_seq BIGINT, last_event_at TIMESTAMPTZ,
    handle VARCHAR, active BOOLEAN NOT NULL DEFAULT TRUE, status VARCHAR NOT NULL DEFAULT 'active',
    sync_state VARCHAR NOT NULL DEFAULT 'unknown', desync_reason VARCHAR, desynced_at TIMESTAMPTZ,
    first_seen_at TIMESTAMPTZ NOT NULL, backfill_status VARCHAR, backfill_error VARCHAR,
    backfill_attempts INTEGER NOT NULL DEFAULT 0, backfill_retry_after TIMESTAMPTZ,
    backfilled_at TIMESTAMPTZ, backfilled_rev VARCHAR
"""


# -- SQL ---------------------------------------------------------------------------------------------

def _ts(micros_expr: str) -> str:
    return f"make_timestamptz(({micros_expr})::BIGINT)"


_DIDS_SQL = f"""
CREATE OR REPLACE TEMP TABLE dids AS
SELECT row_number() OVER (ORDER BY did) - 1 AS rank, *, tid11(last_micros) || 'a2' AS rev
FROM (
    SELECT d, {_DID_SQL} AS did,
           floor({{n}} * sqrt(d / {{dids}}))::BIGINT AS off,
           floor({{n}} * sqrt((d + 1) / {{dids}}))::BIGINT - floor({{n}} * sqrt(d / {{dids}}))::BIGINT AS c,
           hash(d) % 100 AS h,
           {END_MICROS} - (hash(d * 7) % {SPAN_MICROS // 2})::BIGINT AS last_micros
    FROM range({{dids}}) t(d)
)
ORDER BY did
"""


def _cid(p: str, i: str, pool: str = "{pool}") -> str:
    """SQL: a unique CID for number i in the canonical form of a dag-cbor sha256 CIDv1, as the network's:
    'bafyrei', a char of 'a'-'h' (its first 2 bits belong to the prefix), 48 of pool row p's random
    chars, 2 chars of the cycle i // P (< 1024), a char whose last 2 bits (padding) are 0."""
    q = f"({i} // {pool})"
    return (f"concat('bafyrei', substr('abcdefgh', ascii({p}.cid50[1]) % 8 + 1, 1), {p}.cid50[2:49], "
            f"b32c({q}, 1), b32c({q}, 0), substr('aeimquy4', ascii({p}.cid50[50]) % 8 + 1, 1))")


_REPOS_SQL = f"""
INSERT INTO {{table}} (did, rev, data_cid, commit_cid, last_seq, last_event_at, active, status, sync_state,
                       desync_reason, desynced_at, first_seen_at, backfill_status, backfill_attempts,
                       backfilled_at, backfilled_rev{{key_column}})
SELECT did, rev, {{wrap}}({_cid('a', 'd * 2')}), {{wrap}}({_cid('b', 'd * 2 + 1')}),
       d, {_ts('last_micros')}, TRUE, 'active',
       CASE WHEN h = 1 THEN 'desynchronized' WHEN h = 2 THEN 'unknown' ELSE 'synchronized' END,
       CASE WHEN h = 1 THEN 'since_mismatch' END,
       CASE WHEN h = 1 THEN {_ts('last_micros')} END,
       {_ts(f'{END_MICROS - SPAN_MICROS} - (hash(d * 3) % 86400000000)::BIGINT')},
       CASE WHEN h = 2 THEN NULL ELSE 'ok' END, CASE WHEN h = 2 THEN 0 ELSE 1 END,
       CASE WHEN h = 2 THEN NULL ELSE {_ts(f'{END_MICROS - SPAN_MICROS}')} END,
       CASE WHEN h = 2 THEN NULL ELSE rev END{{key_value}}
FROM dids JOIN pool a ON a.p = (d * 2) % {{pool}} JOIN pool b ON b.p = (d * 2 + 1) % {{pool}}
ORDER BY did
"""

_KEYS_SQL = f"""
SELECT k.did, p.collection,
       concat(p.tid11, b32c(k.i // {{pool}}, 1), b32c(k.i // {{pool}}, 0)) AS rkey,
       cid_bin({_cid('p', 'k.i', '{pool}')}) AS cid, k.rev,
       p.body AS record, {_ts('p.micros // 1000 * 1000')} AS created_at, {_ts('p.micros')} AS event_at,
       {_ts('p.micros + 2000000')} AS indexed_at
FROM (SELECT did, rev, off + j AS i
      FROM (SELECT did, rev, off, unnest(range(c)) AS j FROM dids WHERE rank >= {{lo}} AND rank < {{hi}})) k
JOIN pool p ON p.p = k.i % {{pool}}
ORDER BY k.did, p.collection, rkey
"""

_V1_COLUMNS = "did, collection, rkey, cid, rev, record, created_at, indexed_at"
_V1_RECORDS = ("records", _V1_COLUMNS, _V1_COLUMNS)
# record_base keeps created_at as microseconds after event_at (schema 5): written as the compaction writes it
_V2_RECORDS = ("record_base", BASE_COLUMNS,
               "did, collection, rkey, cid, rev, record, created_off(created_at, event_at), "
               "created_raw(created_at, event_at), indexed_at, event_at")
# the referenced DIDs by hour (storage/refs.py) of the pool rows the records use (record i uses row i % pool)
_V2_REFS = """
INSERT INTO ref_base SELECT DISTINCT ref_hour(make_timestamptz(micros)) AS hour, unnest(refs) AS did
FROM pool WHERE p < {n} ORDER BY hour, did
"""

_CURSOR_COVERAGE_SQL = f"""
INSERT INTO cursors VALUES ('wss://bsky.network', 1000000000, {_ts(END_MICROS)});
INSERT INTO coverage (source, first_seq, last_seq, first_event_at, last_event_at, started_at, stopped_at, ended)
VALUES ('wss://bsky.network', 1, 900000000, {_ts(END_MICROS - SPAN_MICROS)}, {_ts(END_MICROS - 6 * 3_600_000_000)},
        {_ts(END_MICROS - SPAN_MICROS)}, {_ts(END_MICROS - 6 * 3_600_000_000)}, 'clean'),
       ('wss://bsky.network', 900000001, 1000000000, {_ts(END_MICROS - 4 * 3_600_000_000)}, {_ts(END_MICROS)},
        {_ts(END_MICROS - 4 * 3_600_000_000)}, {_ts(END_MICROS)}, 'clean');
"""


def _macros(con: duckdb.DuckDBPyConnection) -> None:
    # base32-sortable char of 5 bits: 0-5 -> '2'-'7', 6-31 -> 'a'-'z'
    con.execute("CREATE OR REPLACE TEMP MACRO b32c(x, k) AS "
                "chr(((x >> (5 * k)) & 31)::INTEGER + CASE WHEN ((x >> (5 * k)) & 31) < 6 THEN 50 ELSE 91 END)")
    # the first 11 chars of tid(micros, 0): bits 63..10 of micros << 10
    con.execute("CREATE OR REPLACE TEMP MACRO tid11(m) AS concat("
                + ", ".join(f"b32c(m::UBIGINT, {k})" for k in range(10, -1, -1)) + ")")


def build_store(path: Path, n_records: int, *, layout: str, pool: pa.Table, progress: _Progress = print) -> float:
    """Write a store of n_records records (n_records // 10 DIDs) to `path`; returns seconds."""
    started = time.perf_counter()
    n_dids = max(1, n_records // RECORDS_PER_DID)
    if n_records >= 1024 * pool.num_rows:
        raise ValueError(f"{n_records} records need a pool over {n_records // 1024} bodies")
    Store(path).close()  # every table, view and sequence of the store; rows are added around its writer
    con = duckdb.connect(str(path))
    try:
        kinds = dict(con.execute(_KINDS_SQL).fetchall())
        con.execute("SET enable_progress_bar = false")
        con.execute(f"SET memory_limit = '{BUILD_MEMORY}'")  # the machine is shared; a chunk's sort fits
        tmp = path.parent / (path.name + ".tmp")
        con.execute(f"SET temp_directory = '{tmp}'")
        _macros(con)
        con.register("pool_arrow", pool)
        con.execute("CREATE TEMP TABLE pool AS SELECT * REPLACE (body::JSON AS body) FROM pool_arrow")
        con.unregister("pool_arrow")
        con.execute(_DIDS_SQL.format(n=n_records, dids=n_dids))
        repos = "repo_base" if kinds["repos"] == "VIEW" else "repos"
        key = repos == "repo_base"  # the v2 layout: binary CIDs and the DID key (storage/repos.py)
        con.execute(_REPOS_SQL.format(table=repos, pool=pool.num_rows, wrap="cid_bin" if key else "",
                                      key_column=", k" if key else "",
                                      key_value=", md5_number_lower(did)" if key else ""))
        progress(f"  {n_dids:,} repos rows in {time.perf_counter() - started:.0f}s")
        table, columns, select = _V2_RECORDS if kinds["records"] == "VIEW" else _V1_RECORDS
        per_chunk = max(1, CHUNK_RECORDS // RECORDS_PER_DID)
        for lo in range(0, n_dids, per_chunk):
            con.execute(f"INSERT INTO {table} ({columns}) SELECT {select} FROM ("
                        + _KEYS_SQL.format(pool=pool.num_rows, lo=lo, hi=lo + per_chunk) + ")")
            done = min(n_dids, lo + per_chunk)
            progress(f"  records of {done:,}/{n_dids:,} DIDs in {time.perf_counter() - started:.0f}s")
        if kinds["records"] == "VIEW":
            con.execute(_V2_REFS.format(n=n_records))
        con.execute(_CURSOR_COVERAGE_SQL)
        con.execute("DROP TABLE dids; DROP TABLE pool")
        con.execute("CHECKPOINT")
    finally:
        con.close()
    return time.perf_counter() - started


def label(n_records: int) -> str:
    for unit, div in (("m", 1_000_000), ("k", 1_000)):
        if n_records >= div and n_records % div == 0:
            return f"{n_records // div}{unit}"
    return str(n_records)


def ensure_store(n_records: int, *, cache_dir: Path = CACHE_DIR,
                 pool_size: int = POOL_SIZE, progress: _Progress = print) -> Built:
    """The cached store of n_records records in the layout `Store` creates, built first when
    missing or stale (another BUILD_VERSION, layout or DuckDB version)."""
    layout = current_layout()
    n_dids = max(1, n_records // RECORDS_PER_DID)
    path = cache_dir / f"{label(n_records)}.duckdb"
    meta_path = path.with_suffix(".json")
    # the DuckDB that wrote it: a file of another version may not open (2.x files do not on 1.5)
    want = {"version": BUILD_VERSION, "layout": layout, "records": n_records, "pool": pool_size,
            "duckdb": duckdb.__version__}
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in want} == want:
            with Store(path):  # a store cached by an older schema version is migrated on open, once
                pass
            return Built(path, n_records, n_dids, layout, float(meta.get("build_seconds", 0.0)), cached=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    work = path.with_name(path.name + ".building")
    work.unlink(missing_ok=True)
    Path(str(work) + ".wal").unlink(missing_ok=True)
    progress(f"building {path.name}: {n_records:,} records, {n_dids:,} DIDs, layout {layout}")
    t0 = time.perf_counter()
    pool = make_pool(pool_size, n_dids=n_dids)
    pool_s = time.perf_counter() - t0
    progress(f"  pool of {pool_size:,} bodies in {pool_s:.0f}s")
    seconds = pool_s + build_store(work, n_records, layout=layout, pool=pool, progress=progress)
    shutil.rmtree(work.parent / (work.name + ".tmp"), ignore_errors=True)
    os.replace(work, path)
    meta_path.write_text(json.dumps({**want, "build_seconds": seconds, "bytes": path.stat().st_size}))
    progress(f"  built {path.name} in {seconds:.0f}s ({path.stat().st_size / 1e9:.2f} GB)")
    return Built(path, n_records, n_dids, layout, seconds, cached=False)
