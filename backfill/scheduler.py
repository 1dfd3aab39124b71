"""The host-fair scheduler now lives in skyfill.net.scheduler (the Kafka worker uses it too); kept here
for the backfill's callers."""

from skyfill.net.scheduler import TOP_HOSTS, HostCounts, HostScheduler

__all__ = ["HostScheduler", "HostCounts", "TOP_HOSTS"]
