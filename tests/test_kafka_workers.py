"""Kafka backfill workers schedule host-fairly (skyfill.net.scheduler), as `backfill --from-queue`.

Real parts: a Tansu broker (tests/support/kafka.py), two fault stand-in hosts on 127.0.0.1
(tests/support/faultserver.py; one also plays the PLC directory) serving signed repos, one of
which answers 429 + Retry-After, and the real `skyfill backfill-worker` wiring (in-process through
`app.jobs.run_backfill_worker`, and as a process killed with SIGKILL).

Each topic has ONE partition, so the parked host's requests sit between the other host's: the
committed offset must stop at the first unfinished one while the others finish past it.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from skyfill.app.jobs import run_backfill_worker
from skyfill.backfill.config import BackfillConfig
from skyfill.publish import Topics, enqueue_backfill, ensure_topics
from skyfill.storage import Store
from tests.support.faultserver import FaultServer, Reply, Seen, json_reply, rate_limited
from tests.support.kafka import KafkaBroker
from tests.support.served import GET_REPO, World
from tests.support.topics import consume_all
from tests.support.wait import apoll

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def plc() -> Iterator[FaultServer]:  # the PLC directory, and host B
    with FaultServer() as s:
        yield s


@pytest.fixture
def host_a() -> Iterator[FaultServer]:
    with FaultServer() as s:
        yield s


def two_hosts(plc: FaultServer, host_a: FaultServer, n_a: int, n_b: int) -> tuple[World, World, list[str], list[str]]:
    world_b, world_a = World(plc), World(host_a)
    world_a.rng = random.Random(8)  # other identities than B's
    b_dids = [world_b.account(n_records=4)[0].did for _ in range(n_b)]
    a_dids = [world_a.account(n_records=4)[0].did for _ in range(n_a)]
    for did in a_dids:  # the PLC directory serves A's documents too
        plc.script(f"/{did}", json_reply(world_a.docs[did]))
    return world_a, world_b, a_dids, b_dids


async def topics(bs: str, prefix: str) -> Topics:
    await ensure_topics(bs, {f"{prefix}.backfill": 1, f"{prefix}.backfill.dead": 1,
                             f"{prefix}.records": 1, f"{prefix}.repos": 1})
    return Topics(records=f"{prefix}.records", repos=f"{prefix}.repos")


@asynccontextmanager
async def committed_reader(bs: str, group: str) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer that never joins `group` (no subscription): it only reads the group's commits."""
    c = AIOKafkaConsumer(bootstrap_servers=bs, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


async def backfilled(bs: str, repos_topic: str, expected: int) -> set[str]:
    msgs = await consume_all(bs, [repos_topic], expected)
    return {o["did"] for o in map(orjson.loads, (m.value for m in msgs)) if o["kind"] == "backfill"}


async def test_a_parked_host_delays_only_its_own_requests_and_holds_the_offset(
    kafka_broker: KafkaBroker, plc: FaultServer, host_a: FaultServer, tmp_path: Path
) -> None:
    """Host A answers its first getRepo with 429 + Retry-After: 5. Every DID of host B finishes
    before the 5 s are over, also those behind A's requests in the partition; A receives no
    request before Retry-After; the committed offset stops at A's first request (3) while A is
    parked, then passes everything; no attempt is counted."""
    bs = kafka_broker.bootstrap
    world_a, _, a_dids, b_dids = two_hosts(plc, host_a, 6, 8)
    first: list[Seen] = []

    def a_get_repo(seen: Seen) -> Reply:
        if not first:
            first.append(seen)
            return rate_limited(retry_after="5")
        return world_a.repos[seen.query["did"]][0]

    host_a.script(GET_REPO, a_get_repo)
    order = [*b_dids[:3], a_dids[0], a_dids[1], *b_dids[3:6], *a_dids[2:4], *b_dids[6:], *a_dids[4:]]
    out = await topics(bs, "fair")
    assert await enqueue_backfill(bs, {d: ["unseen"] for d in order}, topic="fair.backfill") == 14
    # patience 1 s: the 5 s park is not waited out inside the request; the scheduler holds A's DIDs
    cfg = BackfillConfig(plc_url=plc.url, allow_private_hosts=True, concurrency=4, per_host_concurrency=1,
                         request_backoff=0.01, rate_limit_patience=timedelta(seconds=1))
    tp = TopicPartition("fair.backfill", 0)
    seen_commits: list[tuple[float, int | None]] = []
    db = tmp_path / "worker.duckdb"
    async with committed_reader(bs, "fair") as reader:
        job = asyncio.create_task(run_backfill_worker(
            str(db), bs, config=cfg, topic="fair.backfill", group_id="fair", topics=out, exit_when_idle=True,
            stop=asyncio.Event()))

        async def watch() -> None:
            while True:
                seen_commits.append((time.time(), await reader.committed(tp)))
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        try:
            await apoll(lambda: len(plc.seen(GET_REPO)) == 8 and seen_commits and seen_commits[-1][1] == 3,
                        timeout=60, what="B done and offset 3 committed")
            assert any(a.status == 429 for a in host_a.answered)
            done = await asyncio.wait_for(job, 120)
        finally:
            watcher.cancel()
            if not job.done():
                job.cancel()
        final = await reader.committed(tp)
    park = next(a for a in host_a.answered if a.status == 429)
    park_end = park.at + 5
    assert done == 14 and final == 14
    a_requests = [r.at for r in host_a.seen(GET_REPO)]
    assert not [t for t in a_requests if park.at < t < park_end], "a request to A before Retry-After"
    assert len(a_requests) == 7  # the 429, then each of A's 6 DIDs once
    b_requests = [r.at for r in plc.seen(GET_REPO)]
    assert len(b_requests) == 8 and max(b_requests) < park_end, "B waited for A's park"
    # the cursor never passed A's first request while A was parked
    first_a_ok = min(a.at for a in host_a.answered if a.status == 200)
    assert max(c or 0 for t, c in seen_commits if t < first_a_ok) == 3
    assert await backfilled(bs, out.repos, 14) == set(order)
    with Store(db) as store:
        assert store.fetchall("SELECT count(*), max(backfill_attempts) FROM repos") == [(14, 0)]


# -- kill -9 a worker process, then restart it -----------------------------------------------------


def _worker_process(db: Path, bs: str, plc_url: str, *, exit_when_idle: bool) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "skyfill.cli", "backfill-worker", "--kafka-bootstrap", bs, "--db", str(db),
         "--group-id", "killed", "--topic", "kill.backfill", "--records-topic", "kill.records",
         "--repos-topic", "kill.repos", "--plc-url", plc_url, "--allow-private-hosts", "--concurrency", "2",
         *(["--exit-when-idle"] if exit_when_idle else [])],
        cwd=ROOT, env={k: v for k, v in os.environ.items() if not k.startswith("SKYFILL_")},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


