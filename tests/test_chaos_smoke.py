"""The chaos suite (tests/chaos, `make chaos`) must not rot: its cheapest piece runs here. One
kill -9 of the real `skyfill consume` process group while 2 accounts write to the local reference
PDS, a restart at the stored cursor, and the oracle's comparison of the mirror with getRepo."""

from __future__ import annotations

import random
from pathlib import Path

from tests.chaos import Context, kill9, table
from tests.support.network import LocalNetwork, PdsClient


def test_one_kill_9_under_load_then_restart_loses_nothing(
    pds_network: LocalNetwork, pds_client: PdsClient, tmp_path: Path
) -> None:
    ctx = Context(net=pds_network, client=pds_client, workdir=tmp_path, rng=random.Random(9), quick=True)
    res = kill9(ctx, kills=1, accounts=2, gap=(0.2, 0.5), backfill_share=0.0)
    assert res.status == "pass", res.line()
    assert (res.kills, res.restarts, len(res.resumes)) == (1, 1, 1)
    v = res.verdict
    assert v is not None and v.clean and v.repos == 2 and v.records > 0, res.line()
    assert (v.lost, v.extra, v.stale, v.wrong_rev) == (0, 0, 0, 0)
    assert res.figures["writes"] > 0  # the kill landed under load
    assert table([res]).splitlines()[2].split()[:3] == ["kill9", "pass", "1"]
