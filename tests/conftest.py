"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kafka import KafkaBroker


@pytest.fixture
def kafka_broker() -> Iterator[KafkaBroker]:
    """A fresh Tansu broker (in-memory log) on a free loopback port, stopped after the test."""
    with KafkaBroker() as broker:
        yield broker
