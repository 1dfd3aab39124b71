"""The full-network time, as a formula whose client-side constants are measured here.

    backfill = max(host-bound, client-bound)
      host-bound   = max over hosts (repos on the host / the pace on that host)
      client-bound = (repos x a + records x b) / W_eff
    total    = backfill + discovery + identities
      discovery  = max(listRepos pages per host / pace, repos / listings per s)
      identities = PLC operations / identities per s

`a` (s per repo) and `b` (s per record) come from two calibration backfills against an
unlimited simulated host (one of the simulated size mix, one of repos of the network's mean
size), so the formula's client term is measured, not assumed. The store has ONE writer (a
DuckDB file): its per-repo transaction does not divide over N fetch workers, so W_eff = 1 for
the single-process pipeline measured here (see `Projection.bound`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FULL_NETWORK", "Calibration", "Network", "Projection", "predict_backfill", "project", "project_kafka"]


@dataclass(frozen=True, slots=True)
class Calibration:
    s_per_repo: float       # a
    s_per_record: float     # b
    listings_per_s: float
    identities_per_s: float

    @classmethod
    def fit(cls, small: tuple[float, float], large: tuple[float, float], *, listings_per_s: float,
            identities_per_s: float) -> Calibration:
        """From two (mean records per repo, seconds per repo) points: cost(n) = a + b n."""
        (n1, c1), (n2, c2) = small, large
        b = max(0.0, (c2 - c1) / (n2 - n1)) if n2 != n1 else 0.0
        a = max(0.0, c1 - b * n1)
        return cls(a, b, listings_per_s, identities_per_s)

    def client_seconds(self, repos: float, records: float) -> float:
        return repos * self.s_per_repo + records * self.s_per_record


@dataclass(frozen=True, slots=True)
class Network:
    repos: float
    records: float
    hosts: int                  # hosts holding the repos (evenly)
    pace: float                 # getRepo/s the client sends each host
    plc_operations: float
    page: int = 1000            # listRepos page size


# Published figures (../shared/ATPROTO-NOTES.md, issue 12): ~40M repos, 15B records (rsky-wintermute
# README), on Bluesky's ~100 PDS hosts at 10 getRepo/s each (indigo PR #1111); the client paces at
# 95% of a published limit (net/ratelimit.py PACE_MARGIN). PLC: one operation per DID is assumed
# (the export has more: rotations, handle changes; a lower bound).
FULL_NETWORK = Network(repos=40e6, records=15e9, hosts=100, pace=9.5, plc_operations=40e6)


@dataclass(frozen=True, slots=True)
class Projection:
    host_bound_s: float
    client_bound_s: float
    discovery_s: float
    identities_s: float
    workers: int
    sink_bound_s: float = 0.0   # Kafka mode: the sink writing the mirror (0: single process)

    @property
    def backfill_s(self) -> float:
        return max(self.host_bound_s, self.client_bound_s, self.sink_bound_s)

    @property
    def total_s(self) -> float:
        return self.backfill_s + self.discovery_s + self.identities_s

    @property
    def bound(self) -> str:
        if self.host_bound_s >= max(self.client_bound_s, self.sink_bound_s):
            return "hosts (their published getRepo limits)"
        if self.sink_bound_s >= self.client_bound_s:
            return "sink: one `skyfill sink` writing every record into the mirror"
        if self.sink_bound_s:
            return f"workers: each worker's per-repo cost (working store + publishing), over {self.workers} workers"
        return "client: the store's per-repo write (one DuckDB writer; more fetch workers do not divide it)"


def predict_backfill(cal: Calibration, *, repos: int, records: int, host_bound_s: float) -> float:
    """The formula's backfill time for a simulated network (the checks against measured runs)."""
    return max(host_bound_s, cal.client_seconds(repos, records))


def project(cal: Calibration, net: Network = FULL_NETWORK, *, workers: int = 1,
            store_writers: int = 1) -> Projection:
    """The full network's time with `workers` fetch workers feeding `store_writers` writers."""
    per_host = net.repos / net.hosts
    host_bound = per_host / net.pace
    client = cal.client_seconds(net.repos, net.records) / max(1, min(workers, store_writers))
    pages = per_host / net.page
    discovery = max(pages / net.pace, net.repos / cal.listings_per_s)
    identities = net.plc_operations / cal.identities_per_s
    return Projection(host_bound, client, discovery, identities, workers)


def project_kafka(cal: Calibration, *, worker_s_per_repo: float, sink_records_per_s: float, workers: int,
                  net: Network = FULL_NETWORK) -> Projection:
    """N Kafka workers (each its own working store: their per-repo cost divides over N) and one
    sink (records / its records/s). Discovery and identities as in `project`."""
    base = project(cal, net)
    client = net.repos * worker_s_per_repo / max(1, workers)
    sink = net.records / sink_records_per_s if sink_records_per_s > 0 else float("inf")
    return Projection(base.host_bound_s, client, base.discovery_s, base.identities_s, workers, sink)
