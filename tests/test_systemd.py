"""deploy/systemd/skyfill.service (issue 14): the unit says what the README promises, `systemd-analyze
verify` accepts it, and its ExecStart, run as the service manager would (environment from the
EnvironmentFile, stderr not a terminal), upgrades an old database on open (logged), mirrors a
local relay and stops on the unit's KillSignal within TimeoutStopSec with exit 0 and the cursor
durable: the upgrade path is stop, upgrade, start."""

from __future__ import annotations

import configparser
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import orjson
import pytest

from skyfill.storage.migrate import SCHEMA_VERSION

from .support.daemon import ROOT, announced, reap, stored_cursor
from .support.mirror import expected_mirror, mirror_of, world_frames
from .support.relay import LocalRelay
from .support.wait import free_port, poll

UNIT = ROOT / "deploy" / "systemd" / "skyfill.service"
V1_SCHEMA = ROOT / "tests" / "fixtures" / "schema_v1.sql"
SKYFILL = Path(sys.executable).parent / "skyfill"


def _unit(text: str | None = None) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(delimiters=("=",), comment_prefixes=("#",), strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(text if text is not None else UNIT.read_text())
    return parser


def _exec_start(unit: configparser.RawConfigParser) -> list[str]:
    return shlex.split(unit["Service"]["ExecStart"])


def test_the_unit_restarts_on_failure_stops_gracefully_and_runs_as_its_own_user() -> None:
    unit = _unit()
    service = unit["Service"]
    assert service["Type"] == "simple"
    argv = _exec_start(unit)
    assert argv[0].endswith("/.venv/bin/skyfill") and argv[1] == "consume"
    db = argv[argv.index("--db") + 1]
    assert db.startswith(f"/var/lib/{service['StateDirectory']}/")  # the database in the state directory
    assert service["WorkingDirectory"] == f"/var/lib/{service['StateDirectory']}"
    assert service["User"] == service["Group"] == "skyfill"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"
    assert int(service["TimeoutStopSec"]) >= 60  # a drain, or a checkpoint of a large store, first
    assert set(service["RestartPreventExitStatus"].split()) == {"2", "3"}  # 4 (storage) is restarted
    assert service["EnvironmentFile"].startswith("-")  # optional
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "network-online.target" in unit["Unit"]["After"]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the unit's keys are checked by the test above)")
    unit = UNIT.read_text()
    # verify checks that ExecStart's program exists: this checkout's skyfill stands in for /opt's
    copy = tmp_path / "skyfill.service"
    copy.write_text(unit.replace(_exec_start(_unit(unit))[0], str(SKYFILL)))
    done = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "skyfill.service" not in done.stderr, done.stderr
    # and it does check: a unit whose program is missing is refused
    copy.write_text(unit.replace(_exec_start(_unit(unit))[0], str(tmp_path / "missing" / "skyfill")))
    refused = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "skyfill" in refused.stderr


def _v1_file(path: Path) -> None:
    """A database as skyfill's first schema wrote it (tests/fixtures/schema_v1.sql), with one repo."""
    con = duckdb.connect(str(path))
    con.execute(V1_SCHEMA.read_text())
    con.execute("INSERT INTO repos (did, rev, first_seen_at) VALUES ('did:plc:aaaaaaaaaaaaaaaaaaaaaaaa', "
                "'3laaaaaaaaaa2', now())")
    con.close()


def test_the_units_command_migrates_an_old_file_then_stops_on_its_kill_signal(tmp_path: Path) -> None:
    unit = _unit()
    service = unit["Service"]
    argv = _exec_start(unit)
    db = tmp_path / "skyfill.duckdb"
    _v1_file(db)
    port = free_port()
    argv[0] = str(SKYFILL)
    argv[argv.index("--db") + 1] = str(db)
    argv[argv.index("--metrics-port") + 1] = str(port)
    frames = world_frames(11, 10, 400)
    log = tmp_path / "journal.log"
    with LocalRelay(frames) as relay, log.open("wb") as journal:
        # what an EnvironmentFile would hold: the options beyond the unit's own
        env = {"PATH": "/usr/bin:/bin", "SKYFILL_RELAY": relay.url, "SKYFILL_CURSOR": "0",
               "SKYFILL_FLUSH_INTERVAL": "0.05"}
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=journal, stderr=journal)
        try:
            info = announced(db, proc, log=log, timeout=60)
            poll(lambda: stored_cursor(info) == relay.head, timeout=60, what="the stored cursor at the head",
                 interval=0.1)
            proc.send_signal(getattr(signal, service["KillSignal"]))
            assert proc.wait(timeout=float(service["TimeoutStopSec"])) == 0, log.read_text()
        finally:
            reap(proc)
        head = relay.head
    lines = [orjson.loads(line) for line in log.read_text().splitlines()]  # the journal: JSON lines
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines), lines
    migrated = [line for line in lines if line["msg"] == f"migrated the database to schema version {SCHEMA_VERSION}"]
    assert len(migrated) == 1 and migrated[0]["path"] == str(db), lines
    assert not (tmp_path / "skyfill.duckdb.daemon.json").exists()
    con = duckdb.connect(str(db), read_only=True)
    try:
        assert con.execute("SELECT max(seq) FROM cursors").fetchall() == [(head,)]  # durable
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall() == [
            (str(SCHEMA_VERSION),)]
    finally:
        con.close()
    records, revs = mirror_of(db)
    want_records, want_revs = expected_mirror(frames)
    assert records == want_records and revs.items() >= want_revs.items()
