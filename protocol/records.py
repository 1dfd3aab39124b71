"""Record blocks (DAG-CBOR) -> stored form: JSON text in the atproto JSON form + createdAt.

libipld decodes CID links as plain bytes, indistinguishable from byte strings, so record
bodies are converted with cbrrr's atjson mode, which keeps tag 42 links as {"$link": ...}
and byte strings as {"$bytes": ...} exactly.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Final

import cbrrr
import orjson

from skyfill.errors import InputError

__all__ = ["record_json", "is_valid_datetime"]

# atproto `datetime`: RFC 3339 with a mandatory timezone (Z or +hh:mm; -00:00 refused),
# seconds required, optional fraction.
_DATETIME: Final = re.compile(
    r"^[0-9]{4}-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-6][0-9]:[0-6][0-9](\.[0-9]{1,20})?(Z|([+-][0-2][0-9]:[0-5][0-9]))$"
)


# The common case, accepted without a calendar: year 0001-9999, day 01-28 (exists in every
# month), UTC `Z`. Everything else (day 29-31, offsets, year 0000, junk) takes the full check.
_FAST_UTC: Final = re.compile(
    r"(?!0000)[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(?:\.[0-9]{1,20})?Z"
).fullmatch


def is_valid_datetime(value: Any) -> bool:
    if type(value) is str and _FAST_UTC(value) is not None:
        return True
    if not isinstance(value, str) or len(value) > 64 or not _DATETIME.match(value) or value.endswith("-00:00"):
        return False
    # the regex admits month 19 or hour 29: let the calendar have the last word
    text = value.replace("Z", "+00:00") if value.endswith("Z") else value
    # Year 0000 is valid atproto syntax but below Python's datetime range: check it as year
    # 2000 (also a leap year), then refuse instants before 0000-01-01T00:00Z (a positive offset).
    year_zero = text.startswith("0000")
    try:
        parsed = datetime.fromisoformat("2000" + text[4:] if year_zero else text)
    except ValueError:
        return False
    return not year_zero or parsed >= datetime(2000, 1, 1, tzinfo=UTC)


def record_json(block: bytes) -> tuple[str, str | None]:
    """Decode a record block into (JSON text, createdAt if it is a valid atproto datetime)."""
    try:
        obj = cbrrr.decode_dag_cbor(block, atjson_mode=True)
    except Exception as exc:  # cbrrr raises its own error types and ValueError
        raise InputError(f"record block is not valid DAG-CBOR: {exc}", kind="record_cbor") from exc
    if not isinstance(obj, dict):
        raise InputError("record is not a map", kind="record_not_map")
    created = obj.get("createdAt")
    return orjson.dumps(obj).decode(), (created if is_valid_datetime(created) else None)
