"""atproto identifier syntax: cheap checks that run once per firehose event.

Rules follow the atproto specs (https://atproto.com/specs/*) and the interop syntax vectors:
- DID: `did:<lowercase method>:<id>`, id chars [A-Za-z0-9._:%-], not ending in ':' or '%', <= 2048 chars.
- NSID: >= 3 dot-separated segments, <= 317 chars; the first segment starts with a letter, domain
  segments are 1-63 chars of [A-Za-z0-9-] (no leading/trailing '-'), the last (name) segment is a
  letter then [A-Za-z0-9] (no hyphens), <= 63 chars.
- Record key: 1-512 chars of [A-Za-z0-9._:~-], except "." and "..".
- TID: 13 chars of base32-sortable [2-7a-z]; the first char is one of [2-7a-j] (top bit clear).
- Handle: a DNS name of >= 2 labels, <= 253 chars; the TLD starts with a letter.
Semantic checks (DID method support, reserved TLDs, percent-escape validity) are not done here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Final

from skyfill.errors import SyntaxError_
from .records import is_valid_datetime

__all__ = [
    "is_did",
    "is_nsid",
    "is_record_key",
    "is_tid",
    "is_handle",
    "is_valid_datetime",
    "check_did",
    "check_nsid",
    "check_record_key",
    "check_tid",
    "collection_matcher",
]

_DID: Final = re.compile(r"did:[a-z]+:[a-zA-Z0-9._:%-]*[a-zA-Z0-9._-]")
_NSID: Final = re.compile(
    r"[a-zA-Z](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)+"
    r"\.[a-zA-Z][a-zA-Z0-9]{0,62}"
)
_RKEY: Final = re.compile(r"[A-Za-z0-9._:~-]{1,512}")
_TID: Final = re.compile(r"[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}")
_HANDLE: Final = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
)
# fullmatch is used everywhere: `$` would accept a trailing newline.
_did_match: Final = _DID.fullmatch
_nsid_match: Final = _NSID.fullmatch
_rkey_match: Final = _RKEY.fullmatch
_tid_match: Final = _TID.fullmatch
_handle_match: Final = _HANDLE.fullmatch


def is_did(s: object) -> bool:
    return type(s) is str and len(s) <= 2048 and _did_match(s) is not None


def is_nsid(s: object) -> bool:
    return type(s) is str and len(s) <= 317 and _nsid_match(s) is not None


def is_record_key(s: object) -> bool:
    return type(s) is str and _rkey_match(s) is not None and s != "." and s != ".."


def is_tid(s: object) -> bool:
    return type(s) is str and len(s) == 13 and _tid_match(s) is not None


def is_handle(s: object) -> bool:
    return type(s) is str and len(s) <= 253 and _handle_match(s) is not None


def check_did(s: object) -> str:
    if not is_did(s):
        raise SyntaxError_(f"invalid DID: {_show(s)}", kind="bad_did")
    return s  # type: ignore[return-value]


def check_nsid(s: object) -> str:
    if not is_nsid(s):
        raise SyntaxError_(f"invalid NSID: {_show(s)}", kind="bad_nsid")
    return s  # type: ignore[return-value]


def check_record_key(s: object) -> str:
    if not is_record_key(s):
        raise SyntaxError_(f"invalid record key: {_show(s)}", kind="bad_rkey")
    return s  # type: ignore[return-value]


def check_tid(s: object) -> str:
    if not is_tid(s):
        raise SyntaxError_(f"invalid TID: {_show(s)}", kind="bad_tid")
    return s  # type: ignore[return-value]


def _show(s: object) -> str:
    text = repr(s)
    return text if len(text) <= 80 else text[:77] + "..."


def collection_matcher(patterns: Sequence[str]) -> Callable[[str], bool] | None:
    """A predicate for the collections to keep; None means "keep everything".

    Patterns are exact NSIDs or a prefix ending in `.*`: `app.bsky.feed.*` matches
    `app.bsky.feed.post` and `app.bsky.feed.threadgate`, but not `app.bsky.feedx.post`
    nor `app.bsky.feed` itself. A bare `*` matches everything.
    """
    exact: set[str] = set()
    prefixes: list[str] = []
    for pattern in patterns:
        if pattern == "*":
            return None
        if pattern.endswith(".*"):
            prefixes.append(pattern[:-1])  # keep the dot: "app.bsky.feed."
        else:
            exact.add(pattern)
    if not exact and not prefixes:
        return None
    if not prefixes:
        return exact.__contains__
    starts = tuple(prefixes)
    cache: dict[str, bool] = {}

    def want(collection: str) -> bool:
        # Few distinct collections exist; memoise so the per-op cost is one dict lookup.
        hit = cache.get(collection)
        if hit is None:
            hit = collection in exact or collection.startswith(starts)
            if len(cache) < 10_000:
                cache[collection] = hit
        return hit

    return want
