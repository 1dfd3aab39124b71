"""`LocalNetwork`: one in-memory PLC directory and one or more reference PDSes, as a node child process."""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.support.network._client import PdsClient
from tests.support.network._install import CACHE_DIR, install
from tests.support.wait import free_port

__all__ = ["LocalNetwork", "LocalPds", "NetworkStartError"]

_DAY_MS = 24 * 3600 * 1000


class NetworkStartError(RuntimeError):
    """The launcher exited or stayed silent; the message carries its stderr."""


@dataclass(frozen=True)
class LocalPds:
    """One PDS of a LocalNetwork: `url` is where it listens (send XRPC calls there), `public_url`
    the `http://localhost:PORT` it writes into DID documents (the same port unless a proxy in front
    serves it), `did` its service DID (`did:web:localhost` for every PDS: nothing resolves it)."""

    index: int
    url: str
    public_url: str
    did: str
    admin_password: str

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1)

    @property
    def public_port(self) -> int:
        return int(self.public_url.rsplit(":", 1)[1].split("/")[0])

    def client(self, *, timeout: float = 30.0) -> PdsClient:
        return PdsClient(self.url, admin_password=self.admin_password, timeout=timeout)


class LocalNetwork:
    """A PLC + PDS pair on 127.0.0.1 (or `pds_count` PDSes on the one PLC), fresh and empty on every start.

    The PDS port is chosen here (not 0) because the PDS writes `http://localhost:PORT` into
    every DID document it creates, so it must know its port before it listens.

    `repo_backfill_limit_ms` is the PDS's firehose replay window; the default (7 days) makes
    `subscribeRepos?cursor=0` replay everything since start. `pds_env` adds or overrides
    @atproto/pds ServerEnvironment fields (e.g. `{"rateLimitsEnabled": True}`) on every PDS.

    `pds_count` PDSes run in the one node process, all on the one PLC, each with its own data
    directory, secrets and port; `pdses` lists them and the `pds_*` properties name the first.
    Every PDS keeps the service DID `did:web:localhost` and the handle domain `.test` on its own
    port of the one hostname (distinct hostnames would need DNS); that is fine for accounts, writes,
    getRepo and sessions (each PDS signs with its own secret). A PDS hands out a handle after
    checking only its own accounts and its resolveHandle answers `.test` from its own accounts only,
    so give accounts handles unique across the network (random suffixes do). `public_ports[i]`, when given, is the port PDS i writes into DID documents
    while it listens on another one (`pdses[i].url`): the caller serves that port, e.g. with a
    proxy that passes requests through or plays a fault (tests/support/pds_proxy.py).
    """

    def __init__(
        self,
        *,
        repo_backfill_limit_ms: int = 7 * _DAY_MS,
        pds_env: Mapping[str, object] | None = None,
        startup_timeout: float = 90.0,
        install_root: Path = CACHE_DIR,
        pds_count: int = 1,
        public_ports: Sequence[int | None] = (),
    ) -> None:
        if pds_count < 1 or len(public_ports) > pds_count:
            raise ValueError("pds_count must be >= 1 and public_ports at most one per PDS")
        self._pds_count = pds_count
        self._public_ports = list(public_ports) + [None] * (pds_count - len(public_ports))
        self._backfill_ms = repo_backfill_limit_ms
        self._pds_env = dict(pds_env or {})
        self._startup_timeout = startup_timeout
        self._install_root = install_root
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None
        self._info: dict[str, object] = {}
        self.start_seconds: float | None = None  # launch -> ready, for reports

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> LocalNetwork:
        if self._proc is not None:
            raise RuntimeError("LocalNetwork already started")
        target = install(root=self._install_root)
        self._tmp = Path(tempfile.mkdtemp(prefix="skyfill-pds-"))
        data_dir = self._tmp / "data"
        data_dir.mkdir()
        config = {
            "plcPort": 0,
            "pdsPort": free_port(),
            "dataDir": str(data_dir),
            "adminPassword": secrets.token_hex(12),
            "jwtSecret": secrets.token_hex(16),
            "plcRotationKeyHex": secrets.token_hex(32),
            "repoBackfillLimitMs": self._backfill_ms,
            "pdsEnv": self._pds_env,
        }
        if self._pds_count > 1 or any(self._public_ports):
            config["pdses"] = [self._pds_spec(i, data_dir, config) for i in range(self._pds_count)]
        env = dict(os.environ)
        env.pop("NODE_OPTIONS", None)
        # PDS/PLC (pino) logs are off unless SKYFILL_PDS_LOG=true; then they go to pds.log,
        # whose tail stderr_tail() and start errors include. stdout carries only the ready line.
        env["LOG_ENABLED"] = env.get("SKYFILL_PDS_LOG", "false")
        env.pop("LOG_DESTINATION", None)
        if env["LOG_ENABLED"].lower() in ("1", "t", "true"):
            env["LOG_DESTINATION"] = str(self._tmp / "pds.log")
        started = time.monotonic()
        with (self._tmp / "launcher.stderr").open("wb") as err:
            self._proc = subprocess.Popen(
                [str(target.node), str(target.launcher), json.dumps(config)],
                cwd=target.root,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,  # its own process group: stop() signals the whole group
            )
        try:
            self._info = self._read_ready()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started
        return self

    def _pds_spec(self, index: int, data_dir: Path, first: Mapping[str, object]) -> dict[str, object]:
        """The first PDS keeps the single-PDS config (data dir, secrets, port); the others get their own."""
        public = self._public_ports[index]
        if index == 0:
            spec = {"port": public or first["pdsPort"], "dataDir": first["dataDir"],
                    "jwtSecret": first["jwtSecret"], "plcRotationKeyHex": first["plcRotationKeyHex"]}
        else:
            own = data_dir.parent / f"data-{index}"
            own.mkdir()
            spec = {"port": public or free_port(), "dataDir": str(own), "jwtSecret": secrets.token_hex(16),
                    "plcRotationKeyHex": secrets.token_hex(32)}
        if public:
            spec["listenPort"] = 0
        return spec

    def _read_ready(self) -> dict[str, object]:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + self._startup_timeout
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NetworkStartError(f"launcher not ready after {self._startup_timeout}s\n{self.stderr_tail()}")
                if not sel.select(timeout=min(left, 0.5)):
                    continue
                chunk = os.read(self._proc.stdout.fileno(), 65536)
                if not chunk:
                    code = self._proc.wait(timeout=5)
                    raise NetworkStartError(f"launcher exited with {code} before ready\n{self.stderr_tail()}")
                buf += chunk
        info = json.loads(buf.split(b"\n", 1)[0])
        if not isinstance(info, dict) or info.get("ready") is not True:
            raise NetworkStartError(f"unexpected launcher output {buf!r}\n{self.stderr_tail()}")
        return info

    def stop(self) -> None:
        """Stop the launcher (graceful first), always signal its process group, drop its data."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
            # The group id stays reserved until the leader is reaped, so signalling before
            # wait() cannot hit an unrelated process.
            self._signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> LocalNetwork:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- what tests use -------------------------------------------------------------------

    def _get(self, key: str) -> str:
        if not self._info:
            raise RuntimeError("LocalNetwork is not started")
        return str(self._info[key])

    @property
    def pdses(self) -> list[LocalPds]:
        """Every PDS of the network, the first one first."""
        if not self._info:
            raise RuntimeError("LocalNetwork is not started")
        described = self._info.get("pdses") or [self._info]
        assert isinstance(described, list)
        return [LocalPds(index=i, url=str(d["pds_url"]), public_url=str(d["pds_public_url"]),
                         did=str(d["pds_did"]), admin_password=self.admin_password)
                for i, d in enumerate(described)]

    @property
    def pds_url(self) -> str:
        """http://127.0.0.1:PORT: where to send XRPC calls."""
        return self._get("pds_url")

    @property
    def pds_ws_url(self) -> str:
        return self.pds_url.replace("http://", "ws://", 1)

    @property
    def pds_public_url(self) -> str:
        """http://localhost:PORT: the endpoint the PDS writes into DID documents."""
        return self._get("pds_public_url")

    @property
    def pds_did(self) -> str:
        return self._get("pds_did")

    @property
    def plc_url(self) -> str:
        return self._get("plc_url")

    @property
    def admin_password(self) -> str:
        return self._get("admin_password")

    @property
    def pid(self) -> int:
        return int(self._get("pid"))

    def client(self, *, timeout: float = 30.0) -> PdsClient:
        return PdsClient(self.pds_url, admin_password=self.admin_password, timeout=timeout)

    def stderr_tail(self, limit: int = 8000) -> str:
        if self._tmp is None:
            return ""
        parts = []
        for name in ("launcher.stderr", "pds.log"):
            path = self._tmp / name
            if path.exists():
                parts.append(f"--- {name} ---\n{path.read_text(errors='replace')[-limit:]}")
        return "\n".join(parts)
