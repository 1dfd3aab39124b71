"""publish: skyfill's changes on Kafka topics, the reference sink, and scaled-out backfill workers."""

from .messages import (
    BACKFILL_TOPIC,
    RECORDS_TOPIC,
    REPOS_TOPIC,
    SCHEMA_VERSION,
    Message,
    Topics,
    decode_value,
    encode_change,
    record_change_from,
    repo_change_from,
)
from .producer import KafkaPublisher
from .requests import decode_request, encode_request, enqueue_backfill
from .sink import Sink, SinkStats
from .topics import ensure_topics
from .worker import BackfillOne, BackfillWorker, backfill_one_from

__all__ = [
    "SCHEMA_VERSION",
    "RECORDS_TOPIC",
    "REPOS_TOPIC",
    "BACKFILL_TOPIC",
    "Topics",
    "Message",
    "encode_change",
    "decode_value",
    "record_change_from",
    "repo_change_from",
    "KafkaPublisher",
    "ensure_topics",
    "Sink",
    "SinkStats",
    "BackfillWorker",
    "BackfillOne",
    "backfill_one_from",
    "enqueue_backfill",
    "encode_request",
    "decode_request",
]
