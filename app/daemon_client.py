"""Finding and calling a running daemon's admin API.

DuckDB lets one process write a file. While `skyfill consume` holds the database, ad-hoc
commands (`status`, `gaps`, `backfill`) go through the daemon's loopback admin API; otherwise
they open the file themselves. The daemon announces itself in `<db>.daemon.json`:

    {"pid": 4242, "start_time": 123456, "url": "http://127.0.0.1:40123", "token": "..."}

A file left by a daemon killed with SIGKILL stays behind, and its pid can name another live
process by the time anyone reads it (pid 1 in a container is the common case), so a pid alone
is no proof: `find_daemon` also compares the process start time (`/proc/<pid>/stat` field 22,
where there is a /proc) and checks that something accepts connections at the url. A command
that then opens the database itself holds it, which proves the announcement stale: it removes
the file with `remove_announcement`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import socket
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import urlsplit

import httpx
import orjson

from skyfill.errors import DaemonError
from skyfill.storage.lake import is_lake, parse_lake

__all__ = [
    "Announcement",
    "announce_path",
    "pid_alive",
    "process_start_time",
    "find_daemon",
    "read_announcement",
    "call_daemon",
    "write_announcement",
    "remove_announcement",
]

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_PROBE_TIMEOUT = 2.0


class Announcement(TypedDict):
    pid: int
    start_time: int | None   # clock ticks after boot (/proc/<pid>/stat field 22); None without /proc
    url: str                 # http://127.0.0.1:PORT
    token: str               # bearer token of the admin API


def announce_path(db: str | Path) -> Path:
    if is_lake(str(db)):  # a lake is no file: the announcement goes in its data path (else here)
        target = parse_lake(str(db))
        name = hashlib.sha256(target.catalog.encode()).hexdigest()[:16]
        return Path(target.data_path or ".") / f"skyfill-{name}.daemon.json"
    return Path(str(db) + ".daemon.json")


def process_start_time(pid: int) -> int | None:
    """When `pid` started, in clock ticks after boot, or None (no such process, or no /proc).

    Two processes that share a pid one after the other never share a start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # Field 2 (comm) is in parentheses and may itself hold spaces or ')': split after the last one.
    rest = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(rest[19])  # field 22; `rest` starts at field 3
    except (IndexError, ValueError):
        return None


def write_announcement(db: str | Path, *, url: str, token: str) -> None:
    """Atomically publish the daemon's url and token, readable by its owner only.

    The temporary file gets a random name and is created with O_EXCL | O_NOFOLLOW at mode 0600,
    so a symlink or file planted beside the database can neither redirect the token nor read it
    before the rename."""
    path = announce_path(db)
    pid = os.getpid()
    data = orjson.dumps({"pid": pid, "start_time": process_start_time(pid), "url": url, "token": token})
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(path.parent)
    except OSError as exc:
        raise DaemonError(f"cannot write the daemon announcement {path}: {exc.strerror or exc}") from exc


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_announcement(db: str | Path) -> None:
    try:
        announce_path(db).unlink()
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as exc:
        raise DaemonError(f"cannot remove the daemon announcement {announce_path(db)}: {exc.strerror or exc}") from exc


def pid_alive(pid: int) -> bool:
    """True while a process with this pid exists (it may not be the one that wrote the pid)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_announcement(db: str | Path) -> Announcement | None:
    """The announcement next to `db` if there is a well-formed one, else None.

    A file that is not one (not JSON, wrong types, a url off loopback) cannot come from a
    skyfill daemon, which replaces it atomically: it is treated like no file at all."""
    path = announce_path(db)
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as exc:
        raise DaemonError(f"cannot read the daemon announcement {path}: {exc.strerror or exc}") from exc
    try:
        info = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return _typed(info)


def _typed(info: Any) -> Announcement | None:
    if not isinstance(info, dict):
        return None
    pid, start, url, token = info.get("pid"), info.get("start_time"), info.get("url"), info.get("token")
    if type(pid) is not int or not (start is None or type(start) is int):
        return None
    if not isinstance(url, str) or not isinstance(token, str) or not token or not token.isascii():
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme != "http" or parts.hostname not in _LOOPBACK or port is None:
        return None
    return Announcement(pid=pid, start_time=start, url=url, token=token)


def find_daemon(db: str | Path) -> Announcement | None:
    """The announcement of a live daemon holding `db`, or None when there is none or it is stale:
    its process is gone, its pid now names a process started at another time, or nothing
    listens at its url any more."""
    info = read_announcement(db)
    if info is None or not pid_alive(info["pid"]):
        return None
    if info["start_time"] is not None:
        now = process_start_time(info["pid"])
        if now is not None and now != info["start_time"]:
            return None
    return info if _listening(info["url"]) else None


def _listening(url: str) -> bool:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None  # checked by _typed
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=_PROBE_TIMEOUT):
            return True
    except ConnectionRefusedError:
        return False
    except OSError:
        return True  # busy or slow is not gone: let the request itself report it


def call_daemon(info: Announcement, path: str, body: dict[str, Any] | None = None, *, timeout: float = 3600) -> Any:
    """POST (or GET when body is None) to the daemon's admin API and return its JSON answer."""
    headers = {"Authorization": f"Bearer {info['token']}"}
    url = info["url"].rstrip("/") + path
    try:
        with httpx.Client(timeout=timeout, trust_env=False) as client:
            if body is None:
                resp = client.get(url, headers=headers)
            else:
                resp = client.post(url, headers=headers, content=orjson.dumps(body))
    except httpx.HTTPError as exc:
        raise DaemonError(f"the daemon at {info['url']} did not answer: {exc}") from exc
    try:
        data = orjson.loads(resp.content)
    except orjson.JSONDecodeError as exc:
        raise DaemonError(f"the daemon answered {resp.status_code} with non-JSON") from exc
    if resp.status_code != 200:
        detail = data.get("error") if isinstance(data, dict) else data
        raise DaemonError(f"the daemon refused {path} ({resp.status_code}): {detail}")
    return data
