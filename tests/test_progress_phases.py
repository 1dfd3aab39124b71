"""Progress by phase (backfill/progress.py): each phase's count, total and ETA; off a terminal, a
log line every LOG_EVERY seconds with the same numbers. Backfill (list and queue runs), discover
and identities sync, against scripted servers on 127.0.0.1 (tests/support/faultserver.py).
Accounting is checked, not timing: the log period is shortened and the lines are polled for."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from skyfill.app.network import run_discover, run_identities_sync
from skyfill.backfill import progress
from skyfill.backfill.backfiller import open_backfiller
from skyfill.backfill.config import BackfillConfig
from skyfill.backfill.progress import Phase, Phases, report
from skyfill.storage import Store
from tests.support.faultserver import FaultServer, Reply
from tests.support.served import World
from tests.support.store import SetupStore
from tests.support.wait import apoll

from .test_discover import LIST_REPOS_PATH, pages, repo
from .test_identities_sync import at, op

LOG = "skyfill.backfill.progress"


@pytest.fixture
def fast_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "LOG_EVERY", 0.02)


def lines(caplog: pytest.LogCaptureFixture, what: str) -> list[dict[str, Any]]:
    return [r.ctx for r in caplog.records if r.name == LOG and r.getMessage() == f"{what} progress"]  # type: ignore[attr-defined]


def test_phase_counts_and_eta() -> None:
    p = Phase("repos", total=10)
    assert p.eta(0.0) is None and p.to_json(0.0)["eta_s"] is None  # no rate before the first step
    p.advance(4)
    assert p.done == 4 and p.began is not None
    now = p.began + 2.0  # 4 in 2 s: 2/s, 6 left -> 3 s
    assert p.rate(now) == 2.0 and p.eta(now) == 3.0
    assert p.to_json(now) == {"done": 4, "total": 10, "per_s": 2.0, "eta_s": 3}
    p.advance(6)
    assert p.eta(now) == 0.0
    open_ended = Phase("listed")
    open_ended.advance(5)
    assert open_ended.eta(open_ended.began + 1) is None  # no total, no ETA
    phases = Phases("identities", "repos", totals={"repos": 3})
    assert [x.name for x in phases] == ["identities", "repos"] and phases["repos"].total == 3
    assert phases["identities"].total is None


async def test_report_logs_the_phases_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    phases = Phases("identities", "repos", totals={"identities": 5, "repos": 5})
    caplog.set_level(logging.INFO, logger=LOG)
    async with report(phases, what="job", terminal=False, extra=lambda: {"records": 7}, every=0.01):
        phases["identities"].advance(5)
        phases["repos"].advance(2)
        await apoll(lambda: any(c["phases"]["repos"]["done"] == 2 for c in lines(caplog, "job")), timeout=10)
    line = next(c for c in lines(caplog, "job") if c["phases"]["repos"]["done"] == 2)
    assert line["records"] == 7
    assert line["phases"]["identities"] | {"per_s": 0} == {"done": 5, "total": 5, "per_s": 0, "eta_s": 0}
    assert line["phases"]["repos"]["total"] == 5 and line["phases"]["repos"]["eta_s"] is not None
    n = len(lines(caplog, "job"))
    await asyncio.sleep(0.05)
    assert len(lines(caplog, "job")) == n  # the lines stop with the block


# -- backfill: list and queue runs -----------------------------------------------------------------


@pytest.fixture
def plc() -> Iterator[FaultServer]:
    with FaultServer() as s:
        yield s


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SetupStore]:
    s = SetupStore(tmp_path / "phases.duckdb")
    yield s
    s.close()


def cfg(plc: FaultServer) -> BackfillConfig:
    return BackfillConfig(plc_url=plc.url, allow_private_hosts=True, concurrency=2, request_backoff=0.01,
                          request_retries=0)


async def test_a_list_run_counts_each_did_once_per_phase(
    plc: FaultServer, store: SetupStore, caplog: pytest.LogCaptureFixture, fast_lines: None
) -> None:
    world = World(plc)
    dids = [world.account(n_records=3)[0].did for _ in range(4)]
    unknown = "did:plc:" + "a" * 24  # the PLC answers 404: resolved (and failed) once, then done
    caplog.set_level(logging.INFO, logger=LOG)
    async with open_backfiller(store, config=cfg(plc), progress=False) as bf:
        summary = await bf.run([*dids, unknown])
    assert summary.repos_ok == 4 and summary.repos_failed == 1
    assert bf.phases.to_json()["identities"] | {"per_s": 0} == {"done": 5, "total": 5, "per_s": 0, "eta_s": 0}
    assert (bf.phases["repos"].done, bf.phases["repos"].total) == (5, 5)


async def test_a_queue_run_resolves_hosts_then_fetches_with_totals(
    plc: FaultServer, store: SetupStore, caplog: pytest.LogCaptureFixture, fast_lines: None
) -> None:
    world = World(plc)
    dids = [world.account(n_records=3)[0].did for _ in range(6)]
    for did in dids:  # each getRepo takes a moment, so the run lasts several log periods
        world.repos[did] = [Reply(200, world.repos[did][0].body, world.repos[did][0].headers, delay=0.05)]
    store.enqueue({did: ["unseen"] for did in dids})
    caplog.set_level(logging.INFO, logger=LOG)
    async with open_backfiller(store, config=cfg(plc), progress=False) as bf:
        summary = await bf.run_queue()
    assert summary.repos_ok == 6
    got = {name: (p.done, p.total) for name, p in ((p.name, p) for p in bf.phases)}
    assert got == {"identities": (6, 6), "repos": (6, 6)}
    logged = lines(caplog, "backfill")
    assert logged, "no progress line off the terminal"
    for line in logged:
        assert set(line["phases"]) == {"identities", "repos"}
        assert line["phases"]["repos"]["total"] == 6 and line["phases"]["repos"]["done"] <= 6
        assert line["phases"]["repos"]["done"] <= line["phases"]["identities"]["done"]  # hosts come first
        assert {"ok", "failed", "records", "hosts_parked"} <= set(line)


# -- discover and identities sync ------------------------------------------------------------------


def test_discover_logs_its_phases(
    tmp_path: Path, server: FaultServer, caplog: pytest.LogCaptureFixture, fast_lines: None
) -> None:
    handler = pages([repo(1), repo(2)], [repo(3)])
    server.script(LIST_REPOS_PATH, lambda seen: Reply(200, handler(seen).body, handler(seen).headers, delay=0.1))
    caplog.set_level(logging.INFO, logger=LOG)
    config = BackfillConfig(allow_private_hosts=True, per_host_rps=500.0, request_retries=0)
    with Store(tmp_path / "d.duckdb") as store:
        summary = asyncio.run(run_discover(store, relay=server.url, config=config, progress=False))
    assert summary.listed == 3
    logged = lines(caplog, "discover")
    assert logged and all(set(c["phases"]) == {"hosts", "repos"} for c in logged)
    assert max(c["listed"] for c in logged) <= 3
    assert all(c["phases"]["repos"]["done"] <= 1 for c in logged)


def test_identities_sync_logs_operations_and_history(
    tmp_path: Path, server: FaultServer, caplog: pytest.LogCaptureFixture, fast_lines: None
) -> None:
    ops = [op(i, at(i)) for i in range(1, 7)]

    def export(seen: Any) -> Reply:
        after = seen.query.get("after")
        rows = [line for line in ops if after is None or json.loads(line)["createdAt"] > after][:2]
        return Reply(200, b"\n".join(rows), {"Content-Type": "application/jsonlines"}, delay=0.1)

    server.script("/export", export)
    caplog.set_level(logging.INFO, logger=LOG)
    config = BackfillConfig(plc_url=server.url, allow_private_hosts=True, per_host_rps=500.0, request_retries=0)
    with Store(tmp_path / "i.duckdb") as store:
        summary = asyncio.run(run_identities_sync(store, config=config, page_size=2, progress=False))
    assert summary.complete and summary.operations == 6
    logged = lines(caplog, "identities sync")
    assert logged and all(set(c["phases"]) == {"operations", "history_h"} for c in logged)
    assert max(c["phases"]["operations"]["done"] for c in logged) <= 6
    last = logged[-1]["phases"]["history_h"]
    assert last["total"] is not None and last["done"] <= last["total"]
