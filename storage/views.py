"""The names of the typed views (storage/views.sql) over `records`, for users and tools."""

from __future__ import annotations

from typing import Final

__all__ = ["TYPED_VIEWS"]

TYPED_VIEWS: Final = ("posts", "likes", "reposts", "follows", "blocks", "profiles", "lists", "list_items")
