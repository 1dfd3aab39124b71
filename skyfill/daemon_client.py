"""Finding and calling a running daemon's admin API.

DuckDB lets one process write a file. While `skyfill consume` holds the database, ad-hoc
commands (`status`, `gaps`, `backfill`) go through the daemon's loopback admin API; otherwise
they open the file themselves. The daemon announces itself in `<db>.daemon.json`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import orjson

from .errors import DaemonError

__all__ = ["announce_path", "pid_alive", "find_daemon", "call_daemon", "write_announcement", "remove_announcement"]


def announce_path(db: str | Path) -> Path:
    return Path(str(db) + ".daemon.json")


def write_announcement(db: str | Path, *, url: str, token: str) -> None:
    path = announce_path(db)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps({"pid": os.getpid(), "url": url, "token": token}))
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def remove_announcement(db: str | Path) -> None:
    try:
        announce_path(db).unlink()
    except FileNotFoundError:
        pass


def pid_alive(pid: int) -> bool:
    """True while a process with this pid exists (a stale announcement's pid is gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_daemon(db: str | Path) -> dict[str, Any] | None:
    """The announcement of a live daemon holding `db`, or None (a stale file from a crash is ignored)."""
    path = announce_path(db)
    try:
        info = orjson.loads(path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    if not isinstance(info, dict) or not pid_alive(int(info.get("pid", -1))):
        return None
    return info


def call_daemon(info: dict[str, Any], path: str, body: dict[str, Any] | None = None, *, timeout: float = 3600) -> Any:
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
        raise DaemonError(f"the daemon refused {path}: {data.get('error') if isinstance(data, dict) else data}")
    return data
