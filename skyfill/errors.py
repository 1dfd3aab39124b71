"""The one exception tree of skyfill.

    SkyfillError
    ├── ConfigError                  bad option or environment value
    ├── InputError                   bad bytes from the network; carries `kind` (a metric label)
    │   ├── FrameError               a firehose frame that cannot be decoded       (seq)
    │   ├── SyntaxError_             an invalid DID / NSID / record key / TID
    │   └── RepoError                a CAR / MST / commit that cannot be trusted   (did)
    │       └── SignatureError       the commit signature does not verify          (did)
    ├── FirehoseError                the relay stream cannot go on from here
    │   ├── FutureCursorError        FutureCursor and --strict-cursor forbids skipping ahead
    │   └── FrameTooLargeError       a message over the hard cap at the resume cursor
    ├── IdentityError                a DID that cannot be resolved to a PDS + key  (did)
    ├── FetchError                   a PDS request that failed                      (did, host)
    │   ├── RetryableFetchError      5xx, network error, truncated CAR: try again later
    │   ├── RateLimited              429: park the host until `retry_at`; never a DID failure
    │   ├── TerminalFetchError       RepoNotFound / RepoTakendown / ... : stop retrying (`outcome`)
    │   └── UnsafeHostError          loopback/private/link-local/multicast target refused
    ├── StorageError                 DuckDB failure (wrapped at the boundary)
    │   └── DatabaseLocked           another process holds the DuckDB file
    ├── DaemonError                  talking to a running daemon's admin API failed
    ├── PublishError                 a Kafka part cannot go on: a message refused for good (not
    │                                an outage), a group/topic not joinable, used before start()
    └── BackfillRetry                a requested backfill ended 'retrying'/'deferred': re-queue it

Lower-level exceptions (websockets, httpx, duckdb, libipld's ValueError) are translated at
the boundary with ``raise Specific(...) from exc``; callers never see them.
"""

from __future__ import annotations

__all__ = [
    "SkyfillError",
    "ConfigError",
    "InputError",
    "FrameError",
    "SyntaxError_",
    "RepoError",
    "SignatureError",
    "FirehoseError",
    "FutureCursorError",
    "FrameTooLargeError",
    "IdentityError",
    "FetchError",
    "RetryableFetchError",
    "RateLimited",
    "TerminalFetchError",
    "UnsafeHostError",
    "StorageError",
    "DatabaseLocked",
    "DaemonError",
    "PublishError",
    "BackfillRetry",
]


class SkyfillError(Exception):
    """Base of every error skyfill raises on purpose."""


class ConfigError(SkyfillError):
    pass


class InputError(SkyfillError):
    """Bad input from outside. ``kind`` is a short stable label used in metrics and logs."""

    kind: str = "input"

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class FrameError(InputError):
    kind = "frame"

    def __init__(self, message: str, *, kind: str | None = None, seq: int | None = None) -> None:
        super().__init__(message, kind=kind)
        self.seq = seq


class SyntaxError_(InputError):  # noqa: N801 - avoid shadowing the builtin SyntaxError
    kind = "syntax"


class RepoError(InputError):
    kind = "repo"

    def __init__(self, message: str, *, kind: str | None = None, did: str | None = None) -> None:
        super().__init__(message, kind=kind)
        self.did = did


class SignatureError(RepoError):
    kind = "signature"


class FirehoseError(SkyfillError):
    """The firehose cannot be consumed further without losing events: the daemon stops."""


class FutureCursorError(FirehoseError):
    """The relay says our cursor is in the future and --strict-cursor forbids skipping ahead."""


class FrameTooLargeError(FirehoseError):
    """The relay sends a message larger than the hard cap at the resume cursor: no way past it."""


class IdentityError(SkyfillError):
    def __init__(self, message: str, *, did: str | None = None, terminal: bool = False) -> None:
        super().__init__(message)
        self.did = did
        self.terminal = terminal


class FetchError(SkyfillError):
    def __init__(self, message: str, *, did: str | None = None, host: str | None = None) -> None:
        super().__init__(message)
        self.did = did
        self.host = host


class RetryableFetchError(FetchError):
    pass


class RateLimited(FetchError):
    def __init__(
        self, message: str, *, retry_at: float, did: str | None = None, host: str | None = None
    ) -> None:
        super().__init__(message, did=did, host=host)
        self.retry_at = retry_at  # epoch seconds


class TerminalFetchError(FetchError):
    def __init__(
        self, message: str, *, outcome: str, did: str | None = None, host: str | None = None
    ) -> None:
        super().__init__(message, did=did, host=host)
        self.outcome = outcome  # stored as-is on the repo row, e.g. "RepoTakendown"


class UnsafeHostError(FetchError):
    pass


class StorageError(SkyfillError):
    pass


class DatabaseLocked(StorageError):
    pass


class DaemonError(SkyfillError):
    pass


class PublishError(SkyfillError):
    """A non-retriable Kafka error (message too large, authorization, a component used before
    start()). Outages are retried, never raised."""


class BackfillRetry(SkyfillError):
    """The backfill of a requested DID ended 'retrying' or 'deferred': the request goes back on the topic."""