async def test_a_worker_killed_while_a_host_is_parked_loses_nothing(
    kafka_broker: KafkaBroker, plc: FaultServer, host_a: FaultServer, tmp_path: Path
) -> None:
    """`skyfill backfill-worker` while host A answers 429 + Retry-After: 60 (a park longer than a
    request waits): B's DIDs finish, the committed offset stops at A's first request (3), and the
    process is killed with SIGKILL. The restart fetches exactly the DIDs from offset 3 on, each
    once: none of the committed ones again, and none is lost (every DID is published)."""
    bs = kafka_broker.bootstrap
    world_a, world_b, a_dids, b_dids = two_hosts(plc, host_a, 3, 6)
    parked = threading.Event()
    parked.set()
    served: list[str] = []

    def a_get_repo(seen: Seen) -> Reply:
        if parked.is_set():
            return rate_limited(retry_after="60")
        served.append(seen.query["did"])
        return world_a.repos[seen.query["did"]][0]

    def b_get_repo(seen: Seen) -> Reply:
        served.append(seen.query["did"])
        return world_b.repos[seen.query["did"]][0]

    host_a.script(GET_REPO, a_get_repo)
    plc.script(GET_REPO, b_get_repo)
    order = [*b_dids[:3], a_dids[0], b_dids[3], b_dids[4], a_dids[1], b_dids[5], a_dids[2]]
    out = await topics(bs, "kill")
    assert await enqueue_backfill(bs, {d: ["unseen"] for d in order}, topic="kill.backfill") == 9
    tp = TopicPartition("kill.backfill", 0)
    db = tmp_path / "kill.duckdb"
    proc = _worker_process(db, bs, plc.url, exit_when_idle=False)
    try:
        async with committed_reader(bs, "killed") as reader:
            await apoll(lambda: len(served) == 6 or proc.poll() is not None, timeout=120, what="B's 6 getRepo")
            assert proc.poll() is None, proc.communicate()
            commits: list[int | None] = []

            async def at_three() -> bool:
                commits.append(await reader.committed(tp))
                return commits[-1] == 3

            async with asyncio.timeout(60):
                while not await at_three():
                    await asyncio.sleep(0.1)
            assert host_a.count(GET_REPO) >= 1 and not [d for d in served if d in a_dids]
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            assert await reader.committed(tp) == 3  # nothing passed the parked request
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted(served) == sorted(b_dids)
    served.clear()
    parked.clear()  # the park is over for the restarted worker
    proc = _worker_process(db, bs, plc.url, exit_when_idle=True)
    _, stderr = await asyncio.to_thread(proc.communicate, timeout=180)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert sorted(served) == sorted(order[3:]), "a committed request was redone, or one was lost"
    assert await backfilled(bs, out.repos, 9) == set(order)
    async with committed_reader(bs, "killed") as reader:
        assert await reader.committed(tp) == 9
