"""The WebSocket side of the firehose: URLs, connecting, reconnecting. It only moves bytes.

`stream_frames` yields raw binary messages; parsing happens elsewhere (frames.py), state
elsewhere again (tracker.py). Reconnects use exponential backoff with full jitter, reset once a
connection has delivered a message.

A message over the socket limit (max_size, 16 MB) makes websockets close the connection with
1009. Reconnecting at the same cursor with the same limit would meet the same message forever,
so the next connection, and only it, accepts messages up to a hard cap (oversize_cap, 64 MB):
the frame then arrives whole and the parser rejects it as `oversize` with its seq, so the
caller counts it and its cursor moves past it. A message over the hard cap cannot be read, so
its seq cannot be known: it is counted (`oversize`), logged, and FrameTooLargeError ends the
stream rather than reconnecting forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit, urlunsplit

import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from skyfill import metrics
from skyfill.backoff import backoff_delay
from skyfill.errors import ConfigError, FrameTooLargeError

__all__ = ["subscribe_url", "source_name", "stream_frames", "Backoff", "MAX_FRAME_BYTES", "OVERSIZE_CAP_BYTES"]

log = logging.getLogger(__name__)

NSID_PATH = "/xrpc/com.atproto.sync.subscribeRepos"
# The protocol caps frames at 5 MB. The socket accepts up to 16 MB so that a frame over the
# protocol limit still arrives whole and is rejected (and counted, with its seq) by the parser;
# only a message over 16 MB makes websockets drop the connection.
MAX_FRAME_BYTES = 16 * 1024 * 1024
# The one-shot limit of the connection that follows a 1009 close (see the module docstring).
OVERSIZE_CAP_BYTES = 64 * 1024 * 1024


def subscribe_url(relay: str, cursor: int | None) -> str:
    """`bsky.network`, `wss://bsky.network`, `ws://127.0.0.1:2583` or a full subscribeRepos URL."""
    text = relay.strip()
    if "://" not in text:
        text = "wss://" + text
    parts = urlsplit(text)
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise ConfigError(f"--relay must be a host or a ws://, wss:// URL, not {relay!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("com.atproto.sync.subscribeRepos"):
        path = path + NSID_PATH
    query = urlencode({"cursor": cursor}) if cursor is not None else ""
    return urlunsplit((scheme, parts.netloc, path, query, ""))


def source_name(relay: str) -> str:
    """The key cursors are stored under: seqs are per host, so the host (and port) name the source."""
    parts = urlsplit(subscribe_url(relay, None))
    return parts.netloc.lower()


@dataclass(slots=True)
class Backoff:
    base: float = 1.0
    cap: float = 60.0
    attempt: int = 0

    def next_delay(self) -> float:
        delay = backoff_delay(self.attempt, base=self.base, cap=self.cap, jitter=1.0)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


async def stream_frames(
    relay: str,
    cursor: Callable[[], int | None],
    *,
    stop: asyncio.Event,
    backoff: Backoff | None = None,
    open_timeout: float = 10.0,
    max_size: int = MAX_FRAME_BYTES,
    oversize_cap: int = OVERSIZE_CAP_BYTES,
) -> AsyncIterator[bytes]:
    """Yield binary messages forever, reconnecting from `cursor()` after each drop, until `stop`.

    `cursor` is asked at every (re)connect, so the caller decides where to resume (the last
    event it processed). Text messages are ignored. Raises FrameTooLargeError when a message
    exceeds `oversize_cap` (after one retry with that limit, see the module docstring).
    """
    backoff = backoff or Backoff()
    limit = max_size
    while not stop.is_set():
        at = cursor()
        url = subscribe_url(relay, at)
        try:
            async with websockets.connect(
                url, max_size=limit, open_timeout=open_timeout, ping_interval=20,
                ping_timeout=30, close_timeout=2, compression=None,
            ) as ws:
                metrics.FIREHOSE_CONNECTED.set(1)
                log.info("connected", extra={"ctx": {"url": url}})
                async for message in ws:
                    if isinstance(message, bytes):
                        backoff.reset()
                        limit = max_size  # the enlarged limit was for this connection's first message
                        yield message
                    if stop.is_set():
                        return
                reason = "closed"
        except ConnectionClosed as exc:
            # We refused a message over `limit`: websockets sent the close frame 1009 itself.
            too_big = exc.sent is not None and exc.sent.code == 1009
            reason = "too_big" if too_big else "dropped"
            log.warning("connection lost", extra={"ctx": {"url": url, "reason": str(exc)}})
            if too_big:
                if limit >= oversize_cap:
                    metrics.FIREHOSE_ERRORS.labels("oversize").inc()
                    message = (f"the relay sends a message over {oversize_cap} bytes after cursor {at}; "
                               "it cannot be read, so its seq is unknown: restart with a --cursor past it")
                    log.error("frame over the hard cap", extra={"ctx": {"url": url, "cursor": at,
                                                                         "limit": oversize_cap}})
                    raise FrameTooLargeError(message) from None
                if at is None:  # no cursor: the relay will not replay it, so count it now
                    metrics.FIREHOSE_ERRORS.labels("oversize").inc()
                    log.error("oversize frame lost: no cursor to replay it from", extra={"ctx": {"url": url}})
                else:
                    limit = oversize_cap  # one shot: fetch it whole so the parser rejects it with its seq
        except InvalidURI as exc:
            raise ConfigError(str(exc)) from exc
        except (OSError, InvalidHandshake, asyncio.TimeoutError) as exc:
            reason = "connect_failed"
            log.warning("cannot connect", extra={"ctx": {"url": url, "error": repr(exc)}})
        finally:
            metrics.FIREHOSE_CONNECTED.set(0)
        if stop.is_set():
            return
        metrics.FIREHOSE_RECONNECTS.labels(reason).inc()
        delay = backoff.next_delay()
        log.info("reconnecting", extra={"ctx": {"in_seconds": round(delay, 2), "reason": reason}})
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
        except asyncio.TimeoutError:
            pass
