"""The backfiller's settings: one frozen value, built once at the boundary (CLI, handler, daemon)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from skyfill.errors import ConfigError

__all__ = ["BackfillConfig", "DEFAULT_PLC_URL"]

DEFAULT_PLC_URL = "https://plc.directory"


@dataclass(frozen=True, slots=True, kw_only=True)
class BackfillConfig:
    plc_url: str = DEFAULT_PLC_URL
    concurrency: int = 32                 # repos in flight at once, across all hosts
    per_host_rps: float = 10.0            # token-bucket rate per PDS host (the client enforces it)
    per_host_concurrency: int = 4         # requests in flight per PDS host
    verify: bool = True                   # check the commit signature against the DID document key
    allow_private_hosts: bool = False     # allow loopback/private PDS endpoints (tests, local networks)
    max_car_bytes: int = 512 * 1024 * 1024
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    request_retries: int = 3              # 5xx/network retries inside one attempt (client-side)
    request_backoff: float = 1.0          # first in-attempt retry delay, seconds (doubles, jittered)
    max_attempts: int = 8                 # transient failures before the row is marked Failed
    backoff_min: timedelta = timedelta(minutes=1)
    backoff_max: timedelta = timedelta(hours=1)
    identity_ttl: timedelta = timedelta(hours=24)

    def __post_init__(self) -> None:
        if not self.plc_url.startswith(("http://", "https://")):
            raise ConfigError(f"plc_url must be an http(s) URL, got {self.plc_url!r}")
        if self.concurrency < 1:
            raise ConfigError("concurrency must be >= 1")
        if self.per_host_concurrency < 1:
            raise ConfigError("per_host_concurrency must be >= 1")
        if self.per_host_rps <= 0:
            raise ConfigError("per_host_rps must be > 0")
        if self.max_car_bytes < 1024:
            raise ConfigError("max_car_bytes must be >= 1024")
        if self.connect_timeout <= 0 or self.read_timeout <= 0:
            raise ConfigError("timeouts must be > 0")
        if self.request_retries < 0 or self.request_backoff < 0:
            raise ConfigError("request_retries and request_backoff must be >= 0")
        if self.max_attempts < 1:
            raise ConfigError("max_attempts must be >= 1")
        if self.backoff_min <= timedelta(0) or self.backoff_max < self.backoff_min:
            raise ConfigError("need 0 < backoff_min <= backoff_max")
        if self.identity_ttl < timedelta(0):
            raise ConfigError("identity_ttl must be >= 0")
