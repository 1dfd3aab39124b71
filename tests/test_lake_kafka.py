"""The scale-out topology on a lake: the daemon publishes, two `Sink`s (one consumer group, each its own
lake connection) write one DuckLake, and the lake ends equal to what one sink builds in a DuckDB file."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

from skyfill.consumer.daemon import ConsumeConfig, Daemon
from skyfill.publish import KafkaPublisher
from skyfill.publish.sink import Sink
from skyfill.storage import Store
from skyfill.storage.lake import lake_db
from tests.support.generate.firehose import World
from tests.support.kafka import KafkaBroker
from tests.support.postgres import PostgresCluster, lake_url
from tests.support.relay import LocalRelay
from tests.support.topics import FAST
from tests.support.wait import apoll


def mirror(store: Store) -> tuple[list[Any], list[Any]]:
    records = store.fetchall("SELECT did, collection, rkey, cid, rev FROM records ORDER BY ALL")
    repos = store.fetchall("SELECT did, rev, status, active, handle FROM repos ORDER BY did")
    return records, repos


async def test_two_sinks_into_one_lake_build_what_one_sink_builds_in_a_file(
    kafka_broker: KafkaBroker, postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    bs = kafka_broker.bootstrap
    world = World(13, n_dids=8, initial_records=(3, 8))
    with LocalRelay(list(world.frames(300))) as relay:
        store = Store(tmp_path / "daemon.duckdb")
        publisher = KafkaPublisher(bs, create_partitions=4)
        await publisher.start()
        daemon = Daemon(store, ConsumeConfig(relay=relay.url, cursor=0, flush_interval=0.05, batch_events=50,
                                             publish=True), publish=publisher.publish)
        task = asyncio.create_task(daemon.run(install_signal_handlers=False))
        try:
            await apoll(lambda: daemon.committed_seq == relay.head)
        finally:
            daemon.stop()
            await task
            await publisher.aclose()
        want = mirror(store)
        store.close()
    assert want[0] and want[1]

    with Store(tmp_path / "sink.duckdb") as file:
        async with Sink(file, bs, group_id="file", session_timeout_ms=FAST) as sink:
            await sink.run(exit_when_idle=True)
        assert mirror(file) == want

    name = "lake_" + secrets.token_hex(4)
    lake = lake_db(lake_url(postgres_cluster.create_database(name)), tmp_path / name)
    Store(lake).close()  # the schema, once
    stop = asyncio.Event()
    stores = [Store(lake), Store(lake)]
    seen: list[tuple[list[Any], list[Any]]] = []

    async def run(store: Store) -> None:
        async with Sink(store, bs, group_id="lake", session_timeout_ms=FAST) as sink:
            await sink.run(stop=stop)

    async def check() -> bool:
        seen.append(await asyncio.to_thread(mirror, stores[0]))
        return seen[-1] == want

    sinks = [asyncio.create_task(run(s)) for s in stores]
    try:
        deadline = asyncio.get_running_loop().time() + 300
        while not await check():
            assert asyncio.get_running_loop().time() < deadline, f"the lake never matched: {len(seen[-1][0])} records"
            assert not any(t.done() for t in sinks), [t.exception() for t in sinks if t.done()]
            await asyncio.sleep(0.2)  # poll: each check itself reads the whole lake
    finally:
        stop.set()
        await asyncio.gather(*sinks, return_exceptions=True)
        for s in stores:
            s.close()
    with Store(lake) as reopened:
        reopened.compact()
        assert mirror(reopened) == want
