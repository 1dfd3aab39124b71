"""Shared pytest fixtures."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator

import pytest

from tests.support.faultserver import FaultServer
from tests.support.kafka import KafkaBroker
from tests.support.network import LocalNetwork, PdsAccount, PdsClient
from tests.support.postgres import PostgresCluster


@pytest.fixture
def kafka_broker() -> Iterator[KafkaBroker]:
    """A fresh Tansu broker (in-memory log) on a free loopback port, stopped after the test."""
    with KafkaBroker() as broker:
        yield broker


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL (the catalog of DuckLake stores) for the session; tests take a fresh
    database each (`pg.create_database`)."""
    with PostgresCluster() as cluster:
        yield cluster


# -- the local reference PDS + PLC (tests/support/network) ---------------------------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The slow, real-peer tests carry markers, so `-m "not pds and not kafka and not bench"` is a
    # fast inner loop: the PDS network fixture -> `pds`, the Kafka broker fixture -> `kafka`,
    # tests/test_bench_*.py -> `bench`.
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "pds_network" in fixtures:
            item.add_marker(pytest.mark.pds)
        if "kafka_broker" in fixtures:
            item.add_marker(pytest.mark.kafka)
        if "postgres_cluster" in fixtures:
            item.add_marker(pytest.mark.lake)
        if item.path.name.startswith("test_bench_"):
            item.add_marker(pytest.mark.bench)
    # Longest first: under pytest-xdist (`--dist load` hands the first tests out round-robin)
    # the slow modules start at once on every worker and the short ones fill in at the end,
    # instead of one long test starting last. A module stays in one piece (its module-scoped
    # fixtures are set up once per worker); the order within it is unchanged.
    rank = {}
    for item in items:
        kind = 0 if item.get_closest_marker("bench") else 1 if item.get_closest_marker("kafka") else \
            2 if item.get_closest_marker("pds") else 3
        rank[item.path] = min(rank.get(item.path, kind), kind)
    items.sort(key=lambda item: rank[item.path])  # stable: modules and their tests keep their order


@pytest.fixture(scope="session")
def pds_network() -> Iterator[LocalNetwork]:
    """One PLC + PDS for the whole session. Never skipped: if it cannot start, the error
    carries the launcher's stderr. Tests share it, so use `make_account` for fresh DIDs."""
    with LocalNetwork() as network:
        yield network


@pytest.fixture
def pds_client(pds_network: LocalNetwork) -> Iterator[PdsClient]:
    with pds_network.client() as client:
        yield client


@pytest.fixture
def make_account(pds_client: PdsClient) -> Callable[..., PdsAccount]:
    """make_account("alice") -> a new account with a unique handle like `alice-3f9a1c.test`."""

    def make(name: str = "user") -> PdsAccount:
        # Service handles: the part before ".test" is 3..18 chars of [a-z0-9-].
        stem = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:10] or "user"
        return pds_client.create_account(f"{stem}-{secrets.token_hex(3)}.test")

    return make


@pytest.fixture
def server() -> Iterator[FaultServer]:
    """A real scripted HTTP server on 127.0.0.1 (tests/support/faultserver.py) for PLC/PDS faults."""
    with FaultServer() as srv:
        yield srv
