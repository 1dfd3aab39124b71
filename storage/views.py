"""The typed views (storage/views.sql): `posts`, `likes`, `reposts`, `follows`, `blocks`,
`profiles`, `lists`, `list_items` over `records`, created by `StoreBase` after the schema.

EVENT_AT_SQL is the one place that says where a record's event time comes from: the views, the
Parquet export and the JSONBench queries all read it. Switch it to "event_at" once `records`
has that column (firehose `time` for live records, the rkey's or rev's TID time for backfilled ones).
"""

from __future__ import annotations

from importlib import resources
from typing import Final

__all__ = ["EVENT_AT_SQL", "TYPED_VIEWS", "views_sql"]

# SQL expression over a `records` row giving its event time (TIMESTAMPTZ).
EVENT_AT_SQL: Final = "NULL::TIMESTAMPTZ"

TYPED_VIEWS: Final = ("posts", "likes", "reposts", "follows", "blocks", "profiles", "lists", "list_items")

_MARKER: Final = "@EVENT_AT@"


def views_sql(event_at: str = EVENT_AT_SQL) -> str:
    """The CREATE OR REPLACE VIEW statements, with `event_at` as the event-time expression."""
    text = resources.files("skyfill.storage").joinpath("views.sql").read_text()
    return text.replace(_MARKER, event_at)
