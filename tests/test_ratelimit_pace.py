"""The limiter's pace against fixed-window limits (found by bench/network: 7 of 150 getRepo over a
host's 10-per-second window when the client sent a burst of 10 and then 10/s)."""

from __future__ import annotations

import itertools
import time

import pytest
from skyfill.net.ratelimit import PACE_MARGIN, HostLimiter, parse_policy


@pytest.mark.parametrize(
    ("value", "rate"),
    [("10;w=1", 10.0), ("3000;w=300", 10.0), (" 3000 ; w=300 ", 10.0), ("100;w=60, 10;w=1", 100 / 60),
     ("5;w=0.5;comment", 10.0), ("0;w=1", None), ("10;w=0", None), ("10", None), ("w=1", None),
     ("1e3;w=1", None), ("-5;w=1", None), ("", None)],
)
def test_policy_parse(value: str, rate: float | None) -> None:
    assert parse_policy(value) == (pytest.approx(rate) if rate is not None else None)


async def _times(limiter: HostLimiter, host: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        async with limiter.slot(host):
            out.append(time.monotonic())
    return out


def _most_in_window(times: list[float], window: float) -> int:
    return max(sum(1 for t in times if s <= t < s + window) for s in times)


async def test_no_burst_a_fresh_host_gets_one_request_then_the_rate() -> None:
    times = await _times(HostLimiter(per_host_rps=20.0), "h", 5)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.045, gaps   # 1/20 s apart from the second request on, no burst of 20


async def test_a_published_policy_paces_below_its_limit() -> None:
    limiter = HostLimiter(per_host_rps=10.0)
    async with limiter.slot("h"):
        pass
    limiter.observe("h", 200, {"RateLimit-Limit": "10", "RateLimit-Remaining": "9",
                               "RateLimit-Policy": "10;w=1"})
    times = await _times(limiter, "h", 13)
    # any fixed 1-s window (wherever it starts) holds at most 10, with room for jitter
    assert _most_in_window(times, 1.0) <= 10
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.98 / (PACE_MARGIN * 10.0), gaps
    # another host is not slowed by it, and a policy looser than per_host_rps does not speed up
    limiter.observe("g", 200, {"RateLimit-Policy": "3000;w=10"})
    g = await _times(limiter, "g", 3)
    assert min(b - a for a, b in itertools.pairwise(g)) >= 0.095


async def test_a_malformed_policy_is_ignored() -> None:
    limiter = HostLimiter(per_host_rps=20.0)
    limiter.observe("h", 200, {"RateLimit-Policy": "lots;w=soon"})
    times = await _times(limiter, "h", 3)
    assert max(b - a for a, b in itertools.pairwise(times)) < 0.2
