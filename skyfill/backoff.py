"""The one jittered exponential backoff of skyfill.

Every retry loop (relay reconnects, PDS fetches, the backfill queue's retry_after, the Kafka
publisher) asks this module how long to wait; each keeps its own base, cap and jitter.
"""

from __future__ import annotations

import random

__all__ = ["backoff_delay"]

# 2**64 times any sane base is past every cap; bounding the exponent keeps the float finite
# for callers that count attempts without limit (a relay down for days).
_MAX_EXPONENT = 64


def backoff_delay(step: int, *, base: float, cap: float, jitter: float = 0.5) -> float:
    """Seconds to wait before retry number `step` (0 = first retry).

    The full delay is ``min(cap, base * 2**step)``; the result is drawn uniformly from
    ``[full * (1 - jitter), full]``: ``jitter=1.0`` is "full jitter", 0.5 keeps 50-100 %.
    """
    full = min(cap, base * 2.0 ** min(max(step, 0), _MAX_EXPONENT))
    return full * random.uniform(1.0 - jitter, 1.0)
