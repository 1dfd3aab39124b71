"""backfill: fetch whole repos (getRepo), verify them, and reconcile them into storage."""

from skyfill.net.guard import check_host
from skyfill.net.http import SafeHttp
from skyfill.net.identity import ResolvedIdentity, Resolver
from skyfill.net.pds import ListedRepo, PdsClient
from skyfill.net.ratelimit import HostLimiter
from skyfill.protocol.repo import RepoSnapshot, materialize, parse_repo
from .backfiller import Backfiller, open_backfiller, recover_queue
from .config import BackfillConfig
from .gaps import Auditor, GapReport, PdsAuditor, Reason, detect_gaps
from .progress import BackfillSummary
from .reconcile import Reconciler, StoreReconciler

__all__ = [
    "RepoSnapshot",
    "parse_repo",
    "materialize",
    "check_host",
    "SafeHttp",
    "HostLimiter",
    "PdsClient",
    "ListedRepo",
    "Resolver",
    "ResolvedIdentity",
    "Backfiller",
    "BackfillSummary",
    "Reconciler",
    "StoreReconciler",
    "open_backfiller",
    "recover_queue",
    "BackfillConfig",
    "detect_gaps",
    "GapReport",
    "Reason",
    "Auditor",
    "PdsAuditor",
]
