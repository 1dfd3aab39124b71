"""Verified ingest (`consume --verify`): the firehose read ahead, each #commit/#sync with its verdict.

A reader task parses frames into a bounded window (VERIFY_WINDOW frames) and asks the verifier
for the key of every #commit/#sync DID it has not seen, so keys are resolved concurrently,
thousands of frames ahead of their use. `verified_frames` takes what the window holds (up to
VERIFY_CHUNK frames), waits for the keys the chunk lacks, has the chunk checked in the
verifier's worker process (or thread) while the reader keeps parsing, then yields each frame
with its verdict strictly in stream order; the caller applies or rejects each before asking for
the next. Nothing is applied before its verdict, and the cursor only ever names applied or
rejected events. On reconnect the stream resumes after the last frame READ (read-ahead frames
are still yielded); when the caller stops early (an error frame makes it reconnect), the window
is dropped and the stream resumes after the last frame it applied.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable

from skyfill.errors import FrameError, IdentityError
from skyfill.protocol.crypto import PublicKey
from skyfill.protocol.events import Commit, Sync
from skyfill.protocol.frames import parse_frame

from .connection import stream_frames
from .verify import CheckResult, CommitVerifier, check_frame

__all__ = ["VERIFY_CHUNK", "VERIFY_DEPTH", "VERIFY_WINDOW", "Verified", "verified_frames"]

VERIFY_WINDOW = 2048
VERIFY_CHUNK = 256
VERIFY_DEPTH = 2      # chunks being checked at once

_Item = tuple[Commit | Sync | None, bytes]
# A chunk item's key, or why it has none (IdentityError), or None: a frame not checked.
_Key = PublicKey | IdentityError | None
_Chunk = tuple[list[_Item], list[_Key], asyncio.Future[list[CheckResult]]]
# What verified_frames yields: a frame, its parsed #commit/#sync (None: not checked), its verdict.
Verified = tuple[Commit | Sync | None, bytes, CheckResult]


async def verified_frames(
    relay: str, verifier: CommitVerifier, *, last_seq: Callable[[], int | None], stop: asyncio.Event,
    want: Callable[[str], bool] | None = None,
) -> AsyncIterator[Verified]:
    """Yield (event, frame, verdict) in stream order. `event` is None for a frame that is not
    checked (anything but a parsed #commit or #sync: the caller handles the raw frame; its
    verdict is None). Otherwise the verdict is None (valid), or (kind, reason) with kind one of
    check_frame's, or unresolvable_did / identity_unavailable when the DID has no key.
    `last_seq()`: the last seq the caller applied, where a fresh connection resumes."""
    window: asyncio.Queue[_Item] = asyncio.Queue(VERIFY_WINDOW)
    read_seq: int | None = None

    def resume_at() -> int | None:
        return read_seq if read_seq is not None else last_seq()

    frames = stream_frames(relay, resume_at, stop=stop)

    async def read() -> None:
        nonlocal read_seq
        async for data in frames:
            try:
                event = parse_frame(data, want=want)
            except FrameError as exc:
                seq: int | None = exc.seq
                event = None
            else:
                seq = getattr(event, "seq", None)
                if type(event) is Commit or type(event) is Sync:
                    verifier.want(event.did)
                else:
                    event = None  # the caller parses it again: small frames, rare
            await window.put((event, data))  # type: ignore[arg-type]
            if seq is not None and (read_seq is None or seq > read_seq) and seq < 2**63:
                read_seq = seq  # never backwards; never past what a cursor can say

    reader = asyncio.create_task(read())
    # Chunks whose checks were submitted, oldest first: the next chunk is checked while the
    # caller applies the previous one, so the worker never waits for the applier.
    checking: deque[_Chunk] = deque()
    try:
        while True:
            if checking and (len(checking) >= VERIFY_DEPTH or window.empty()):
                items, keys, pending = checking.popleft()
                verdicts = iter(await pending)
                for (event, data), key in zip(items, keys, strict=True):
                    if event is None:
                        yield None, data, None
                    elif isinstance(key, IdentityError):
                        yield event, data, ("unresolvable_did" if key.terminal else "identity_unavailable", str(key))
                    else:
                        verdict = next(verdicts)
                        if verdict is not None and verdict[0] == "bad_signature":
                            verdict = await _recheck(verifier, event, data, key, verdict)
                        yield event, data, verdict
                continue
            getter = asyncio.ensure_future(window.get())
            await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                reader.result()  # the stream ended (stop) or failed: re-raise
                return
            items = [getter.result()]
            while len(items) < VERIFY_CHUNK and not window.empty():
                items.append(window.get_nowait())
            checking.append(await _submit_chunk(verifier, items))
    finally:
        for _items, _keys, pending in checking:
            pending.cancel()
        reader.cancel()
        try:
            await reader
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - already raised above if it mattered
            pass
        await frames.aclose()


async def _submit_chunk(verifier: CommitVerifier, items: list[_Item]) -> _Chunk:
    """Wait for the keys `items` need (most were resolved while they sat in the window),
    then start checking them; returns the items, their keys and the pending verdicts."""
    keys: list[_Key] = []
    jobs: list[tuple[bytes, PublicKey]] = []
    for event, data in items:
        if event is None:
            keys.append(None)
            continue
        key: PublicKey | IdentityError | None = verifier.cached(event.did)
        if key is None:
            try:
                key = await verifier.key(event.did)
            except IdentityError as exc:
                key = exc
        keys.append(key)
        if not isinstance(key, IdentityError):
            jobs.append((data, key))
    return items, keys, asyncio.ensure_future(verifier.check_many(jobs))


async def _recheck(
    verifier: CommitVerifier, event: Commit | Sync, data: bytes, used: PublicKey, verdict: tuple[str, str]
) -> CheckResult:
    """A signature failure: the key may have rotated. Check again under the key known now
    if an earlier event of the chunk already refreshed it, else refresh the document once."""
    key = verifier.cached(event.did)
    if key is None or key == used:
        try:
            key = await verifier.refresh(event.did)
        except IdentityError:
            return verdict
        if key == used:
            return verdict
    return check_frame(data, key)
