"""`python -m bench.scale` (make bench-scale) at smoke sizes, and the store builder it caches.

No timing assertions: the smoke run checks that every row of every size is reported in the
`{name, value, unit, target, ok}` shape of bench/results/latest.json; the builder tests check
that a built store holds what a mirror would (one row per key, real bodies, sorted keys)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import UTC
from pathlib import Path
from types import SimpleNamespace

import duckdb
import pytest

from bench.scale import __main__ as scale_main
from bench.scale import build, lake
from skyfill.backfill.gaps import Reason
from skyfill.errors import StorageError
from skyfill.storage import RecordChange, RepoChange, Store
from skyfill.storage.migrate import SCHEMA_VERSION

# each reason's query is timed on its own, except the three over discovery listings: one pass (`network`)
TIMED = [r.value for r in Reason if r not in (Reason.EXPLICIT, Reason.UNSEEN, Reason.STALE, Reason.FILTER_CHANGED)] + ["network"]

ROOT = Path(__file__).resolve().parents[1]
DID_RE = re.compile(r"^did:plc:[a-z2-7]{24}$")
TID_RE = re.compile(r"^[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}$")
CID_RE = re.compile(r"^bafyrei[a-z2-7]{52}$")


def test_smoke_run_reports_every_row_for_every_size(tmp_path) -> None:
    out = tmp_path / "scale.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--smoke", "--out", str(out), "--cache", str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["smoke"] is True and doc["errors"] == []
    rows = {r["name"]: r for r in doc["rows"]}
    for row in doc["rows"]:
        assert set(row) == {"name", "value", "unit", "target", "ok"}, row
        assert isinstance(row["value"], (int, float)) and row["value"] >= 0, row
        assert row["target"] is None and row["ok"] is None, f"smoke rows carry no target: {row}"
    wanted = [f"scale.ingest.frames_per_s.{s}" for s in ("0", "20k")] + [
        "scale.ingest.vs_empty.20k", "scale.ingest.peak_rss_mb.0", "scale.ingest.peak_rss_mb.20k",
        "scale.backfill.records_per_s.0", "scale.backfill.records_per_s.20k", "scale.backfill.vs_empty.20k",
        "scale.bytes_per_record.20k", "scale.build.seconds.20k",
    ] + [f"scale.gaps.{r}.{s}" for r in TIMED for s in ("0", "20k")]
    missing = [name for name in wanted if name not in rows]
    assert not missing, f"missing rows {missing}; have {sorted(rows)}"
    assert rows["scale.ingest.peak_rss_mb.20k"]["unit"] == "MB"
    assert 0 < rows["scale.bytes_per_record.20k"]["value"] < 10_000
    # the lake part: one and two real `skyfill sink` processes into one DuckLake, one into a file
    lake = ["lake.sink.records_per_s.1", "lake.sink.records_per_s.2", "lake.vs_file", "lake.vs_file.cpu", "lake.bytes_per_record",
            "lake.catalog_mb", "lake.retries.2", "lake.cpu_s.1.sink1", "lake.cpu_s.2.sink1", "lake.cpu_s.2.sink2",
            "lake.cpu_s.1.postgres", "lake.cpu_s.2.postgres", "lake.cpu_s.file.sink1",
            "lake.projected_records_per_s_per_machine"]
    assert not [name for name in lake if name not in rows], sorted(n for n in rows if n.startswith("lake."))
    assert all(rows[name]["value"] > 0 for name in lake if name != "lake.retries.2"), [rows[n] for n in lake]
    assert rows["lake.vs_file"]["value"] == pytest.approx(
        rows["lake.sink.records_per_s.1"]["value"] / rows["lake.file.records_per_s"]["value"])
    assert 0 < rows["lake.bytes_per_record"]["value"] < 10_000
    # the cached store is reused by a second run (no rebuild)
    assert (tmp_path / "cache" / "20k.duckdb").exists()
    assert json.loads((tmp_path / "cache" / "20k.json").read_text())["version"] == build.BUILD_VERSION


def test_lake_messages_are_firehose_commits_keyed_by_did() -> None:
    """The lake runs' data: each record change is followed by its DID's repo message at the same
    rev; a delete only removes a record the DID created earlier and still holds."""
    chunks = list(lake.changes(12_000))
    flat = [c for chunk in chunks for c in chunk]
    assert len(chunks) > 1 and len(flat) == 24_000
    held: set[tuple[str, str, str]] = set()
    deletes = 0
    for change, repo in zip(flat[::2], flat[1::2]):
        assert isinstance(change, RecordChange) and isinstance(repo, RepoChange)
        assert (repo.did, repo.rev, repo.seq, repo.kind) == (change.did, change.rev, change.seq, "commit")
        key = (change.did, change.collection, change.rkey)
        if change.op == "delete":
            assert key in held and change.record is None
            held.remove(key)
            deletes += 1
        else:
            assert key not in held and json.loads(change.record)["$type"] == change.collection
            held.add(key)
    assert 0.03 < deletes / 12_000 < 0.07


def test_sizes_parse() -> None:
    assert [scale_main.parse_size(s) for s in ("0", "20k", "10m", "100M", "1.5m")] == [0, 20_000, 10_000_000, 100_000_000,
                                                                           1_500_000]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scale") / "s.duckdb"
    pool = build.make_pool(500, n_dids=600)
    build.build_store(path, 6_000, layout=build.current_layout(), pool=pool, progress=lambda _m: None)
    return path


def test_built_store_holds_one_live_row_per_key_sorted_with_real_bodies(built) -> None:
    with duckdb.connect(str(built), read_only=True) as con:
        n, keys, dids = con.execute(
            "SELECT count(*), count(DISTINCT (did, collection, rkey)), count(DISTINCT did) FROM records"
        ).fetchall()[0]
        assert n == keys == 6_000 and 0 < dids <= 600
        assert con.execute("SELECT count(*), count(DISTINCT did) FROM repos").fetchall()[0] == (600, 600)
        tables = {t for (t,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        stored = "record_base" if "record_base" in tables else "records"  # the rows as written (rowid order)
        cid = "cid_text(cid)" if stored == "record_base" else "cid"  # stored binary since schema 3
        # after event_at since schema 5
        created = "created_at_from(created_us, created_raw, event_at)" if stored == "record_base" else "created_at"
        rows = con.execute(
            f"SELECT did, collection, rkey, {cid}, rev, record::VARCHAR, {created} FROM {stored} ORDER BY rowid"
        ).fetchall()
        if stored == "record_base":  # real-form CIDs: every one kept as its 32-byte digest
            assert con.execute("SELECT bool_and(octet_length(cid) = 32) FROM record_base").fetchall() == [(True,)]
        keys_in_order = [r[:3] for r in rows]
        assert keys_in_order == sorted(keys_in_order)
        for did, collection, rkey, cid, rev, body, created_at in rows:
            assert DID_RE.match(did) and TID_RE.match(rkey) and CID_RE.match(cid) and TID_RE.match(rev)
            record = json.loads(body)
            assert record["$type"] == collection
            assert record["createdAt"][:19] == created_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
            # as a writer parses it: the body's milliseconds
            assert record["createdAt"][19:] == f".{created_at.microsecond // 1000:03d}Z" and created_at.microsecond % 1000 == 0
        assert len({r[3] for r in rows}) == len(rows), "CIDs are unique"
        mix = dict(con.execute("SELECT collection, count(*) FROM records GROUP BY ALL").fetchall())
        assert mix["app.bsky.feed.like"] > mix["app.bsky.graph.follow"] > mix["app.bsky.actor.profile"]
        assert {d for (d,) in con.execute("SELECT did FROM repos").fetchall()} >= {r[0] for r in rows}
        assert build.did_of(0) in {d for (d,) in con.execute("SELECT did FROM repos").fetchall()}


def test_cached_store_is_reused_until_the_build_version_changes(tmp_path, monkeypatch) -> None:
    first = build.ensure_store(3_000, cache_dir=tmp_path, pool_size=300, progress=lambda _m: None)
    assert not first.cached and first.path.exists()
    again = build.ensure_store(3_000, cache_dir=tmp_path, pool_size=300, progress=lambda _m: None)
    assert again.cached and again.path == first.path
    monkeypatch.setattr(build, "BUILD_VERSION", build.BUILD_VERSION + 1)
    assert not build.ensure_store(3_000, cache_dir=tmp_path, pool_size=300, progress=lambda _m: None).cached


def test_a_cached_store_of_an_older_schema_version_is_migrated_when_reused(tmp_path) -> None:
    """The measurements open copies read-only (gaps): a cached store written by an older schema
    version must be migrated once when reused, or every measurement of that size fails."""
    first = build.ensure_store(3_000, cache_dir=tmp_path, pool_size=300, progress=lambda _m: None)
    with duckdb.connect(str(first.path)) as con:
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION - 1)])
    with pytest.raises(StorageError, match="skyfill migrate"):
        Store(first.path, read_only=True)
    again = build.ensure_store(3_000, cache_dir=tmp_path, pool_size=300, progress=lambda _m: None)
    assert again.cached
    with Store(again.path, read_only=True) as store:
        assert store.fetchall("SELECT count(*) FROM records") == [(3_000,)]


def test_v2_build_fills_the_base_tables_with_refs_and_event_times(tmp_path) -> None:
    built = build.ensure_store(3_000, cache_dir=tmp_path, pool_size=300, progress=lambda _m: None)
    with duckdb.connect(str(built.path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM record_base").fetchall()[0][0] == 3_000
        assert con.execute("SELECT count(*) FROM repo_base").fetchall()[0][0] == 300
        assert con.execute("SELECT count(*) FROM record_base WHERE event_at IS NULL").fetchall()[0][0] == 0
        # likes and follows reference one DID each, kept by hour of their event time in ref_base
        assert con.execute(
            "SELECT bool_and(EXISTS (SELECT 1 FROM ref_base f WHERE f.hour = ref_hour(r.event_at) "
            "AND f.did = json_extract_string(r.record, '$.subject'))) FROM record_base r "
            "WHERE collection = 'app.bsky.graph.follow'").fetchall()[0][0]
        assert con.execute(
            "SELECT bool_and(EXISTS (SELECT 1 FROM ref_base f WHERE f.hour = ref_hour(r.event_at) "
            "AND f.did = split_part(json_extract_string(r.record, '$.subject.uri'), '/', 3))) FROM record_base r "
            "WHERE collection = 'app.bsky.feed.like'").fetchall()[0][0]
        assert con.execute("SELECT count(*) FROM ref_base").fetchall()[0][0] == con.execute(
            "SELECT count(*) FROM (SELECT DISTINCT hour, did FROM ref_base)").fetchall()[0][0]


def test_jsonbench_results_become_rows(monkeypatch, tmp_path) -> None:
    """The shape bench/scale/jsonbench.py's run(con) returns -> scale.jsonbench.* rows."""
    seen = []

    def run(con, **_kw):
        seen.append(con.execute("SELECT 42").fetchall())
        return {"rows": 3, "mirror": {f"q{i}": 0.01 * i for i in range(1, 6)},
                "json": {f"q{i}": 0.1 * i for i in range(1, 6)}, "speedup": {}, "min_speedup": 10.0}

    monkeypatch.setattr(scale_main, "jsonbench", SimpleNamespace(run=run))
    rows = {r.name: r for r in scale_main._jsonbench_rows(tmp_path / "x.duckdb", smoke=False)}
    assert seen == [[(42,)]]
    assert [f"scale.jsonbench.q{i}" for i in range(1, 6)] == [n for n in rows if n.startswith("scale.jsonbench.q")]
    assert rows["scale.jsonbench.q5"].value == 0.05 and rows["scale.jsonbench.q5"].ok is True
    assert rows["scale.jsonbench.vs_json"].value == 10.0 and rows["scale.jsonbench.vs_json"].target == 5.0
