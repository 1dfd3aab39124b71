"""docs/api.md runs: every ```python block, in order, as one program, against a local world.

The world: a LocalRelay replaying a generated firehose in which one account lost a commit (so
the repair loop has work), and one FaultServer playing the PLC directory and the PDS (DID
documents and signed repo CARs). The blocks get `RELAY`, `HEAD` and `PLC`, run in an empty
working directory, and assert their own results.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.generate.firehose import World

from .support.faultserver import FaultServer
from .support.relay import LocalRelay
from .support.served import break_chain, serve_firehose_world

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks() -> list[str]:
    return _BLOCK.findall(DOC.read_text())


def test_the_page_has_examples_for_each_part() -> None:
    code = "\n".join(_blocks())
    for name in ("Daemon(", "Application(", "open_backfiller(", "detect_gaps(", "backfill_config("):
        assert name in code, f"docs/api.md shows no {name}"


def test_api_docs_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    world = World(31, n_dids=3, initial_records=(10, 10))
    frames = break_chain(list(world.frames(150)), world.dids[0])
    monkeypatch.chdir(tmp_path)
    with FaultServer() as srv, LocalRelay(frames) as relay:
        serve_firehose_world(srv, world)
        namespace: dict[str, object] = {"RELAY": relay.url, "HEAD": relay.head, "PLC": srv.url,
                                        "__name__": "api_docs"}
        for i, block in enumerate(_blocks(), 1):
            exec(compile(block, f"docs/api.md python block {i}", "exec"), namespace)  # noqa: S102
    assert sorted(p.name for p in tmp_path.glob("*.duckdb")) == ["firehose.duckdb", "mirror.duckdb"]
    assert not list(tmp_path.glob("*.daemon.json"))  # the application removed its announcement
