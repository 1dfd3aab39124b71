"""What the chaos trials share: the real `skyfill consume` as a subprocess, a load generator on the
local reference PDS, a firehose head watcher, a TCP proxy that can freeze, and the oracle's
verdict as counts.

Everything here drives real parts: the reference PDS (tests/support/network), the skyfill CLI in its own
process group (so a kill takes every child with it), real DuckDB files read back by the oracle
(tests/support/oracle.py). The only stand-in is `FreezableProxy`, for a relay that hangs: a real relay
cannot be frozen on demand while the PDS behind it keeps accepting writes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import libipld
from websockets.sync.client import connect

from skyfill.app.daemon_client import call_daemon, find_daemon
from tests.support.network import (
    Create,
    Delete,
    LocalNetwork,
    PdsAccount,
    PdsClient,
    RecordRef,
    Update,
    Write,
    like_record,
    post_record,
)
from tests.support.oracle import mirror_diff, repo_truth

__all__ = [
    "ROOT",
    "ChaosError",
    "DaemonExited",
    "DaemonProcess",
    "FreezableProxy",
    "HeadWatcher",
    "Load",
    "LogSummary",
    "Verdict",
    "poll",
    "read_log",
    "skyfill_env",
    "verdict",
]

ROOT = Path(__file__).resolve().parents[2]
POST = "app.bsky.feed.post"
LIKE = "app.bsky.feed.like"
PROFILE = "app.bsky.actor.profile"


class ChaosError(RuntimeError):
    """A trial could not reach the condition it waited for (the message says which)."""


class DaemonExited(ChaosError):
    def __init__(self, code: int | None, where: str) -> None:
        super().__init__(f"the daemon exited with {code} while {where}")
        self.code = code


def poll(condition: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.05) -> float:
    """Seconds until `condition()` held; ChaosError naming `what` at the deadline."""
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            raise ChaosError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - t0


def skyfill_env(net: LocalNetwork) -> dict[str, str]:
    """The environment of every skyfill subprocess: this checkout's code, the local PLC."""
    path = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(path),
        "SKYFILL_PLC_URL": net.plc_url,
        "SKYFILL_ALLOW_PRIVATE_HOSTS": "1",  # the PDS's DID documents say http://localhost:PORT
        "SKYFILL_LOG_JSON": "1",
    }


# -- the daemon ------------------------------------------------------------------------------


