"""The frame fuzz corpus (issue 9): fixed regression mutants, a few hundred random ones, and the
daemon fed a mix of valid frames and rejected mutants. `make fuzz` runs thousands (tests.fuzz)."""

from __future__ import annotations

from pathlib import Path

import pytest

from skyfill.protocol.frames import FRAME_ERROR_KINDS, parse_frame
from skyfill.errors import FrameError

from .fuzz.frames import CORPUS, corpus_cases, run, run_daemon_check

FILES = sorted(CORPUS.glob("*.frame"))


def test_the_corpus_is_on_disk_as_the_builder_makes_it() -> None:
    assert {p.stem: p.read_bytes() for p in FILES} == corpus_cases()


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_each_corpus_frame_ends_in_its_frame_error(path: Path) -> None:
    """The file name starts with the expected kind: `bad_block_hash__commit_tampered.frame`."""
    expected = path.stem.split("__")[0]
    assert expected in FRAME_ERROR_KINDS
    with pytest.raises(FrameError) as info:
        parse_frame(path.read_bytes())
    assert info.value.kind == expected


def test_random_mutants_parse_or_raise_a_known_frame_error() -> None:
    stats = run(400, 9, daemon=False)
    assert stats["failures"] == []
    assert stats["inputs"] == stats["parsed"] + sum(stats["errors"].values())
    # the mutations reach past the CBOR layer into every check the parser makes
    for kind in ("cbor", "bad_body", "bad_op", "bad_block_hash", "bad_car", "bad_commit", "bad_record"):
        assert stats["errors"].get(kind, 0) > 0, (kind, stats["errors"])
    assert stats["parsed"] > 0


def test_a_daemon_fed_rejected_mutants_ends_as_one_fed_only_the_valid_frames() -> None:
    stats = run_daemon_check(150, 9)
    assert stats["failures"] == []
    assert stats["mutants"] == 150 and stats["records"] > 0
    assert sum(stats["errors"].values()) == 150
