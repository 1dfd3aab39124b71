"""Host-fair scheduling: the in-memory HostScheduler, and a queue run against two real local
hosts, one of which answers 429 + Retry-After (tests.support.faultserver)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from skyfill.backfill.backfiller import open_backfiller
from skyfill.backfill.config import BackfillConfig
from skyfill.net.scheduler import TOP_HOSTS, HostScheduler
from skyfill.net.http import host_key

from skyfill import metrics
from tests.support.faultserver import FaultServer, Reply, Seen, json_reply, rate_limited
from tests.support.served import GET_REPO, World
from tests.support.store import SetupStore
from tests.support.wait import poll

ROOT = Path(__file__).resolve().parents[1]


def test_parked_host_gets_nothing_while_others_go_round_robin() -> None:
    parked: dict[str, float] = {"a": time.time() + 3600}

    async def go() -> list[tuple[str, str] | None]:
        s = HostScheduler(per_host=2, parked=lambda: parked)
        for i in range(5):
            s.add("a", f"a{i}")
        for i in range(3):
            s.add("b", f"b{i}")
            s.add("c", f"c{i}")
        taken = [await s.take() for _ in range(4)]
        assert len(s) == 7 and s.waiting_parked() == {"a": parked["a"]}
        # b and c are at their cap of 2: nothing until one is released
        waiter = asyncio.create_task(s.take())
        await asyncio.sleep(0)
        assert not waiter.done()
        s.release("b", ok=True)
        taken.append(await waiter)
        assert s.drain("a") == [f"a{i}" for i in range(5)] and len(s) == 1
        return taken

    taken = asyncio.run(go())
    assert taken == [("b", "b0"), ("c", "c0"), ("b", "b1"), ("c", "c1"), ("b", "b2")]


def test_take_waits_for_the_park_to_end_and_close_ends_it() -> None:
    parked = {"a": time.time() + 0.3}

    async def go() -> tuple[tuple[str, str] | None, float, tuple[str, str] | None]:
        s = HostScheduler(per_host=1, parked=lambda: {h: t for h, t in parked.items() if t > time.time()})
        s.add("a", "a0")
        s.close()
        got = await asyncio.wait_for(s.take(), 10)
        at = time.time()
        s.release("a", ok=False)
        return got, at, await s.take()

    got, at, last = asyncio.run(go())
    assert got == ("a", "a0") and at >= parked["a"] and last is None


def test_host_gauges_are_bounded_to_the_top_hosts_plus_other() -> None:
    s = HostScheduler(per_host=1, parked=dict)
    for h in range(TOP_HOSTS + 15):
        for i in range(h + 1):
            s.add(f"pds{h}.example", f"did:{h}:{i}")
    s.export_metrics()
    hosts = {sample.labels["host"] for m in metrics.REGISTRY.collect() if m.name == "skyfill_backfill_host_repos"
             for sample in m.samples}
    assert len(hosts) == TOP_HOSTS + 1 and "other" in hosts and "pds0.example" not in hosts
    assert metrics.REGISTRY.get_sample_value("skyfill_backfill_host_repos",
                                             {"host": "other", "state": "queued"}) == sum(range(1, 16))


# -- a queue run against two hosts ----------------------------------------------------------------


@pytest.fixture
def plc() -> Iterator[FaultServer]:
    with FaultServer() as s:
        yield s


@pytest.fixture
def host_a() -> Iterator[FaultServer]:
    with FaultServer() as s:
        yield s


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SetupStore]:
    s = SetupStore(tmp_path / "sched.duckdb")
    yield s
    s.close()


async def test_a_parked_host_waits_for_retry_after_while_the_other_completes(
    plc: FaultServer, host_a: FaultServer, store: SetupStore
) -> None:
    """Host A answers its first getRepo with 429 + Retry-After: 5. A receives no request before
    the 5 s are over (one request in flight per host, so none was under way when it parked), while every DID of host B (served with the PLC) completes meanwhile; then
    A's DIDs complete too, none counted as a failed attempt."""
    world_b, world_a = World(plc), World(host_a)
    world_a.rng = random.Random(8)  # other identities than B's
    b_dids = [world_b.account(n_records=5)[0].did for _ in range(8)]
    a_dids = [world_a.account(n_records=5)[0].did for _ in range(6)]
    for did in a_dids:  # the PLC directory serves A's documents too
        plc.script(f"/{did}", json_reply(world_a.docs[did]))
    first: list[Seen] = []

    def a_get_repo(seen: Seen) -> Reply:
        if not first:
            first.append(seen)
            return rate_limited(retry_after="5")
        return world_a.repos[seen.query["did"]][0]

    host_a.script(GET_REPO, a_get_repo)
    store.enqueue({did: ["unseen"] for did in a_dids + b_dids})
    cfg = BackfillConfig(plc_url=plc.url, allow_private_hosts=True, concurrency=4, per_host_concurrency=1,
                         request_backoff=0.01)
    async with open_backfiller(store, config=cfg) as bf:
        summary = await asyncio.wait_for(bf.run_queue(), 120)
    assert summary.repos_ok == 14 and summary.failed == {}
    park = next(a for a in host_a.answered if a.status == 429)
    park_end = park.at + 5
    a_requests = [r.at for r in host_a.seen(GET_REPO)]
    assert not [t for t in a_requests if park.at < t < park_end], "a request to A before Retry-After"
    b_requests = [r.at for r in plc.seen(GET_REPO)]
    assert len(b_requests) == 8 and max(b_requests) < park_end, "B waited for A's park"
    assert all(a.status == 200 for a in plc.answered if a.request.path == GET_REPO)
    assert dict(store.fetchall("SELECT state, count(*) FROM backfill_queue GROUP BY 1")) == {"done": 14}
    attempts = store.fetchall("SELECT max(backfill_attempts) FROM repos")
    assert attempts == [(0,)]
    # the "complete" signal: every DID's row names this run and when it completed
    runs = store.fetchall("SELECT DISTINCT backfill_run, count(backfilled_at) FROM repos GROUP BY 1")
    assert len(runs) == 1 and runs[0][0] and runs[0][1] == 14
    done = {h: metrics.REGISTRY.get_sample_value("skyfill_backfill_host_repos", {"host": h, "state": "done"})
            for h in (host_key(host_a.url), host_key(plc.url))}
    assert done == {host_key(host_a.url): 6, host_key(plc.url): 8}


