"""Changes -> Kafka messages (pure). The wire format is documented in docs/events.md.

Every message is keyed by the DID (UTF-8), so one DID's messages land in one partition and
keep their order. Values are JSON objects with `"v": 1`; a consumer must ignore fields it
does not know and refuse a `v` it does not know. The record body is embedded as a JSON
object (the atproto JSON form: `$link`, `$bytes`, `$type`), never as a string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from skyfill.errors import InputError

from skyfill.storage import Change, RecordChange, RepoChange

__all__ = [
    "SCHEMA_VERSION",
    "RECORDS_TOPIC",
    "REPOS_TOPIC",
    "BACKFILL_TOPIC",
    "Topics",
    "Message",
    "encode_change",
    "encode_record",
    "encode_repo",
    "decode_value",
    "record_change_from",
    "repo_change_from",
]

SCHEMA_VERSION = 1
RECORDS_TOPIC = "skyfill.records"
REPOS_TOPIC = "skyfill.repos"
BACKFILL_TOPIC = "skyfill.backfill"


@dataclass(frozen=True, slots=True)
class Topics:
    records: str = RECORDS_TOPIC
    repos: str = REPOS_TOPIC


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    key: bytes
    value: bytes


def encode_record(change: RecordChange) -> bytes:
    # The record is already JSON text (cbrrr atjson); Fragment embeds it without a re-parse.
    record: Any = orjson.Fragment(change.record) if change.record is not None else None
    return orjson.dumps(
        {
            "v": SCHEMA_VERSION,
            "did": change.did,
            "collection": change.collection,
            "rkey": change.rkey,
            "op": change.op,
            "cid": change.cid,
            "rev": change.rev,
            "seq": change.seq,
            "time": change.time,
            "record": record,
            "source": change.source,
        }
    )


def encode_repo(change: RepoChange) -> bytes:
    return orjson.dumps(
        {
            "v": SCHEMA_VERSION,
            "did": change.did,
            "kind": change.kind,
            "rev": change.rev,
            "data_cid": change.data_cid,
            "active": change.active,
            "status": change.status,
            "handle": change.handle,
            "sync_state": change.sync_state,
            "desync_reason": change.desync_reason,
            "seq": change.seq,
            "time": change.time,
            "source": change.source,
            "snapshot": change.snapshot,
            "run": change.run,
        }
    )


def encode_change(change: Change, topics: Topics = Topics()) -> Message:
    key = change.did.encode()
    if isinstance(change, RecordChange):
        return Message(topics.records, key, encode_record(change))
    return Message(topics.repos, key, encode_repo(change))


def decode_value(value: bytes) -> dict[str, Any]:
    """Parse a message value; raises InputError on bytes that are not a v1 skyfill message."""
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InputError(f"not JSON: {exc}", kind="message") from exc
    if not isinstance(obj, dict) or obj.get("v") != SCHEMA_VERSION:
        raise InputError(f"unsupported message version: {obj.get('v') if isinstance(obj, dict) else obj!r}",
                         kind="message")
    return obj


def record_change_from(obj: dict[str, Any]) -> RecordChange:
    record = obj.get("record")
    return RecordChange(
        did=obj["did"], collection=obj["collection"], rkey=obj["rkey"], op=obj["op"], cid=obj.get("cid"),
        rev=obj.get("rev"), seq=obj.get("seq"), time=obj.get("time"),
        record=None if record is None else orjson.dumps(record).decode(), source=obj["source"],
    )


def repo_change_from(obj: dict[str, Any]) -> RepoChange:
    return RepoChange(
        did=obj["did"], kind=obj["kind"], rev=obj.get("rev"), data_cid=obj.get("data_cid"),
        active=bool(obj["active"]), status=obj["status"], handle=obj.get("handle"),
        sync_state=obj["sync_state"], desync_reason=obj.get("desync_reason"), seq=obj.get("seq"),
        time=obj.get("time"), source=obj["source"], snapshot=bool(obj.get("snapshot", False)),
        run=obj.get("run"),
    )
