"""skyfill: a complete, correct, up-to-date copy of AT Protocol data in DuckDB.

The supported Python surface is `__all__` below (see docs/api.md):

- the daemon: `Daemon` + `ConsumeConfig` over a `Store`, or the whole `skyfill consume` wiring as
  `Application` (`Settings`, `serve`);
- backfills: `BackfillConfig` + `open_backfiller` -> `Backfiller.run` / `run_queue` -> `BackfillSummary`;
  `backfill_config` builds a BackfillConfig from a flat mapping of options (as the CLI does);
- gap detection: `detect_gaps` -> `GapReport` (DIDs by `Reason`);
- firehose events: `parse_frame` -> `Commit`, `Sync`, `Identity`, `Account`, `Info`, `StreamError` (`Op`, `Event`);
- `lambda_handler`; and the exception tree, rooted at `SkyfillError`.

Everything else (the subpackages skyfill.protocol, .net, .storage, .consumer, .backfill, .publish,
.app, .cli) may change between versions. Submodules never import from this module, only from the
module that defines a name.
"""

from skyfill.app.application import Application, serve
from skyfill.app.handler import lambda_handler
from skyfill.app.settings import Settings
from skyfill.backfill import Backfiller, BackfillSummary, GapReport, Reason, detect_gaps, open_backfiller
from skyfill.backfill.config import BackfillConfig, backfill_config
from skyfill.consumer.daemon import ConsumeConfig, Daemon
from skyfill.errors import (
    BackfillRetry,
    ConfigError,
    DaemonError,
    DatabaseLocked,
    FetchError,
    FirehoseError,
    FrameError,
    FrameTooLargeError,
    FutureCursorError,
    IdentityError,
    InputError,
    PublishError,
    RateLimited,
    RepoError,
    RetryableFetchError,
    SignatureError,
    SkyfillError,
    StorageError,
    SyntaxError_,
    TerminalFetchError,
    UnsafeHostError,
)
from skyfill.protocol.events import Account, Commit, Event, Identity, Info, Op, StreamError, Sync
from skyfill.protocol.frames import parse_frame
from skyfill.storage import Store

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # the daemon
    "Daemon",
    "ConsumeConfig",
    "Application",
    "Settings",
    "serve",
    # backfills and gaps
    "Backfiller",
    "BackfillConfig",
    "backfill_config",
    "open_backfiller",
    "BackfillSummary",
    "detect_gaps",
    "GapReport",
    "Reason",
    # storage
    "Store",
    # firehose events
    "parse_frame",
    "Event",
    "Commit",
    "Op",
    "Sync",
    "Identity",
    "Account",
    "Info",
    "StreamError",
    # the handler
    "lambda_handler",
    # errors
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
