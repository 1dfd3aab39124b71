"""Bad input to the `skyfill` command ends in one `Error: ...` line and a non-zero exit, never a
traceback, a spin or a silent start.

Every case runs the real command as a subprocess (`python -m skyfill.cli`, PYTHONPATH inherited)
on real files: DuckDB databases that are truncated or have a corrupt WAL, a directory the process
cannot write to, ports really held by a socket, announcement files as a crash or a hand could
leave them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import duckdb
import orjson
import pytest
from click.testing import CliRunner

from skyfill.cli import main
from skyfill.app.daemon_client import announce_path
from skyfill.storage import Store

ROOT = Path(__file__).resolve().parents[1]
DID = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
DEAD_RELAY = "ws://127.0.0.1:1"


@dataclass
class Files:
    dir: Path
    good: Path          # an empty skyfill database
    binary: Path        # 300 bytes that are not UTF-8
    regular: Path       # a regular file (a --db "under" it cannot exist)
    half: Path          # a populated database truncated in the middle of its data
    bad_wal: Path       # a database whose WAL has a corrupted last entry
    ro_db: Path         # a writable database in a directory this process may not write to
    held_port: int      # a loopback port a socket listens on


def _truncated_to_half(path: Path) -> None:
    """A populated database cut in the middle of its table data (a copy or a disk that stopped)."""
    Store(path).close()
    con = duckdb.connect(str(path))
    con.execute(
        "INSERT INTO repo_base (did, rev, sync_state, first_seen_at, last_event_at, k) SELECT did, rev, s, f, l, "
        "md5_number_lower(did) FROM (SELECT 'did:plc:' || "
        "md5(i::VARCHAR)[:24] AS did, md5(i::VARCHAR) AS rev, CASE WHEN i % 3 = 0 THEN 'synchronized' ELSE 'desynchronized' "
        "END AS s, now() AS f, now() AS l FROM range(50000) t(i))"
    )
    con.execute("CHECKPOINT")
    # The data blocks of the tables come after a 12 KiB header; keep the first half of them.
    last = con.execute("SELECT max(block_id) FROM pragma_storage_info('repo_base') WHERE block_id >= 0").fetchone()
    block = con.execute("SELECT block_size FROM pragma_database_size()").fetchone()
    con.close()
    assert last is not None and block is not None and last[0] >= 4
    os.truncate(path, 3 * 4096 + (last[0] // 2) * block[0])


def _with_uncheckpointed_wal(path: Path) -> None:
    """A database whose last writes live only in its WAL (the writer died before a checkpoint)."""
    Store(path).close()
    code = (
        "import duckdb, os, sys\n"
        "con = duckdb.connect(sys.argv[1])\n"
        "con.execute(\"SET checkpoint_threshold = '1GB'\")\n"
        "con.execute(\"INSERT INTO cursors VALUES ('relay', 1, now())\")\n"
        "con.execute(\"INSERT INTO record_log (v, did, collection, rkey, cid, indexed_at) SELECT 1, 'did:plc:x', "
        "'app.bsky.feed.post', 'k' || i, 'c', now() FROM range(500) t(i)\")\n"
        "os._exit(0)\n"  # no checkpoint, no clean close: the WAL stays
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    wal = Path(str(path) + ".wal")
    data = bytearray(wal.read_bytes())
    assert len(data) > 200
    data[-40] ^= 0xFF  # one flipped bit pattern inside the last entry: its checksum no longer matches
    wal.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Files]:
    d = tmp_path_factory.mktemp("bad")
    good = d / "good.duckdb"
    Store(good).close()
    binary = d / "dids.bin"
    binary.write_bytes(bytes(range(128, 256)) * 2 + b"\xff\xfe\x00")
    regular = d / "regular"
    regular.write_text("not a directory\n")
    half = d / "half.duckdb"
    _truncated_to_half(half)
    bad_wal = d / "badwal.duckdb"
    _with_uncheckpointed_wal(bad_wal)
    ro_dir = d / "readonly"
    ro_dir.mkdir()
    ro_db = ro_dir / "x.duckdb"
    Store(ro_db).close()
    ro_db.chmod(0o666)
    ro_dir.chmod(0o555)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield Files(d, good, binary, regular, half, bad_wal, ro_db, sock.getsockname()[1])
    finally:
        sock.close()
        ro_dir.chmod(0o755)


def _run(args: list[str], *, unprivileged: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "skyfill.cli", *args]
    if unprivileged and os.geteuid() == 0:
        # root ignores directory permissions; without CAP_DAC_OVERRIDE it obeys them like anyone
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: a read-only directory cannot be enforced")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYFILL_")}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _assert_one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode in (1, 2), f"exit {proc.returncode}\n{out}"
    assert "Traceback" not in out, out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, proc.stderr
    # Besides click's own "Usage:" / "Try ..." hint for a bad flag, nothing else is said.
    others = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("Error: ", "Usage: ", "Try "))]
    assert others == [], proc.stderr
    return errors[0]


Case = Callable[[Files], list[str]]

# (name, arguments, a word the one error line must contain)
BAD_INPUTS: list[tuple[str, Case, str]] = [
    ("gaps-end-9999", lambda f: ["gaps", "--db", str(f.good), "--start", "2024-01-01", "--end", "9999-12-31",
                                 "--no-audit"], "out of range"),
    ("gaps-dids-binary", lambda f: ["gaps", "--db", str(f.good), "--start", "2024-01-01", "--end", "2024-01-02",
                                    "--no-audit", "--dids", f"@{f.binary}"], "UTF-8"),
    ("backfill-dids-binary", lambda f: ["backfill", "--db", str(f.good), "--dids", f"@{f.binary}"], "UTF-8"),
    ("backfill-plc-no-host", lambda f: ["backfill", "--db", str(f.good), "--dids", DID, "--plc-url", "http://"],
     "plc_url"),
    ("gaps-plc-no-host", lambda f: ["gaps", "--db", str(f.good), "--start", "2024-01-01", "--end", "2024-01-02",
                                    "--plc-url", "http://"], "plc_url"),
    ("backfill-plc-bad-port", lambda f: ["backfill", "--db", str(f.good), "--dids", DID, "--plc-url",
                                         "http://h:99999"], "plc_url"),
    ("consume-verify-plc-no-host", lambda f: ["consume", "--db", str(f.dir / "c0.duckdb"), "--relay", DEAD_RELAY,
                                              "--verify", "--plc-url", "https://"], "plc_url"),
    ("relay-open-ipv6", lambda f: ["consume", "--db", str(f.dir / "c1.duckdb"), "--relay", "ws://[::1"], "--relay"),
    ("relay-port-not-a-number", lambda f: ["consume", "--db", str(f.dir / "c2.duckdb"), "--relay",
                                           "ws://host:notaport"], "--relay"),
    ("metrics-port-out-of-range", lambda f: ["consume", "--db", str(f.dir / "c3.duckdb"), "--relay", DEAD_RELAY,
                                             "--metrics-port", "70000"], "--metrics-port"),
    ("metrics-port-in-use", lambda f: ["consume", "--db", str(f.dir / "c4.duckdb"), "--relay", DEAD_RELAY,
                                       "--metrics-port", str(f.held_port)], "--metrics-port"),
    ("admin-port-out-of-range", lambda f: ["consume", "--db", str(f.dir / "c5.duckdb"), "--relay", DEAD_RELAY,
                                           "--admin-port", "-1"], "--admin-port"),
    ("admin-port-in-use", lambda f: ["consume", "--db", str(f.dir / "c6.duckdb"), "--relay", DEAD_RELAY,
                                     "--admin-port", str(f.held_port)], "admin"),
    ("log-level", lambda f: ["--log-level", "NOPE", "status", "--db", str(f.good)], "--log-level"),
    ("flush-interval-0", lambda f: ["consume", "--db", str(f.dir / "c7.duckdb"), "--relay", DEAD_RELAY,
                                    "--flush-interval", "0"], "--flush-interval"),
    ("flush-interval-negative", lambda f: ["consume", "--db", str(f.dir / "c7.duckdb"), "--relay", DEAD_RELAY,
                                           "--flush-interval", "-1"], "--flush-interval"),
    ("flush-interval-nan", lambda f: ["consume", "--db", str(f.dir / "c7.duckdb"), "--relay", DEAD_RELAY,
                                      "--flush-interval", "nan"], "--flush-interval"),
    ("batch-events-0", lambda f: ["consume", "--db", str(f.dir / "c7.duckdb"), "--relay", DEAD_RELAY,
                                  "--batch-events", "0"], "--batch-events"),
    ("per-host-rps-inf", lambda f: ["backfill", "--db", str(f.good), "--dids", DID, "--per-host-rps", "inf"],
     "--per-host-rps"),
    ("status-db-under-file", lambda f: ["status", "--db", str(f.regular / "x.duckdb")], "x.duckdb"),
    ("gaps-db-under-file", lambda f: ["gaps", "--db", str(f.regular / "x.duckdb"), "--start", "2024-01-01",
                                      "--end", "2024-01-02", "--no-audit"], "regular"),
    ("backfill-db-under-file", lambda f: ["backfill", "--db", str(f.regular / "x.duckdb"), "--dids", DID],
     "regular"),
    ("consume-db-under-file", lambda f: ["consume", "--db", str(f.regular / "x.duckdb"), "--relay", DEAD_RELAY],
     "regular"),
    ("status-truncated-db", lambda f: ["status", "--db", str(f.half)], "half.duckdb"),
    ("gaps-truncated-db", lambda f: ["gaps", "--db", str(f.half), "--start", "2024-01-01", "--end", "2024-01-02",
                                     "--no-audit"], "half.duckdb"),
    ("consume-truncated-db", lambda f: ["consume", "--db", str(f.half), "--relay", DEAD_RELAY], "half.duckdb"),
    ("status-corrupt-wal", lambda f: ["status", "--db", str(f.bad_wal)], "WAL"),
    ("backfill-corrupt-wal", lambda f: ["backfill", "--db", str(f.bad_wal), "--dids", DID], "WAL"),
]


@pytest.mark.parametrize("name,args,word", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_error_line(files: Files, name: str, args: Case, word: str) -> None:
    line = _assert_one_line_error(_run(args(files)))
    assert word.lower() in line.lower(), line


@pytest.mark.parametrize("command", [
    ["backfill", "--dids", DID],
    ["consume", "--relay", DEAD_RELAY],
], ids=["backfill", "consume"])
def test_writable_db_in_read_only_directory(files: Files, command: list[str]) -> None:
    """DuckDB opens such a file and fails only at the first commit (it cannot create the WAL):
    refuse at start, before a backfill does its work or a daemon announces itself."""
    line = _assert_one_line_error(_run([command[0], "--db", str(files.ro_db), *command[1:]], unprivileged=True))
    assert "cannot write in" in line and "readonly" in line, line
    assert not announce_path(files.ro_db).exists()


# -- announcements a crash or a hand left behind ---------------------------------------------------

MALFORMED: list[tuple[str, bytes]] = [
    ("not-json", b"not json at all"),
    ("json-list", b"[1, 2, 3]"),
    ("empty", b""),
    ("binary", bytes(range(256))),
    ("pid-not-int", b'{"pid": "x", "url": "http://127.0.0.1:1", "token": "t"}'),
    ("pid-float", b'{"pid": 1.5, "url": "http://127.0.0.1:1", "token": "t"}'),
    ("missing-token", b'{"pid": 1, "url": "http://127.0.0.1:1"}'),
    ("token-not-str", b'{"pid": 1, "url": "http://127.0.0.1:1", "token": 7}'),
    ("url-not-str", b'{"pid": 1, "url": 5, "token": "t"}'),
    ("url-bad-port", b'{"pid": 1, "url": "http://127.0.0.1:notaport", "token": "t"}'),
    ("url-off-loopback", b'{"pid": 1, "url": "http://example.com:80", "token": "t"}'),
    ("start-time-str", b'{"pid": 1, "start_time": "x", "url": "http://127.0.0.1:1", "token": "t"}'),
]


@pytest.mark.parametrize("name,content", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_announcement_is_stale(tmp_path: Path, name: str, content: bytes) -> None:
    """No daemon writes such a file (it replaces the announcement atomically): with the database
    free, the command works on it and removes the leftover."""
    db = tmp_path / "m.duckdb"
    Store(db).close()
    announce_path(db).write_bytes(content)
    proc = _run(["status", "--db", str(db), "--json"])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert orjson.loads(proc.stdout)["repos"]["total"] == 0
    assert not announce_path(db).exists()


def test_malformed_announcement_on_a_held_database(tmp_path: Path) -> None:
    """The file is held (by this test) and its announcement is garbage: one line says so."""
    db = tmp_path / "h.duckdb"
    announce_path(db).write_bytes(b'{"pid": "x"}')
    with Store(db):
        line = _assert_one_line_error(_run(["status", "--db", str(db)]))
    assert "held by another process" in line, line
    assert announce_path(db).exists()  # not ours to remove while someone holds the file



def test_unexpected_error_is_one_structured_line() -> None:
    """The last resort, for a bug no input can reach on purpose: a command stands in for it
    (in-process, via click's runner). One JSON log line names the error and where it happened."""

    @click.command("raise-for-test")
    def broken() -> None:
        raise RuntimeError("kaboom\nsecond line")

    main.add_command(broken)
    try:
        result = CliRunner().invoke(main, ["--log-json", "raise-for-test"])
    finally:
        main.commands.pop("raise-for-test")
    assert result.exit_code == 1
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    line = orjson.loads(lines[0])
    assert line["level"] == "error" and line["error"] == "RuntimeError" and line["detail"] == "kaboom second line"
    assert line["at"].endswith(".py:" + line["at"].rsplit(":", 1)[1]) and "test_cli_errors.py" in line["at"]
    assert "Traceback" not in result.output
