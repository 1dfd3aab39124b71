"""Create skyfill's topics when they are missing (an operator may also create them by hand)."""

from __future__ import annotations

from collections.abc import Mapping

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from skyfill.errors import PublishError

__all__ = ["ensure_topics"]


async def ensure_topics(
    bootstrap: str, partitions: Mapping[str, int], *, replication_factor: int = 1, request_timeout_ms: int = 30_000
) -> None:
    """Create each missing topic with the given partition count; existing topics are left alone."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=request_timeout_ms)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(name, num_partitions=n, replication_factor=replication_factor)
            for name, n in partitions.items()
            if name not in existing
        ]
        if not new:
            return
        response = await admin.create_topics(new)
        for name, code, message in response.topic_errors:
            if code not in (0, TopicAlreadyExistsError.errno):
                raise PublishError(f"cannot create topic {name}: error {code} {message}")
    except KafkaError as exc:
        raise PublishError(f"cannot create topics on {bootstrap}: {exc!r}") from exc
    finally:
        await admin.close()
