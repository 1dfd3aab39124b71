"""`field_default`: a dataclass field's default, so option parsers (click, environment, JSON)
read each default from the one dataclass that holds it instead of writing it again."""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

__all__ = ["field_default"]


def field_default(cls: type, name: str) -> Any:
    """The default of field `name` of dataclass `cls` (its default_factory called)."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise KeyError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name!r}")