class DaemonProcess:
    """`skyfill consume` as a real subprocess in its own process group, logging to `log`."""

    def __init__(self, db: Path, relay: str, env: dict[str, str], log: Path, extra: Sequence[str] = ()) -> None:
        self.db = db
        self.relay = relay
        self.env = env
        self.log = log
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] | None = None
        self.starts = 0
        self.exit_codes: list[int] = []

    def start(self, *, cursor: int | None = None, timeout: float = 60) -> float:
        """Launch and wait for the admin API announcement; returns the seconds that took."""
        if self.alive():
            raise ChaosError("daemon already running")
        args = [sys.executable, "-m", "skyfill", "consume", "--db", str(self.db), "--relay", self.relay,
                *self.extra]
        if cursor is not None:
            args += ["--cursor", str(cursor)]
        with self.log.open("ab") as out:
            out.write(f"\n=== chaos: start #{self.starts + 1}: {' '.join(args[3:])}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(args, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=out, start_new_session=True)
        self.starts += 1
        self.info = None
        proc = self.proc

        def announced() -> bool:
            if proc.poll() is not None:
                raise DaemonExited(proc.returncode, "starting")
            info = find_daemon(self.db)
            if info is not None and info.get("pid") == proc.pid:
                self.info = info
                return True
            return False

        return poll(announced, timeout=timeout, what="the daemon's admin API announcement")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stored_seq(self) -> int | None:
        """The durable cursor as the daemon reports it (GET /status); None if it does not answer."""
        if self.info is None or not self.alive():
            return None
        try:
            cursors = call_daemon(self.info, "/status", timeout=5)["cursors"]
        except Exception:  # a daemon that does not answer is a figure here, not an error
            return None
        return int(cursors[0]["seq"]) if cursors else 0

    def wait_seq(self, seq: int, *, timeout: float, where: str) -> float:
        """Seconds until the stored cursor reaches `seq`; DaemonExited if the daemon dies."""

        def reached() -> bool:
            if not self.alive():
                raise DaemonExited(self.returncode, where)
            got = self.stored_seq()
            return got is not None and got >= seq

        return poll(reached, timeout=timeout, what=f"the stored cursor to reach {seq} ({where})", interval=0.1)

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)  # the leader is not reaped yet: the group id is still ours
        except ProcessLookupError:
            pass

    def reap(self) -> int | None:
        """Collect a daemon that exited by itself; its exit code."""
        if self.proc is None or self.proc.poll() is None:
            return None
        code = self.proc.returncode
        self.exit_codes.append(code)
        self.proc = None
        return code

    def kill9(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGKILL)
        self.exit_codes.append(self.proc.wait(15))
        self.proc = None

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM and wait; SIGKILL (reported as None) if it does not exit in time."""
        if self.proc is None:
            return None
        proc = self.proc
        if proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                proc.wait(15)
                self.exit_codes.append(proc.returncode)
                self.proc = None
                return None
        self.exit_codes.append(proc.returncode)
        self.proc = None
        return proc.returncode


@dataclass
class LogSummary:
    errors: list[str] = field(default_factory=list)  # msg of each structured error/critical line
    tracebacks: int = 0                              # bare (non-JSON) "Traceback" lines
    last: str = ""                                   # the last non-empty line
    messages: Counter[str] = field(default_factory=Counter)  # msg of every structured line

    def count(self, msg: str) -> int:
        return self.messages[msg]


def read_log(path: Path, *, offset: int = 0) -> LogSummary:
    out = LogSummary()
    if not path.exists():
        return out
    with path.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        out.last = line
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            out.messages[str(entry.get("msg"))] += 1
            if str(entry.get("level", "")).lower() in ("error", "critical"):
                extra = entry.get("ctx") or entry.get("exc") or ""
                out.errors.append(f"{entry.get('msg')}{f' {extra}' if extra else ''}"[:300])
        elif line.startswith("Traceback"):
            out.tracebacks += 1
    return out


# -- the PDS's firehose head -----------------------------------------------------------------


class HeadWatcher:
    """Follows the PDS's subscribeRepos from `since`: the current head seq and the seq of every
    commit (did, rev), so a trial knows exactly which seq the daemon must store to have caught up."""

    def __init__(self, client: PdsClient, since: int) -> None:
        self._url = client.subscribe_url
        self._lock = threading.Lock()
        self._head = since
        self._revs: dict[tuple[str, str], int] = {}
        self._stop = threading.Event()
        self.reconnects = 0
        self._thread = threading.Thread(target=self._run, name="chaos-head", daemon=True)

    def __enter__(self) -> HeadWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def head(self) -> int:
        with self._lock:
            return self._head

    def seq_of(self, did: str, rev: str, *, timeout: float = 120) -> int:
        found: list[int] = []

        def seen() -> bool:
            with self._lock:
                seq = self._revs.get((did, rev))
            if seq is not None:
                found.append(seq)
            return bool(found)

        poll(seen, timeout=timeout, what=f"commit {rev} of {did} on the PDS firehose")
        return found[0]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with connect(self._url(cursor=self.head()), max_size=None, open_timeout=10) as ws:
                    while not self._stop.is_set():
                        try:
                            message = ws.recv(timeout=0.5)
                        except TimeoutError:
                            continue
                        if not isinstance(message, bytes):
                            continue
                        header, body = libipld.decode_dag_cbor_multi(message)
                        seq = body.get("seq") if isinstance(body, dict) else None
                        if header.get("op") != 1 or not isinstance(seq, int):
                            continue
                        with self._lock:
                            self._head = max(self._head, seq)
                            if header.get("t") == "#commit":
                                self._revs[(body["repo"], body["rev"])] = seq
            except Exception:  # the PDS frozen or restarting: reconnect from the last seq seen
                self.reconnects += 1
                self._stop.wait(0.5)


# -- load --------------------------------------------------------------------------------------


class Load:
    """One thread writing to the PDS as fast as it answers: creates, updates and deletes of posts,
    likes, profile updates, applyWrites of 50-200 ops, deactivate + reactivate. Errors (e.g. a
    frozen PDS timing out) are counted, and the account's model is re-read from getRepo."""

    def __init__(
        self,
        net: LocalNetwork,
        accounts: Sequence[PdsAccount],
        rng: random.Random,
        *,
        big_share: float = 0.06,
        lifecycle_share: float = 0.03,
        pause: float = 0.0,
    ) -> None:
        self.client = net.client(timeout=120)
        self.accounts = list(accounts)
        self.rng = rng
        self.big_share = big_share
        self.lifecycle_share = lifecycle_share
        self.pause = pause
        self.posts: dict[str, dict[str, RecordRef | None]] = {a.did: {} for a in accounts}
        self.counts: Counter[str] = Counter()
        self.errors: list[str] = []
        self._inactive: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-load", daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.client.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(180)
        for acct in self.accounts:  # never leave an account deactivated: the oracle could not read it
            if acct.did in self._inactive:
                try:
                    self.client.activate(acct)
                    self._inactive.discard(acct.did)
                except Exception as exc:
                    self.errors.append(f"reactivate {acct.did}: {exc}")

    @property
    def writes(self) -> int:
        """Commits made (an applyWrites of 200 ops is one; failed calls are not counted)."""
        return sum(n for k, n in self.counts.items() if k not in ("applyWrites_ops", "error"))

    def _run(self) -> None:
        while not self._stop.is_set():
            acct = self.rng.choice(self.accounts)
            try:
                self.step(acct)
            except Exception as exc:
                self.counts["error"] += 1
                self.errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                self._resync(acct)
            if self.pause:
                self._stop.wait(self.pause)

    def _resync(self, acct: PdsAccount) -> None:
        try:
            if acct.did in self._inactive:
                self.client.activate(acct)
                self._inactive.discard(acct.did)
            truth = repo_truth(acct.did, self.client.get_repo(acct.did))
            self.posts[acct.did] = {rkey: None for (coll, rkey) in truth.records if coll == POST}
        except Exception as exc:
            self.errors.append(f"resync {acct.did}: {type(exc).__name__}")

    def step(self, acct: PdsAccount) -> None:
        c, rng, mine = self.client, self.rng, self.posts[acct.did]
        r = rng.random()
        if r < self.big_share:
            self.big_commit(acct)
        elif r < self.big_share + self.lifecycle_share:
            self._inactive.add(acct.did)
            c.deactivate(acct)
            self.counts["deactivate"] += 1
            c.activate(acct)
            self._inactive.discard(acct.did)
            self.counts["reactivate"] += 1
        elif r < 0.45 or not mine:
            ref = c.create_record(acct, POST, post_record(f"chaos {rng.getrandbits(32):08x}"))
            mine[ref.rkey] = ref
            self.counts["create"] += 1
        elif r < 0.55:
            subject = self._any_post()
            if subject is not None:
                c.create_record(acct, LIKE, like_record(subject))
                self.counts["like"] += 1
        elif r < 0.65:
            c.put_record(acct, PROFILE, "self", {"$type": PROFILE, "displayName": f"chaos {rng.random():.6f}"})
            self.counts["update"] += 1
        elif r < 0.78:
            rkey = rng.choice(list(mine))
            mine[rkey] = c.put_record(acct, POST, rkey, post_record(f"edited {rng.getrandbits(32):08x}"))
            self.counts["update"] += 1
        else:
            rkey = rng.choice(list(mine))
            c.delete_record(acct, POST, rkey)
            del mine[rkey]
            self.counts["delete"] += 1

    def big_commit(self, acct: PdsAccount) -> None:
        """One applyWrites of 50-200 ops: a quarter updates and a quarter deletes at most."""
        mine = self.posts[acct.did]
        n = self.rng.randint(50, 200)
        keys = list(mine)
        self.rng.shuffle(keys)
        n_upd = min(len(keys) // 2, n // 4)
        n_del = min(len(keys) - n_upd, n // 4)
        upd, dele = keys[:n_upd], keys[n_upd:n_upd + n_del]
        writes: list[Write] = [Update(POST, k, post_record(f"bulk edit {i}")) for i, k in enumerate(upd)]
        writes += [Delete(POST, k) for k in dele]
        writes += [Create(POST, post_record(f"bulk {i}")) for i in range(n - len(writes))]
        _, results = self.client.apply_writes(acct, writes)
        for k in dele:
            del mine[k]
        for res in results:
            uri = res.get("uri")
            if isinstance(uri, str) and uri.split("/")[3] == POST:
                mine.setdefault(uri.split("/")[4], None)
        self.counts["applyWrites"] += 1
        self.counts["applyWrites_ops"] += n

    def _any_post(self) -> RecordRef | None:
        refs = [r for posts in self.posts.values() for r in posts.values() if r is not None]
        return self.rng.choice(refs) if refs else None


# -- a relay that hangs --------------------------------------------------------------------------


class FreezableProxy:
    """A TCP forwarder 127.0.0.1:port -> 127.0.0.1:target. `freeze()` stops moving bytes in both
    directions while every connection (and new ones) stays open: a relay that hangs without
    closing. A stand-in: a real relay cannot be frozen on demand while its PDS keeps writing."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.connections = 0

    def __enter__(self) -> FreezableProxy:
        threading.Thread(target=self._accept, name="chaos-proxy", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()
        self._flowing.set()
        self._listener.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.close()
                except OSError:
                    pass

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                down, _ = self._listener.accept()
                up = socket.create_connection(("127.0.0.1", self.target), timeout=10)
                up.settimeout(None)
            except OSError:
                continue
            with self._lock:
                self._socks += [down, up]
            self.connections += 1
            for src, dst in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self._flowing.wait()
                if self._closed.is_set():
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# -- the oracle's verdict --------------------------------------------------------------------


@dataclass
class Verdict:
    """tests/support/oracle.py's diff of the mirror against getRepo, counted by kind."""

    repos: int = 0
    records: int = 0
    lost: int = 0
    extra: int = 0
    stale: int = 0
    wrong_rev: int = 0
    unchecked: int = 0  # repos the PDS did not serve (left deactivated by a failed write)
    lines: list[str] = field(default_factory=list)
    diverged: set[str] = field(default_factory=set)

    @property
    def clean(self) -> bool:
        return not self.lines


def verdict(db: Path, client: PdsClient, dids: Iterable[str]) -> Verdict:
    """Open the (stopped) daemon's database read-only and compare it with every DID's getRepo."""
    wanted = list(dict.fromkeys(dids))
    out = Verdict(repos=len(wanted))
    con = duckdb.connect(str(db), read_only=True)
    try:
        out.lines = mirror_diff(con, client, wanted)
        out.records = int(con.execute("SELECT count(*) FROM records").fetchall()[0][0])
    finally:
        con.close()
    for did in wanted:
        try:
            client.get_latest_commit(did)
        except Exception:
            out.unchecked += 1
    for line in out.lines:
        out.diverged.add(line.split(": ", 1)[0])  # "did:plc:...: missing ..."
        if ": missing " in line or ": no repos row" in line:
            out.lost += 1
        elif ": extra " in line or "deleted at the PDS" in line:
            out.extra += 1
        elif ": stale " in line:
            out.stale += 1
        elif ": rev stored " in line:
            out.wrong_rev += 1
        else:
            out.lost += 1  # an unknown kind of difference must not pass unnoticed
    return out
