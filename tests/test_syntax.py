"""atproto identifier syntax against the interop vectors (bluesky-social/atproto-interop-tests)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from skyfill.errors import SyntaxError_
from skyfill.protocol.syntax import (
    check_did,
    check_nsid,
    check_record_key,
    check_tid,
    collection_matcher,
    is_did,
    is_handle,
    is_nsid,
    is_record_key,
    is_tid,
    is_valid_datetime,
)

VECTORS = Path(__file__).parent / "vectors" / "interop" / "syntax"


def _lines(name: str) -> list[str]:
    # Vector files: one value per line; '#' starts a comment line; blank lines separate groups.
    text = (VECTORS / name).read_text(encoding="utf-8")
    return [line for line in text.split("\n") if line and not line.startswith("#")]


CASES: list[tuple[str, Callable[[object], bool], int, int]] = [
    # (file stem, validator, number of valid lines, number of invalid lines) per INVENTORY.md
    ("did_syntax", is_did, 24, 18),
    ("nsid_syntax", is_nsid, 25, 27),
    ("recordkey_syntax", is_record_key, 16, 11),
    ("tid_syntax", is_tid, 4, 9),
    ("handle_syntax", is_handle, 71, 48),
    ("datetime_syntax", is_valid_datetime, 35, 45),
]


@pytest.mark.parametrize(("stem", "check", "n_valid", "n_invalid"), CASES, ids=[c[0] for c in CASES])
def test_interop_vectors(stem: str, check: Callable[[object], bool], n_valid: int, n_invalid: int) -> None:
    valid = _lines(f"{stem}_valid.txt")
    invalid = _lines(f"{stem}_invalid.txt")
    assert (len(valid), len(invalid)) == (n_valid, n_invalid)
    assert [v for v in valid if not check(v)] == []
    assert [v for v in invalid if check(v)] == []


def test_datetimes_that_only_look_valid_are_rejected() -> None:
    # month zero, hour 25, and 0000-01-01T00:00:00+01:00 (before year zero once normalised)
    values = _lines("datetime_parse_invalid.txt")
    assert len(values) == 7
    assert [v for v in values if is_valid_datetime(v)] == []


def test_non_strings_and_trailing_newlines_are_rejected() -> None:
    for check in (is_did, is_nsid, is_record_key, is_tid, is_handle):
        assert not check(None)
        assert not check(b"did:plc:abc")
    assert not is_did("did:plc:7iza6de2dwap2sbkpav7c6c6\n")
    assert not is_tid("3jzfcijpj2z2a\n")
    assert not is_record_key("self\n")


def test_did_length_limit() -> None:
    prefix = "did:plc:"
    assert is_did(prefix + "a" * (2048 - len(prefix)))
    assert not is_did(prefix + "a" * (2049 - len(prefix)))


@pytest.mark.parametrize(
    ("check", "bad", "kind"),
    [
        (check_did, "did:METHOD:val", "bad_did"),
        (check_nsid, "com.example", "bad_nsid"),
        (check_record_key, "..", "bad_rkey"),
        (check_tid, "3jzfcijpj2z21", "bad_tid"),
    ],
)
def test_check_variants_raise_with_kind(check: Callable[[object], str], bad: str, kind: str) -> None:
    with pytest.raises(SyntaxError_) as info:
        check(bad)
    assert info.value.kind == kind


def test_check_variants_return_valid_values() -> None:
    assert check_did("did:plc:7iza6de2dwap2sbkpav7c6c6") == "did:plc:7iza6de2dwap2sbkpav7c6c6"
    assert check_nsid("app.bsky.feed.post") == "app.bsky.feed.post"
    assert check_record_key("self") == "self"
    assert check_tid("3jzfcijpj2z2a") == "3jzfcijpj2z2a"


def test_collection_matcher_exact_and_wildcards() -> None:
    assert collection_matcher([]) is None
    assert collection_matcher(["*"]) is None
    want = collection_matcher(["app.bsky.feed.*", "app.bsky.graph.follow"])
    assert want is not None
    assert want("app.bsky.feed.post")
    assert want("app.bsky.feed.threadgate")
    assert want("app.bsky.graph.follow")
    assert not want("app.bsky.graph.block")
    assert not want("app.bsky.feedx.post")  # the wildcard matches whole segments only
    assert not want("app.bsky.feed")
    exact = collection_matcher(["app.bsky.feed.like"])
    assert exact is not None
    assert exact("app.bsky.feed.like") and not exact("app.bsky.feed.post")
