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
from .topics import ensure_topics

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
]
