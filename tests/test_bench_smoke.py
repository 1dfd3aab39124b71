"""The skyfill benchmark parts at tiny sizes, so `make bench` keeps working. No timing assertions:
each part checks its own results (records stored, repos reconciled, reasons found) and raises
when they are wrong; these tests check what the table reports.

Each part runs once: ingest, backfill, profile and peer here in-process, every other part through
`python -m bench --smoke`, which also checks the results file."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cbrrr
import duckdb
import pytest

from tests.support.generate import World
from bench.harness import Context, Row, Sizes, discover
from bench.parts import backfill as backfill_part
from bench.parts import gaps as gaps_part
from bench.parts import peer as peer_part
from bench.parts._workers import spawn, write_frames
from bench.peer import PeerInstall
from bench.peer import installed as peer_installed

PARTS = discover()
ROOT = Path(__file__).resolve().parents[1]
# the parts the tests below run in-process; `python -m bench` runs the others
IN_PROCESS = {"ingest", "backfill", "profile", "peer"}


def _ctx() -> Context:
    return Context(sizes=Sizes.for_run(smoke=True), seed=7)


def _by_name(rows: list[Row]) -> dict[str, Row]:
    names = [r.name for r in rows]
    assert len(names) == len(set(names)), "row names must be unique"
    for row in rows:
        assert math.isfinite(row.value) and row.value > 0, row
        assert row.ok is None, f"smoke rows carry no target: {row}"
    return {r.name: r for r in rows}


def test_ingest_streams_every_frame_through_the_daemon_and_compares_with_the_sdk() -> None:
    rows = _by_name(PARTS["ingest"](_ctx()))
    assert rows["ingest.records_stored"].value > 1000
    assert rows["ingest.peak_rss"].unit == "MB"
    assert {"ingest.frames", "ingest.sdk.frames", "ingest.vs_sdk", "ingest.verified"} <= set(rows)
    assert rows["ingest.vs_sdk"].value == pytest.approx(rows["ingest.frames"].value / rows["ingest.sdk.frames"].value)


def test_backfill_reconciles_every_repo_fresh_and_unchanged_and_runs_the_original_way() -> None:
    ctx = _ctx()
    rows = _by_name(PARTS["backfill"](ctx))
    assert rows["backfill.records"].value == sum(backfill_part.repo_sizes(ctx))
    assert rows["backfill.repos"].value == 10
    for name in ("backfill.fresh", "backfill.unchanged_rerun", "backfill.original_way", "backfill.vs_original",
                 "backfill.one_repo.extra_rss_per_car_byte"):
        assert name in rows


def test_full_size_backfill_holds_a_million_records_in_100_repos() -> None:
    sizes = backfill_part.repo_sizes(Context(sizes=Sizes.for_run(smoke=False)))
    assert len(sizes) == 100 and sum(sizes) == 1_000_000 and min(sizes) > 0


def test_gap_store_exercises_every_reason(tmp_path) -> None:
    path = tmp_path / "g.duckdb"
    gaps_part.build_store(path, n_dids=3_000, n_records=30_000)
    con = duckdb.connect(str(path), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM repos").fetchall()[0][0] == 3_000
        assert con.execute("SELECT count(*) FROM records").fetchall()[0][0] == 30_000
        # every record body is valid JSON with a createdAt the store's created_at agrees with
        bad = con.execute(
            "SELECT count(*) FROM records WHERE json_extract_string(record, '$.createdAt')::TIMESTAMPTZ "
            "<> created_at"
        ).fetchall()[0][0]
        assert bad == 0
    finally:
        con.close()
    timings, counts = gaps_part.measure(path)
    assert set(timings) == {"desynchronized", "never_backfilled", "referenced", "downtime", gaps_part.NETWORK_PASS}
    for reason in set(timings) - {gaps_part.NETWORK_PASS}:
        assert counts[reason] > 0, reason


def test_profile_reports_each_stage_and_the_floor() -> None:
    rows = _by_name(PARTS["profile"](_ctx()))
    for stage in ("floor_libipld", "decode", "state", "arrow_build", "duckdb", "verify_signature"):
        assert f"profile.ingest.{stage}" in rows
    for stage in ("floor_libipld", "fetch", "parse_walk", "materialize", "duckdb", "duckdb_unchanged"):
        assert f"profile.backfill.{stage}" in rows


def test_bench_smoke_runs_and_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    parts = [p for p in PARTS if p not in IN_PROCESS]
    assert {"gen", "floor", "sdk", "gaps"} <= set(parts)
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--seed", "7", "--out", str(out), "--progress-every", "0.2", *parts],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream: the progress lines (stderr) come before the table (stdout)
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout
    # progress as it goes: a start and a done line per part, a heartbeat inside the longer ones,
    # all before the results table
    lines = proc.stdout.splitlines()
    table = next(i for i, line in enumerate(lines) if "skyfill bench (smoke)" in line)
    for name in parts:
        start = next(i for i, line in enumerate(lines) if line.endswith(f"] part {name}: start"))
        done = next(i for i, line in enumerate(lines) if f"] part {name}: done in " in line)
        assert start < done < table, (name, lines)
    assert any(" part gaps: running " in line and "gaps: " in line.split(";")[-1] for line in lines[:table]), lines
    doc = json.loads(out.read_text())
    assert doc["smoke"] is True and doc["errors"] == []
    names = {row["name"] for row in doc["rows"]}
    assert {"gen.frames", "gen.repo", "floor.frames.decode_multi", "floor.repo.decode_car_walk", "sdk.frames"} <= names
    for row in doc["rows"]:
        assert set(row) == {"name", "value", "unit", "target", "ok"}
        assert isinstance(row["value"], (int, float)) and row["value"] > 0


def _peer_or_skip() -> PeerInstall:
    peer = peer_installed()
    if peer is None:
        pytest.skip("the @atproto/sync peer is not installed (make bench-peer-install; make test does it)")
    return peer


def test_peer_runs_the_reference_consumer_unverified_and_verified_next_to_skyfill() -> None:
    _peer_or_skip()
    rows = _by_name(PARTS["peer"](_ctx()))  # raises if the peer rejected or lost any event
    assert rows[f"peer.frames.{peer_part.peer_frames(_ctx())}"].value == 500
    for name in ("peer.sync.frames", "peer.sync.verified.frames", "peer.skyfill.frames",
                 "peer.skyfill.verified.frames"):
        assert rows[name].unit == "frames/s"
    assert rows["peer.skyfill_vs_sync"].value == pytest.approx(
        rows["peer.skyfill.frames"].value / rows["peer.sync.frames"].value)


def test_verified_peer_rejects_a_commit_that_names_another_repo(tmp_path) -> None:
    """The peer's verified mode really authenticates: a commit re-addressed to another DID of the
    world (its blocks signed by the first) is handled unverified and rejected verified."""
    peer = _peer_or_skip()
    world = World(7, n_dids=5, retain_blocks=False)
    frames = list(world.frames(60))
    header = cbrrr.encode_dag_cbor({"op": 1, "t": "#commit"})
    at = next(i for i, f in enumerate(frames) if f.startswith(header))
    body = cbrrr.decode_dag_cbor(frames[at][len(header):])
    signer = body["repo"]
    victim = next(d for d in world.dids if d != signer)
    forged_ops = len(body["ops"])
    body["repo"] = victim
    frames[at] = header + cbrrr.encode_dag_cbor(body)
    path = tmp_path / "frames.bin"
    write_frames(path, frames)
    want = peer_part.expected_events(frames)
    with spawn("firehose", str(path)) as relay, spawn("plc", "7", "5") as plc:
        plain = peer_part.run_peer(peer, relay["url"], plc["url"], world.last_seq, verify=False, timeout=120)
        checked = peer_part.run_peer(peer, relay["url"], plc["url"], world.last_seq, verify=True, timeout=120)
    assert plain["errors"] == {} and Counter(plain["events"]) == want
    assert sum(want.values()) - sum(checked["events"].values()) == forged_ops
    [(reason, count)] = checked["errors"].items()
    assert count == 1 and f"RepoVerificationError: Invalid repo did: {signer}" in reason
