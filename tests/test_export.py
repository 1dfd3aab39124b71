"""`skyfill export --parquet`: the files hold exactly the live records, readable without skyfill."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow.dataset as ds
import pytest

from skyfill.app import export as export_module
from skyfill.app.export import EXPORT_TIME_SQL, export_parquet
from skyfill.backfill import progress
from skyfill.errors import ConfigError
from skyfill.storage import Store

from .support.records import BASE_MICROS, DAY_MICROS, encode_record, generated_records, write_records

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
POST, LIKE = "app.bsky.feed.post", "app.bsky.feed.like"
BASE = EPOCH + timedelta(microseconds=BASE_MICROS)


def _us(value: Any) -> Any:
    return (value - EPOCH) // timedelta(microseconds=1) if isinstance(value, datetime) else value


def _norm(rows: list[Any]) -> list[tuple[Any, ...]]:
    return sorted(tuple(_us(v) for v in row) for row in rows)


_COLS = "did, collection, rkey, cid, rev, record::VARCHAR, created_at, event_at, indexed_at, date::VARCHAR"


def stored_rows(store: Store, where: str = "", params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    rows = store.fetchall(
        f"SELECT * REPLACE (strftime({EXPORT_TIME_SQL} AT TIME ZONE 'UTC', '%Y-%m-%d') AS date) FROM ("
        f"SELECT did, collection, rkey, cid, rev, record::VARCHAR, created_at, event_at AS event_at, "
        f"indexed_at, NULL AS date FROM records {where})", params or [])
    return _norm(rows)


def duckdb_rows(directory: Path) -> list[tuple[Any, ...]]:
    con = duckdb.connect()
    return _norm(con.execute(f"SELECT {_COLS} FROM read_parquet('{directory}/**/*.parquet', "
                             "hive_partitioning = true)").fetchall())


def pyarrow_rows(directory: Path) -> list[tuple[Any, ...]]:
    table = ds.dataset(directory, format="parquet", partitioning="hive").to_table()
    names = ["did", "collection", "rkey", "cid", "rev", "record", "created_at", "event_at", "indexed_at", "date"]
    return _norm([tuple(str(row[n]) if n == "date" else row[n] for n in names) for row in table.to_pylist()])


@pytest.fixture
def store(tmp_path: Path) -> Store:
    with Store(tmp_path / "export.duckdb") as s:
        records = generated_records(700, seed=5, days=4)
        # no valid createdAt: filed under the day it was indexed
        records.append(encode_record("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", POST, "3laaaaaaaaaab",
                                     {"$type": POST, "text": "when?", "createdAt": "yesterday"}))
        write_records(s, records, chunk=300)
        yield s


def test_export_equals_records(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "out"
    seen: list[tuple[str, int]] = []
    summary = export_parquet(store, out, on_collection=lambda c, n: seen.append((c, n)))
    expected = stored_rows(store)
    assert summary.rows == len(expected) == 701
    assert dict(seen) == summary.collections and len(seen) == 8
    assert duckdb_rows(out) == expected
    assert pyarrow_rows(out) == expected
    dates = {p.name for p in out.glob("collection=*/date=*")}
    assert len(dates) >= 5  # four days of createdAt and today's indexed_at
    assert summary.files == len(list(out.glob("collection=*/date=*/*.parquet")))
    # each file holds only rows of its folder's collection and date
    con = duckdb.connect()
    wrong = con.execute(f"SELECT count(*) FROM read_parquet('{out}/**/*.parquet', hive_partitioning = true, "
                        "filename = true) WHERE filename NOT LIKE '%collection=' || collection || '/date=' || "
                        "strftime(date, '%Y-%m-%d') || '/%'").fetchall()
    assert wrong == [(0,)]


def test_collections_and_since_filter(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "some"
    since = BASE + timedelta(days=2)
    summary = export_parquet(store, out, collections=[POST, LIKE], since=since)
    expected = stored_rows(store, f"WHERE collection IN (?, ?) AND {EXPORT_TIME_SQL} >= ?", [POST, LIKE, since])
    assert 0 < summary.rows == len(expected) < 701
    assert set(summary.collections) == {POST, LIKE}
    assert duckdb_rows(out) == expected
    assert {p.name for p in out.iterdir()} == {f"collection={POST}", f"collection={LIKE}"}


def test_non_empty_directory_refused_unless_overwrite(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "again"
    export_parquet(store, out, collections=[POST])
    with pytest.raises(ConfigError, match="--overwrite"):
        export_parquet(store, out, collections=[POST])
    (out / "README").write_text("mine")
    summary = export_parquet(store, out, collections=[POST, LIKE], overwrite=True)
    assert duckdb_rows(out) == stored_rows(store, "WHERE collection IN (?, ?)", [POST, LIKE])
    assert summary.rows == len(duckdb_rows(out))
    assert summary.files == len(list(out.glob(f"collection={POST}/*/*.parquet"))) + len(
        list(out.glob(f"collection={LIKE}/*/*.parquet")))
    only_posts = export_parquet(store, out, collections=[POST], overwrite=True)
    assert only_posts.files == len(list(out.glob(f"collection={POST}/*/*.parquet")))
    assert (out / "README").read_text() == "mine"  # only the exported collections' folders are replaced


def _skyfill(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "skyfill"), *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_export(store: Store, tmp_path: Path) -> None:
    db = store.path
    store.close()  # the command opens the file read-only
    out = tmp_path / "cli"
    done = _skyfill("export", "--parquet", str(out), "--db", db, "--collections", f"{POST},{LIKE}",
                    "--since", "2025-01-03", "--json")
    assert done.returncode == 0, done.stderr
    summary = orjson.loads(done.stdout)
    with Store(db, read_only=True) as ro:
        since = datetime(2025, 1, 3, tzinfo=UTC)
        expected = stored_rows(ro, f"WHERE collection IN (?, ?) AND {EXPORT_TIME_SQL} >= ?", [POST, LIKE, since])
    assert summary["rows"] == len(expected) > 0
    assert duckdb_rows(out) == expected
    again = _skyfill("export", "--parquet", str(out), "--db", db)
    assert again.returncode == 1 and "--overwrite" in again.stderr
    bad = _skyfill("export", "--parquet", str(out), "--db", db, "--since", "soon")
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_export_off_a_terminal_logs_json_progress_lines(store: Store, tmp_path: Path) -> None:
    db = store.path
    store.close()
    done = _skyfill("--progress-every", "0.1", "export", "--parquet", str(tmp_path / "p"), "--db", db)
    assert done.returncode == 0, done.stderr
    lines = [orjson.loads(line) for line in done.stderr.splitlines()]  # stderr is a pipe: JSON lines
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines), lines
    finished = [line for line in lines if line["msg"] == "export finished"]
    assert len(finished) == 1, lines
    phases = finished[0]["phases"]
    assert phases["rows"]["done"] == phases["rows"]["total"] == finished[0]["rows"] == 701
    assert phases["collections"]["done"] == phases["collections"]["total"] == len(finished[0]["collections"])


def test_export_progress_lines_come_periodically_while_it_runs(store: Store, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    db = store.path
    store.close()
    monkeypatch.setattr(progress, "LOG_EVERY", 0.02)
    copy = export_module._copy

    def slow_copy(*args: Any) -> int:
        time.sleep(0.1)  # each collection's COPY takes a while: lines come in between
        return copy(*args)

    monkeypatch.setattr(export_module, "_copy", slow_copy)
    with caplog.at_level("INFO", logger="skyfill.backfill.progress"):
        summary = export_module.run_export(db, tmp_path / "p", progress=False)
    lines = [r for r in caplog.records if r.getMessage() == "export progress"]
    assert len(lines) >= 2, caplog.records
    rows = [r.ctx["phases"]["rows"] for r in lines]  # type: ignore[attr-defined]
    assert all(r["total"] == summary.rows for r in rows if r["total"] is not None)
    assert [r["done"] for r in rows] == sorted(r["done"] for r in rows) and rows[0]["done"] < summary.rows