# -- kill -9 mid-run, then restart -----------------------------------------------------------------


def _backfill_process(db: Path, plc_url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "skyfill.cli", "backfill", "--db", str(db), "--from-queue", "--plc-url", plc_url,
         "--allow-private-hosts", "--concurrency", "1", "--json"],
        cwd=ROOT, env={k: v for k, v in os.environ.items() if not k.startswith("SKYFILL_")},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def test_kill_9_mid_run_then_restart_refetches_no_finished_repo(plc: FaultServer, tmp_path: Path) -> None:
    """`skyfill backfill --from-queue` (one DID at a time: a DID's getRepo is asked only after
    the previous DID committed) is killed with SIGKILL while the 6th getRepo hangs; the restart
    hands the claimed DIDs back to pending and fetches exactly the DIDs not done: no finished
    repo is fetched again (getRepo requests counted per DID)."""
    world = World(plc)
    dids = [world.account(n_records=3)[0].did for _ in range(12)]
    release = threading.Event()
    served: list[str] = []

    def get_repo(seen: Seen) -> Reply:
        did = seen.query["did"]
        served.append(did)
        if len(served) > 5 and not release.is_set():
            release.wait(60)  # the 6th request hangs until the process is dead
            return Reply(503)
        return world.repos[did][0]

    plc.script(GET_REPO, get_repo)
    db = tmp_path / "kill.duckdb"
    with SetupStore(db) as store:
        store.enqueue({did: ["unseen"] for did in dids})
    proc = _backfill_process(db, plc.url)
    try:
        poll(lambda: len(served) >= 6 or proc.poll() is not None, timeout=120, what="the 6th getRepo")
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
    first_run = list(served)
    with SetupStore(db) as store:
        done = {d for (d,) in store.fetchall("SELECT did FROM backfill_queue WHERE state = 'done'")}
        states = dict(store.fetchall("SELECT state, count(*) FROM backfill_queue GROUP BY 1"))
    assert done == set(first_run[:5]) and states == {"done": 5, "in_progress": 7}  # one claim took all 12
    served.clear()
    proc = _backfill_process(db, plc.url)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert orjson.loads(out)["repos_ok"] == 7
    assert sorted(served) == sorted(set(dids) - done), "a finished repo was fetched again"
    with SetupStore(db) as store:
        assert dict(store.fetchall("SELECT state, count(*) FROM backfill_queue GROUP BY 1")) == {"done": 12}


def test_discard_drops_waiting_items_only() -> None:
    async def go() -> tuple[int, list[tuple[str, tuple[int, int]] | None], int]:
        s: HostScheduler[tuple[int, int]] = HostScheduler(per_host=1, parked=dict)
        for i in range(4):
            s.add("a", (i % 2, i))   # (partition, offset)
            s.add("b", (i % 2, 10 + i))
        first = await s.take()     # in flight: not touched by discard
        n = s.discard(lambda item: item[0] == 1)
        s.release("a", ok=True)
        rest = []
        while len(s):
            item = await s.take()
            assert item is not None
            rest.append(item)
            s.release(item[0], ok=True)
        return n, [first, *rest], len(s)

    n, taken, left = asyncio.run(go())
    assert n == 4 and left == 0
    assert taken == [("a", (0, 0)), ("b", (0, 10)), ("a", (0, 2)), ("b", (0, 12))]
