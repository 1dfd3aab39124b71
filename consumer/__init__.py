"""consumer: the firehose side of skyfill: frames -> typed events -> per-DID state -> batches."""

from skyfill.protocol.events import Account, Commit, Event, Identity, Info, Op, StreamError, Sync
from skyfill.protocol.frames import FRAME_ERROR_KINDS, MAX_FRAME_SIZE, parse_frame
from .config import ConsumeConfig
from .daemon import Daemon
from .tracker import Tracker, Verdict
from .verify import CommitVerifier

__all__ = [
    "Daemon",
    "ConsumeConfig",
    "parse_frame",
    "MAX_FRAME_SIZE",
    "FRAME_ERROR_KINDS",
    "Tracker",
    "Verdict",
    "CommitVerifier",
    "Event",
    "Commit",
    "Op",
    "Sync",
    "Identity",
    "Account",
    "Info",
    "StreamError",
]
