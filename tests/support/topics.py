"""Reading the published Kafka topics back: every message from the beginning, and the JSON schemas."""

from __future__ import annotations

import asyncio
import json
from importlib import resources
from typing import Any

import jsonschema
from aiokafka import AIOKafkaConsumer

__all__ = ["FAST", "consume_all", "schema"]

FAST = 3000  # session timeout: Tansu holds a group join for about half of it


def schema(name: str) -> jsonschema.Draft202012Validator:
    """The published message schema `name` (publish/schema), checked, with format checks on."""
    text = resources.files("skyfill.publish").joinpath(f"schema/{name}").read_text()
    loaded = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(loaded)
    return jsonschema.Draft202012Validator(loaded, format_checker=jsonschema.FormatChecker())


async def consume_all(bootstrap: str, topics: list[str], expected: int, *, timeout: float = 30) -> list[Any]:
    """Every message of `topics` from the beginning (no group), until `expected` arrived and the log is quiet."""
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    out: list[Any] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                polled = await consumer.getmany(timeout_ms=500)
                for msgs in polled.values():
                    out.extend(msgs)
                if not polled and len(out) >= expected:
                    break
    finally:
        await consumer.stop()
    return out
