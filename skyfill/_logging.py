"""Structured logging: `key=value` context on every line, or JSON lines for machines.

Every line is one record of the root handler set by `configure_logging` (the `skyfill` group
calls it once, from `--log-level` / `--log-json`): on a terminal `HH:MM:SS LEVEL logger: msg
k=v ...`, elsewhere (a pipe, journald, a file) one JSON object per line with ts, level, logger,
msg and the record's `ctx` keys (did, host, ...). Python warnings go through it too.

The libraries that log one line per request or connection at info (httpx's `HTTP Request: GET
...`, httpcore, websockets, aiokafka) are demoted: their info lines become debug lines, shown
only with `--log-level debug`. A full-network backfill makes tens of millions of requests; at
info each repo gets at most its outcome line, and runs log periodic progress summaries.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Final

import orjson

__all__ = ["configure_logging", "CHATTY_LOGGERS"]

# loggers whose info lines are per-request chatter: logged at debug instead
CHATTY_LOGGERS: Final = ("httpx", "httpcore", "websockets", "aiokafka", "kafka", "asyncio")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "ctx", {}) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        ctx = getattr(record, "ctx", None)
        if ctx:
            base += " " + " ".join(f"{k}={v}" for k, v in ctx.items())
        return base


def _chatty(name: str) -> bool:
    return any(name == c or name.startswith(c + ".") for c in CHATTY_LOGGERS)


class _Demote(logging.Filter):
    """A chatty library's info (and lower) records become debug records, dropped unless the
    threshold is debug. The handler's own level check runs before filters, so this one applies
    the threshold itself."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold = threshold

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and _chatty(record.name):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return record.levelno >= self.threshold


def configure_logging(*, level: str = "INFO", json_lines: bool = False) -> None:
    """The root handler on stderr: JSON lines when `json_lines` or stderr is not a terminal."""
    threshold = logging.getLevelName(level.upper())
    if not isinstance(threshold, int):
        raise ValueError(f"not a log level: {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    if json_lines or not sys.stderr.isatty():
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(_Demote(threshold))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(threshold)
    logging.captureWarnings(True)
