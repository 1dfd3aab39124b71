"""lambda_handler: both modes against a real DuckDB file and a real local PLC/PDS server,
configured only through SKYFILL_* environment variables, and error dicts for bad events."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from skyfill.app.handler import lambda_handler
from tests.support.store import SetupStore
from tests.support.faultserver import FaultServer
from tests.support.served import World


@pytest.fixture
def srv() -> Iterator[FaultServer]:
    with FaultServer() as s:
        yield s


@pytest.fixture
def env(tmp_path: Path, srv: FaultServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    db = tmp_path / "lambda.duckdb"
    monkeypatch.setenv("SKYFILL_DB", str(db))
    monkeypatch.setenv("SKYFILL_PLC_URL", srv.url)
    monkeypatch.setenv("SKYFILL_ALLOW_PRIVATE_HOSTS", "true")
    monkeypatch.setenv("SKYFILL_CONCURRENCY", "4")
    SetupStore(db).close()
    return db


def seed(db: Path, rows: list[tuple[str, datetime, datetime, str | None]]) -> None:
    with SetupStore(db) as store:
        for did, first, last, status in rows:
            store.execute_write(
                "INSERT INTO repo_base (did, first_seen_at, last_event_at, backfill_status, k) "
                "VALUES (?, ?, ?, ?, md5_number_lower(?))", [did, first, last, status, did])


def day(d: int, h: int = 12) -> datetime:
    return datetime(2025, 3, d, h, tzinfo=UTC)


def records_of(db: Path) -> dict[str, int]:
    with SetupStore(db) as store:
        return dict(store.fetchall("SELECT did, count(*) FROM records GROUP BY did"))


def test_backfill_list_and_single_did(env: Path, srv: FaultServer) -> None:
    world = World(srv)
    a, b, c = (world.account(n_records=5)[0] for _ in range(3))
    out = lambda_handler({"mode": "backfill", "dids": [a.did, b.did]}, None)
    assert out["status"] == "success" and out["mode"] == "backfill"
    assert out["repos_ok"] == 2 and out["records"]["added"] == 10
    out = lambda_handler({"dids": c.did}, None)
    assert out["repos_ok"] == 1
    out = lambda_handler({"dids": f"{a.did}, {c.did}"}, None)
    assert out["repos_ok"] == 2 and out["records"]["unchanged"] == 10
    assert records_of(env) == {a.did: 5, b.did: 5, c.did: 5}


def test_empty_event_backfills_all_known_but_not_terminal(env: Path, srv: FaultServer) -> None:
    world = World(srv)
    a, b, gone = (world.account(n_records=3)[0] for _ in range(3))
    seed(env, [(a.did, day(1), day(2), None), (b.did, day(1), day(9), "retrying"),
               (gone.did, day(1), day(2), "RepoTakendown")])
    out = lambda_handler({}, None)
    assert out["status"] == "success" and out["repos_ok"] == 2
    assert set(records_of(env)) == {a.did, b.did}
    assert gone.did not in world.repo_hits


def test_backfill_all_limited_to_window(env: Path, srv: FaultServer) -> None:
    world = World(srv)
    early, inside = (world.account(n_records=3)[0] for _ in range(2))
    seed(env, [(early.did, day(1), day(2), None), (inside.did, day(1), day(10), None)])
    out = lambda_handler({"mode": "backfill", "dids": "all", "start_date": "2025-03-10", "end_date": "2025-03-10"},
                         None)
    assert out["repos_ok"] == 1
    assert set(records_of(env)) == {inside.did}


def test_determine_dids_to_backfill_enqueues_idempotently(env: Path) -> None:
    with SetupStore(env) as store:
        store.execute_write("INSERT INTO coverage (source, first_event_at, last_event_at, started_at, ended) "
                            "VALUES ('r', ?, ?, ?, 'clean')", [day(1), day(20), day(1)])
    seed(env, [("did:plc:activeinwindow", day(1), day(10), None), ("did:plc:quiet", day(1), day(2), None)])
    event = {"mode": "determine_dids_to_backfill", "start_date": "2025-03-10", "end_date": "2025-03-11"}
    out = lambda_handler(event, None)
    assert out["status"] == "success" and out["mode"] == "determine_dids_to_backfill"
    assert out["counts"]["never_backfilled"] == 1 and out["total"] == 1 and out["enqueued"] == 1
    assert lambda_handler(event, None)["enqueued"] == 0
    with SetupStore(env) as store:
        assert store.fetchall("SELECT did, reasons FROM backfill_queue") == [
            ("did:plc:activeinwindow", ["never_backfilled"])]


@pytest.mark.parametrize(
    ("event", "fragment"),
    [
        ({"mode": "explode"}, "unknown mode"),
        ({"mode": "determine_dids_to_backfill", "start_date": "2025-03-10"}, "end_date"),
        ({"mode": "determine_dids_to_backfill", "start_date": "10/03/2025", "end_date": "2025-03-11"}, "YYYY-MM-DD"),
        ({"mode": "determine_dids_to_backfill", "start_date": "2025-02-30", "end_date": "2025-03-11"}, "date"),
        ({"mode": "determine_dids_to_backfill", "start_date": "2025-03-12", "end_date": "2025-03-11"}, "before"),
        ({"dids": "did:plc:ok,not-a-did"}, "invalid DID"),
        ({"dids": ["did:plc:ok", "at://x"]}, "invalid DID"),
        ({"dids": 42}, "dids must be"),
        ({"dids": "all", "start_date": "soon"}, "YYYY-MM-DD"),
        (["not", "an", "object"], "JSON object"),
    ],
)
def test_bad_events_return_error_dicts(env: Path, event: Any, fragment: str) -> None:
    out = lambda_handler(event, None)
    assert out["status"] == "error"
    assert fragment in out["message"]


def test_bad_environment_is_an_error_dict(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKYFILL_CONCURRENCY", "lots")
    out = lambda_handler({}, None)
    assert out == {"status": "error", "message": "SKYFILL_CONCURRENCY must be a number, got 'lots'"}
