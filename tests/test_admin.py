"""The daemon's admin API and its announcement, against a real AdminServer on 127.0.0.1.

Requests are written byte by byte on real sockets (so a test can stop in the middle of one), the
routes are the daemon's own (`AdminRoutes.table()` over a real DuckDB file), and the commands run
as subprocesses (`python -m skyfill.cli`) that find the server through the announcement file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest

from skyfill.app.admin import AdminServer
from skyfill.consumer.daemon import ConsumeConfig, Daemon
from skyfill.app.routes import AdminRoutes
from skyfill.backfill.config import BackfillConfig
from skyfill.consumer.resync import DaemonReconciler
from skyfill.app.daemon_client import announce_path, find_daemon, process_start_time, read_announcement
from skyfill.storage import Store
from tests.support.faultserver import FaultServer, xrpc_error
from tests.support.wait import free_port

ROOT = Path(__file__).resolve().parents[1]
DID = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"


class Admin:
    """A running AdminServer with the daemon's routes over a real store."""

    def __init__(self, server: AdminServer, store: Store, db: Path) -> None:
        self.server = server
        self.store = store
        self.db = db
        info = read_announcement(db)
        assert info is not None
        self.token = info["token"]
        self.port = int(server.url.rsplit(":", 1)[1])

    async def raw(self, data: bytes, *, close_write: bool = False) -> tuple[int, dict[str, object]]:
        """Send `data` as is; return the status and JSON body of the answer."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(data)
            await writer.drain()
            if close_write:
                writer.write_eof()
            answer = await asyncio.wait_for(reader.read(), timeout=30)
        finally:
            writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), orjson.loads(body)

    async def post(self, path: str, body: bytes, *, token: str | None = None) -> tuple[int, dict[str, object]]:
        auth = b"" if token == "" else f"Authorization: Bearer {token or self.token}\r\n".encode()
        return await self.raw(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n".encode() + auth + b"\r\n" + body
        )


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[Admin]:
    db = tmp_path / "a.duckdb"
    store = Store(db)
    routes = AdminRoutes(store, reconciler=DaemonReconciler(Daemon(store, ConsumeConfig(relay="ws://127.0.0.1:1"))),
                         config=BackfillConfig(plc_url="https://plc.directory"))
    server = AdminServer(db=str(db), routes=routes.table(), body_timeout=1.0, max_connections=8)
    await server.start()
    try:
        yield Admin(server, store, db)
    finally:
        await server.aclose()
        store.close()


# -- the announcement ---------------------------------------------------------------------------


async def test_announcement_ignores_planted_symlinks(tmp_path: Path) -> None:
    """A symlink planted where the token file or its temporary file goes never receives the token."""
    db = tmp_path / "s.duckdb"
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    old_tmp = announce_path(db).with_suffix(".tmp")  # the fixed temporary name used before
    old_tmp.symlink_to(victim)
    server = AdminServer(db=str(db), routes={})
    old_umask = os.umask(0)  # the file must be private whatever the umask
    try:
        await server.start()
    finally:
        os.umask(old_umask)
    try:
        assert victim.read_bytes() == b"untouched"
        path = announce_path(db)
        st = os.lstat(path)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        info = read_announcement(db)
        assert info is not None and info["pid"] == os.getpid()
        assert info["start_time"] == process_start_time(os.getpid())
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["victim", old_tmp.name, path.name])
    finally:
        await server.aclose()
    assert not announce_path(db).exists()


# -- authentication comes first ------------------------------------------------------------------


async def test_unauthenticated_malformed_json_gets_401_without_details(admin: Admin) -> None:
    status, body = await admin.post("/enqueue", b"{not json", token="wrong")
    assert (status, body) == (401, {"error": "unauthorized"})
    status, body = await admin.post("/enqueue", b"{not json", token="")
    assert (status, body) == (401, {"error": "unauthorized"})


async def test_unauthenticated_request_is_refused_before_its_body(admin: Admin) -> None:
    """A declared body that never comes does not hold the connection of a client without the token."""
    status, body = await admin.raw(b"POST /backfill HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
    assert (status, body) == (401, {"error": "unauthorized"})


async def test_200_unauthenticated_connections_are_all_answered(admin: Admin) -> None:
    """The trial that held 200 of 200 such connections: each is answered (401, or 503 beyond the
    bound) without its body ever arriving, and the API then serves its real client."""

    async def one() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
        try:
            writer.write(b"POST /gaps HTTP/1.1\r\nContent-Length: 4096\r\n\r\n{")
            await writer.drain()
            return await asyncio.wait_for(reader.read(), timeout=60)
        finally:
            writer.close()

    answers = await asyncio.gather(*(one() for _ in range(200)))
    assert all(a.startswith((b"HTTP/1.1 401 ", b"HTTP/1.1 503 ")) for a in answers)
    assert sum(a.startswith(b"HTTP/1.1 401 ") for a in answers) >= 8
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        status, body = await admin.post("/enqueue", b'{"dids": ["did:plc:dddddddddddddddddddddddd"]}')
        if status != 503 or loop.time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert (status, body) == (200, {"enqueued": 1, "dids": 1})


async def test_authenticated_body_that_never_comes_times_out(admin: Admin) -> None:
    head = f"POST /enqueue HTTP/1.1\r\nAuthorization: Bearer {admin.token}\r\nContent-Length: 50\r\n\r\n"
    status, body = await admin.raw(head.encode() + b'{"dids"')
    assert status == 408 and body == {"error": "body not received in time"}


async def test_connections_are_bounded_and_released(admin: Admin) -> None:
    """Idle connections beyond the bound are turned away at once; the held ones are answered by
    the body deadline, after which the API serves normally."""
    head = f"POST /enqueue HTTP/1.1\r\nAuthorization: Bearer {admin.token}\r\nContent-Length: 10\r\n\r\n".encode()
    held = []
    for _ in range(8):  # the fixture's max_connections
        reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
        writer.write(head)
        await writer.drain()
        held.append((reader, writer))
    # The 9th connection, while eight are waiting for their bodies, is told so and closed.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        status, body = await admin.post("/enqueue", b'{"dids": ["did:plc:bbbbbbbbbbbbbbbbbbbbbbbb"]}')
        if status == 503 or loop.time() > deadline:
            break
        await asyncio.sleep(0.05)  # the eight may not all be accepted yet
    assert (status, body) == (503, {"error": "too many connections"})
    answers = [await asyncio.wait_for(r.read(), timeout=30) for r, _ in held]
    for _, w in held:
        w.close()
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers)
    deadline = loop.time() + 30
    while True:  # the slots free up as the server sees each client close
        status, body = await admin.post("/enqueue", b'{"dids": ["did:plc:bbbbbbbbbbbbbbbbbbbbbbbb"]}')
        if status != 503 or loop.time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert (status, body) == (200, {"enqueued": 1, "dids": 1})


async def test_oversized_and_chunked_bodies_refused(admin: Admin) -> None:
    auth = f"Authorization: Bearer {admin.token}\r\n"
    status, _ = await admin.raw(f"POST /enqueue HTTP/1.1\r\n{auth}Content-Length: 99999999\r\n\r\n".encode())
    assert status == 413
    status, _ = await admin.raw(f"POST /enqueue HTTP/1.1\r\n{auth}Transfer-Encoding: chunked\r\n\r\n".encode())
    assert status == 411
    status, _ = await admin.raw(f"POST /enqueue HTTP/1.1\r\n{auth}Content-Length: -5\r\n\r\n".encode())
    assert status == 400


async def test_peer_that_leaves_without_a_request(admin: Admin, caplog: pytest.LogCaptureFixture) -> None:
    with socket.create_connection(("127.0.0.1", admin.port)):
        pass
    status, body = await admin.post("/enqueue", b'{"dids": ["did:plc:cccccccccccccccccccccccc"]}')
    assert (status, body) == (200, {"enqueued": 1, "dids": 1})
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- typed request bodies ------------------------------------------------------------------------

BAD_BODIES: list[tuple[str, str, bytes, str]] = [
    ("enqueue-dids-string", "/enqueue", b'{"dids": "did:plc:x"}', "'dids' must be a list of DIDs"),
    ("enqueue-invalid-did", "/enqueue", b'{"dids": ["not-a-did"]}', "invalid DID"),
    ("enqueue-dids-numbers", "/enqueue", b'{"dids": [1, 2]}', "'dids' must be a list of DIDs"),
    ("enqueue-no-dids", "/enqueue", b"{}", "'dids'"),
    ("enqueue-reason-number", "/enqueue", b'{"dids": ["did:plc:x"], "reason": 5}', "'reason' must be a string"),
    ("enqueue-body-list", "/enqueue", b'["did:plc:x"]', "must be a JSON object"),
    ("enqueue-unknown-field", "/enqueue", b'{"dids": ["did:plc:x"], "did": "y"}', "unknown field"),
    ("backfill-dids-string", "/backfill", b'{"dids": "did:plc:x"}', "'dids' must be a list of DIDs or \"all\""),
    ("backfill-concurrency-string", "/backfill", b'{"dids": ["did:plc:x"], "concurrency": "8"}',
     "'concurrency' must be an integer"),
    ("backfill-concurrency-bool", "/backfill", b'{"dids": ["did:plc:x"], "concurrency": true}',
     "'concurrency' must be an integer"),
    ("backfill-concurrency-zero", "/backfill", b'{"dids": ["did:plc:x"], "concurrency": 0}', "concurrency"),
    ("backfill-verify-string", "/backfill", b'{"dids": ["did:plc:x"], "verify": "no"}', "'verify' must be true"),
    ("backfill-rps-string", "/backfill", b'{"dids": ["did:plc:x"], "per_host_rps": "fast"}', "'per_host_rps'"),
    ("backfill-plc-number", "/backfill", b'{"dids": ["did:plc:x"], "plc_url": 7}', "'plc_url' must be a string"),
    ("backfill-plc-no-host", "/backfill", b'{"dids": ["did:plc:x"], "plc_url": "http://"}', "plc_url"),
    ("backfill-both", "/backfill", b'{"dids": ["did:plc:x"], "from_queue": true}', "exactly one"),
    ("backfill-neither", "/backfill", b"{}", "exactly one"),
    ("backfill-from-queue-string", "/backfill", b'{"from_queue": "yes"}', "'from_queue' must be true"),
    ("gaps-start-number", "/gaps", b'{"start": 5, "end": "2024-01-02"}', "'start' must be a string"),
    ("gaps-end-out-of-range", "/gaps", b'{"start": "2024-01-01", "end": "9999-12-31"}', "out of range"),
    ("gaps-no-window", "/gaps", b'{"audit": false}', "'start' and 'end' are required"),
    ("gaps-dids-string", "/gaps", b'{"start": "2024-01-01", "end": "2024-01-02", "dids": "did:plc:x"}',
     "'dids' must be a list of DIDs"),
    ("gaps-audit-string", "/gaps", b'{"start": "2024-01-01", "end": "2024-01-02", "audit": "no"}', "'audit'"),
    ("gaps-enqueue-number", "/gaps", b'{"start": "2024-01-01", "end": "2024-01-02", "enqueue": 3}', "'enqueue'"),
]


@pytest.mark.parametrize("name,path,body,message", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
async def test_wrongly_typed_body_is_a_400_with_one_line(
    admin: Admin, caplog: pytest.LogCaptureFixture, name: str, path: str, body: bytes, message: str
) -> None:
    status, answer = await admin.post(path, body)
    assert status == 400, answer
    error = answer["error"]
    assert isinstance(error, str) and message in error and "\n" not in error and "Error(" not in error, error
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback in the daemon's log
    assert admin.store.fetchall("SELECT count(*) FROM backfill_queue") == [(0,)]


async def test_enqueue_valid_body(admin: Admin) -> None:
    status, body = await admin.post("/enqueue", orjson.dumps({"dids": [DID, DID], "reason": "operator"}))
    assert (status, body) == (200, {"enqueued": 1, "dids": 1})
    assert admin.store.fetchall("SELECT did, reasons FROM backfill_queue") == [(DID, ["operator"])]


# -- `skyfill backfill` through the daemon keeps the daemon's settings -------------------------------


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "skyfill.cli", *args, cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("SKYFILL_")},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_backfill_through_daemon_sends_only_options_the_user_set(tmp_path: Path) -> None:
    """The daemon runs with its own PLC directory; a `skyfill backfill` without --plc-url must use it
    (before: the command's default https://plc.directory replaced it). A --plc-url the user gives wins."""
    db = tmp_path / "d.duckdb"
    store = Store(db)
    with FaultServer() as daemon_plc, FaultServer() as user_plc:
        for srv in (daemon_plc, user_plc):
            srv.script(f"/{DID}", xrpc_error("NotFound", "DID not registered", 404))
        daemon = Daemon(store, ConsumeConfig(relay="ws://127.0.0.1:1"))
        routes = AdminRoutes(store, reconciler=DaemonReconciler(daemon),
                             config=BackfillConfig(plc_url=daemon_plc.url, allow_private_hosts=True))
        server = AdminServer(db=str(db), routes=routes.table())
        await server.start()
        try:
            code, out, err = await _cli("backfill", "--db", str(db), "--dids", DID, "--json")
            assert code == 0, err
            assert orjson.loads(out)["repos_failed"] == 1
            assert daemon_plc.count(f"/{DID}") >= 1
            assert user_plc.count(f"/{DID}") == 0

            code, out, err = await _cli("backfill", "--db", str(db), "--dids", DID, "--json",
                                        "--plc-url", user_plc.url)
            assert code == 0, err
            assert user_plc.count(f"/{DID}") >= 1
        finally:
            await server.aclose()
            store.close()


# -- a stale announcement naming a live foreign process ----------------------------------------------


@pytest.fixture
def foreign_pid() -> Iterator[int]:
    """A live process that is not a skyfill daemon (what a reused pid points at after kill -9)."""
    proc = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _silent_listener() -> tuple[socket.socket, threading.Thread]:
    """A port where something else now listens: it accepts and hangs up without a word."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return sock, thread


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "skyfill.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if not k.startswith("SKYFILL_")}, timeout=120)


STALE_COMMANDS = [
    ("status", ["status", "--json"]),
    ("gaps", ["gaps", "--start", "2024-01-01", "--end", "2024-01-02", "--no-audit", "--json"]),
    ("backfill", ["backfill", "--from-queue", "--json"]),
]


@pytest.mark.parametrize("kind", ["no-start-time-dead-port", "start-time-mismatch-live-port"])
@pytest.mark.parametrize("name,command", STALE_COMMANDS, ids=[c[0] for c in STALE_COMMANDS])
def test_stale_announcement_naming_a_live_process(
    tmp_path: Path, foreign_pid: int, kind: str, name: str, command: list[str]
) -> None:
    db = tmp_path / "k.duckdb"
    Store(db).close()
    listener = None
    if kind == "no-start-time-dead-port":
        # As written by a daemon without /proc, or before start times were recorded.
        info = {"pid": foreign_pid, "url": f"http://127.0.0.1:{free_port()}", "token": "t" * 32}
    else:
        listener, _ = _silent_listener()
        start = process_start_time(foreign_pid)
        assert start is not None
        info = {"pid": foreign_pid, "start_time": start + 1, "token": "t" * 32,
                "url": f"http://127.0.0.1:{listener.getsockname()[1]}"}
    announce_path(db).write_bytes(orjson.dumps(info))
    try:
        assert find_daemon(db) is None
        proc = _run(command[0], "--db", str(db), *command[1:])
    finally:
        if listener is not None:
            listener.close()
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    orjson.loads(proc.stdout)  # the command's own answer, computed on the file
    assert not announce_path(db).exists()  # holding the file proved it stale


async def test_live_daemon_still_found(admin: Admin) -> None:
    """The checks that catch stale files accept the real one, and the commands use it."""
    info = find_daemon(admin.db)
    assert info is not None and info["url"] == admin.server.url
    code, out, err = await _cli("status", "--db", str(admin.db), "--json")
    assert code == 0, err
    assert "repos" in orjson.loads(out)
    assert announce_path(admin.db).exists()
