"""Named states, stored in DuckDB as their plain string values."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["SyncState", "AccountStatus", "BackfillStatus", "QueueState", "CoverageEnd", "TERMINAL_BACKFILL"]


class SyncState(StrEnum):
    UNKNOWN = "unknown"              # nothing has proven the chain yet
    SYNCHRONIZED = "synchronized"    # a full repo was reconciled, and every commit since chained onto it
    DESYNCHRONIZED = "desynchronized"  # the chain broke; needs a backfill (reason in desync_reason)


class AccountStatus(StrEnum):
    ACTIVE = "active"
    TAKENDOWN = "takendown"
    SUSPENDED = "suspended"
    DELETED = "deleted"
    DEACTIVATED = "deactivated"
    DESYNCHRONIZED = "desynchronized"
    THROTTLED = "throttled"


class BackfillStatus(StrEnum):
    OK = "ok"
    RETRYING = "retrying"                  # transient failure; retry_after says when
    REPO_NOT_FOUND = "RepoNotFound"
    REPO_TAKENDOWN = "RepoTakendown"
    REPO_SUSPENDED = "RepoSuspended"
    REPO_DEACTIVATED = "RepoDeactivated"
    INVALID_DID_DOC = "InvalidDidDocument"
    SIGNATURE_FAILED = "SignatureFailed"
    UNSAFE_HOST = "UnsafeHost"
    FAILED = "Failed"                      # gave up after the maximum number of attempts


TERMINAL_BACKFILL = frozenset(
    {
        BackfillStatus.REPO_NOT_FOUND,
        BackfillStatus.REPO_TAKENDOWN,
        BackfillStatus.REPO_SUSPENDED,
        BackfillStatus.REPO_DEACTIVATED,
        BackfillStatus.INVALID_DID_DOC,
        BackfillStatus.SIGNATURE_FAILED,
        BackfillStatus.UNSAFE_HOST,
        BackfillStatus.FAILED,
    }
)


class QueueState(StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    DONE = "done"
    FAILED = "failed"


class CoverageEnd(StrEnum):
    RUNNING = "running"
    CLEAN = "clean"        # SIGINT/SIGTERM or end of stream, cursor stored
    CRASHED = "crashed"    # found still 'running' at the next start (kill -9, power loss)
    ERROR = "error"
