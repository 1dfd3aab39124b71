"""Backfill requests on `skyfill.backfill`: one message per DID, keyed by the DID's PDS host when
the caller knows it, else by the DID.

Keyed by host, every request for one host lands in one partition, so one worker paces that host:
N workers never send N times a host's limit (a worker paces each host it sees on its own).

Value: {"v": 1, "did": "...", "reasons": [...]} (schema/backfill.v1.json). A bare DID as the
whole value is accepted too, so an operator can enqueue with any Kafka console producer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from skyfill.errors import InputError, PublishError

from .messages import BACKFILL_TOPIC, SCHEMA_VERSION

__all__ = ["encode_request", "decode_request", "enqueue_backfill"]


def encode_request(did: str, reasons: Iterable[str] = (), *, error: str | None = None) -> bytes:
    body: dict[str, Any] = {"v": SCHEMA_VERSION, "did": did, "reasons": sorted(set(reasons))}
    if error is not None:
        body["error"] = error
    return orjson.dumps(body)


def decode_request(value: bytes | None) -> tuple[str, list[str]]:
    """(did, reasons); raises InputError when the value names no DID."""
    if not value:
        raise InputError("empty request", kind="request")
    if value.startswith(b"did:"):
        try:
            return value.decode().strip(), []
        except UnicodeDecodeError as exc:
            raise InputError(f"DID is not UTF-8: {exc}", kind="request") from exc
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InputError(f"not JSON and not a DID: {exc}", kind="request") from exc
    did = obj.get("did") if isinstance(obj, dict) else None
    if not isinstance(did, str) or not did.startswith("did:"):
        raise InputError("request has no DID", kind="request")
    reasons = obj.get("reasons") or []
    return did, [r for r in reasons if isinstance(r, str)]


async def enqueue_backfill(
    bootstrap: str,
    requests: Mapping[str, Iterable[str]] | Iterable[str],
    *,
    topic: str = BACKFILL_TOPIC,
    request_timeout_ms: int = 30_000,
    hosts: Mapping[str, str] | None = None,
) -> int:
    """Publish one request per DID (acks=all); returns how many the broker acknowledged.
    `hosts`: each DID's PDS host, the message key where known (see the module doc)."""
    keys = hosts or {}
    items = list(requests.items()) if isinstance(requests, Mapping) else [(d, ()) for d in requests]
    if not items:
        return 0
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", request_timeout_ms=request_timeout_ms,
                                linger_ms=5)
    try:
        await producer.start()
        futures = [await producer.send(topic, encode_request(did, reasons), key=(keys.get(did) or did).encode())
                   for did, reasons in items]
        for fut in futures:
            await fut
    except KafkaError as exc:
        raise PublishError(f"cannot enqueue backfill requests on {bootstrap}: {exc!r}") from exc
    finally:
        await producer.stop()
    return len(items)
