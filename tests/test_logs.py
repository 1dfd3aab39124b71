"""Logs for operators (issue 14): the real `skyfill backfill` as a subprocess, its stderr a pipe
(not a terminal), against a local HTTP server playing PLC and PDS (tests/support/served.py).

At info: every stderr line is one JSON object with ts/level/logger/msg; no per-request HTTP line
(httpx's `HTTP Request: ...`); at most one line per repo outcome, carrying did= and host=; and
the periodic progress summaries. With --log-level debug the HTTP lines appear (as debug lines)
and every repo backfilled gets its own debug line."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from skyfill._logging import configure_logging
from tests.support.faultserver import FaultServer, Reply, Seen, xrpc_error
from tests.support.generate.firehose import World
from tests.support.served import GET_REPO, serve_firehose_world

from .support.daemon import ROOT

GONE = 0  # index of the DID whose PDS answers RepoNotFound


def _lines(stderr: str) -> list[dict[str, Any]]:
    out = []
    for line in stderr.splitlines():
        doc = orjson.loads(line)  # every line is JSON, or this raises
        assert isinstance(doc, dict) and {"ts", "level", "logger", "msg"} <= set(doc), line
        out.append(doc)
    return out


def _backfill(tmp_path: Path, *flags: str) -> tuple[list[str], FaultServer, list[dict[str, Any]]]:
    world = World(5, n_dids=4, initial_records=(5, 5))
    with FaultServer() as srv:
        serve_firehose_world(srv, world)
        cars = {did: world.repo_car(did) for did in world.dids}
        gone = world.dids[GONE]

        def get_repo(seen: Seen) -> Reply:
            did = seen.query["did"]
            if did == gone:
                return xrpc_error("RepoNotFound", "no such repo")
            return Reply(200, cars[did], delay=0.25)  # slow enough for progress lines at 0.1 s

        srv.script(GET_REPO, get_repo)
        proc = subprocess.run(
            [sys.executable, "-m", "skyfill", *flags, "--progress-every", "0.1", "backfill",
             "--db", str(tmp_path / "l.duckdb"), "--dids", ",".join(world.dids), "--plc-url", srv.url,
             "--allow-private-hosts", "--concurrency", "1", "--json"],
            cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )
    assert proc.returncode == 0, proc.stderr
    assert orjson.loads(proc.stdout)["repos_ok"] == 3
    return world.dids, srv, _lines(proc.stderr)


def test_backfill_logs_are_json_one_line_per_repo_outcome_and_no_http_lines_at_info(tmp_path: Path) -> None:
    dids, srv, lines = _backfill(tmp_path)
    assert {line["level"] for line in lines} <= {"info", "warning"}, lines
    assert not [line for line in lines if "HTTP Request" in line["msg"] or line["logger"].startswith("httpx")]
    failed = [line for line in lines if line["msg"] == "backfill failed"]
    assert len(failed) == 1, lines
    host = srv.url.split("://")[1]
    assert failed[0]["did"] == dids[GONE] and failed[0]["host"] == host and failed[0]["status"] == "RepoNotFound"
    # per repo: at most one line, and each names its DID
    per_did = Counter(line["did"] for line in lines if "did" in line)
    assert set(per_did) <= set(dids) and max(per_did.values()) == 1, per_did
    progress = [line for line in lines if line["msg"] == "backfill progress"]
    assert progress, lines
    assert {"repos", "identities"} <= set(progress[-1]["phases"]) and "records" in progress[-1]
    [finished] = [line for line in lines if line["msg"] == "backfill finished"]
    assert finished["repos_ok"] == 3 and finished["failed"] == {"RepoNotFound": 1}


def test_debug_level_shows_the_http_requests_and_each_repo(tmp_path: Path) -> None:
    dids, _, lines = _backfill(tmp_path, "--log-level", "debug")
    http = [line for line in lines if line["msg"].startswith("HTTP Request:")]
    assert http and {line["level"] for line in http} == {"debug"} and {line["logger"] for line in http} == {"httpx"}
    assert any(GET_REPO.split("/")[-1] in line["msg"] for line in http)
    done = {line["did"]: line for line in lines if line["msg"] == "backfilled"}
    assert set(done) == set(dids) - {dids[GONE]}
    assert all(line["level"] == "debug" and line["host"] and line["added"] > 0 for line in done.values())


@pytest.mark.parametrize(("level", "shown"), [("INFO", False), ("DEBUG", True)])
def test_a_chatty_library_info_line_is_a_debug_line(capsys: pytest.CaptureFixture[str], level: str,
                                                    shown: bool) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging(level=level, json_lines=True)
        for name in ("httpx", "httpcore.connection", "aiokafka.consumer", "websockets.client"):
            logging.getLogger(name).info("chatter from %s", name)
        logging.getLogger("httpx").warning("a real problem")
        logging.getLogger("skyfill.x").info("ours", extra={"ctx": {"did": "did:plc:x"}})
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = _lines(capsys.readouterr().err)
    chatter = [line for line in lines if line["msg"].startswith("chatter")]
    assert len(chatter) == (4 if shown else 0) and all(line["level"] == "debug" for line in chatter)
    assert {(line["logger"], line["level"]) for line in lines if not line["msg"].startswith("chatter")} == {
        ("httpx", "warning"), ("skyfill.x", "info")}
    assert next(line for line in lines if line["msg"] == "ours")["did"] == "did:plc:x"
