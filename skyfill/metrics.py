"""Every Prometheus metric of skyfill, on one registry. Named skyfill_<subsystem>_<thing>[_total].

Bumped where things happen; served at /metrics by `skyfill consume --metrics-port` (app/status_server.py,
beside the status page).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["REGISTRY", "FIREHOSE_EVENTS", "FIREHOSE_ERRORS", "FIREHOSE_UNVERIFIABLE", "FIREHOSE_VERDICTS",
           "FIREHOSE_LAST_SEQ", "FIREHOSE_LAG", "FIREHOSE_CONNECTED", "FIREHOSE_RECONNECTS",
           "DESYNCHRONIZED", "DESYNCHRONIZED_DIDS", "BATCH_WRITE_SECONDS", "BATCH_EVENTS",
           "STORE_HEALTHY", "STORAGE_ERRORS", "STORAGE_COMMITTED_SEQ", "STORE_COMPACTIONS", "STORE_COMPACTION_SECONDS",
           "STORE_RECONCILE_READS", "STORE_TXN_RETRIES",
           "BACKFILL_REPOS", "BACKFILL_RECORDS", "BACKFILL_HOSTS_PARKED", "BACKFILL_HOST_REPOS", "BACKFILL_REQUESTS",
           "KAFKA_CONNECTED", "KAFKA_PUBLISHING", "KAFKA_PUBLISH_RETRIES", "KAFKA_PUBLISHED", "KAFKA_SINK_MESSAGES",
           "KAFKA_WORKER_REQUESTS"]

REGISTRY = CollectorRegistry(auto_describe=True)

FIREHOSE_EVENTS = Counter(
    "skyfill_firehose_events_total", "Firehose frames received, by type", ["type"], registry=REGISTRY
)
FIREHOSE_ERRORS = Counter(
    "skyfill_firehose_errors_total", "Bad input skipped, by kind", ["kind"], registry=REGISTRY
)
FIREHOSE_UNVERIFIABLE = Counter(
    "skyfill_firehose_unverifiable_total",
    "Commits applied under --verify with a valid signature but no proof to check (no prevData, tooBig)",
    registry=REGISTRY,
)
FIREHOSE_VERDICTS = Counter(
    "skyfill_firehose_verdicts_total", "What the state tracker did with events", ["verdict"], registry=REGISTRY
)
FIREHOSE_LAST_SEQ = Gauge("skyfill_firehose_last_seq", "Last seq processed", registry=REGISTRY)
FIREHOSE_LAG = Gauge(
    "skyfill_firehose_lag_seconds", "Now minus the time of the last processed event", registry=REGISTRY
)
FIREHOSE_CONNECTED = Gauge("skyfill_firehose_connected", "1 while the WebSocket is open", registry=REGISTRY)
FIREHOSE_RECONNECTS = Counter(
    "skyfill_firehose_reconnects_total", "Reconnections, by reason", ["reason"], registry=REGISTRY
)
DESYNCHRONIZED = Counter(
    "skyfill_sync_desynchronized_total", "Chains found broken, by reason", ["reason"], registry=REGISTRY
)
DESYNCHRONIZED_DIDS = Gauge(
    "skyfill_sync_desynchronized_dids", "DIDs currently desynchronized", registry=REGISTRY
)
BATCH_WRITE_SECONDS = Histogram(
    "skyfill_storage_batch_write_seconds", "Time to commit one batch to DuckDB",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=REGISTRY,
)
BATCH_EVENTS = Counter(
    "skyfill_storage_batch_events_total", "Events committed to DuckDB", registry=REGISTRY
)
STORE_HEALTHY = Gauge(
    "skyfill_store_healthy", "1 while batch writes succeed; 0 from a failed write until one succeeds again",
    registry=REGISTRY,
)
STORAGE_ERRORS = Counter(
    "skyfill_storage_errors_total",
    "Failed batch writes, by kind (no_space, io, invalidated, other); each failed retry counts",
    ["kind"], registry=REGISTRY,
)
STORE_COMPACTIONS = Counter(
    "skyfill_store_compactions_total", "Compactions of the version logs into the bases, by outcome (ok|failed)",
    ["outcome"], registry=REGISTRY,
)
# the lake (storage/lake.py): a transaction that lost a conflict to another writer, run again
STORE_TXN_RETRIES = Counter(
    "skyfill_store_txn_retries_total", "Store transactions run again after a DuckLake transaction conflict",
    registry=REGISTRY,
)
STORE_RECONCILE_READS = Counter(
    "skyfill_store_reconcile_reads_total",
    "Reconciles by how they learnt the DID's stored state: read (its records and repos row, through "
    "the views) or skipped (the store holds no row of the DID: nothing to read)",
    ["outcome"], registry=REGISTRY,
)
STORE_COMPACTION_SECONDS = Histogram(
    "skyfill_store_compaction_seconds", "Seconds per compaction", registry=REGISTRY,
    buckets=(0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
STORAGE_COMMITTED_SEQ = Gauge(
    "skyfill_storage_committed_seq", "The stored cursor: last seq whose effects are durable", registry=REGISTRY
)
BACKFILL_REPOS = Counter(
    "skyfill_backfill_repos_total", "Repos backfilled, by outcome", ["outcome"], registry=REGISTRY
)
BACKFILL_RECORDS = Counter(
    "skyfill_backfill_records_total", "Records reconciled, by change", ["change"], registry=REGISTRY
)
BACKFILL_HOSTS_PARKED = Gauge(
    "skyfill_backfill_hosts_parked", "PDS hosts parked by rate limits", registry=REGISTRY
)
# per host: only the 20 hosts with most queued DIDs by name, the rest summed as host="other"
# (net/scheduler.py), so the series stay bounded with thousands of hosts
BACKFILL_HOST_REPOS = Gauge(
    "skyfill_backfill_host_repos", "DIDs of a backfill run per PDS host, by state "
    "(queued, in_flight, parked = 1 while the host is parked, done, failed)", ["host", "state"], registry=REGISTRY
)
BACKFILL_REQUESTS = Counter(
    "skyfill_backfill_requests_total", "HTTP requests to PDS/PLC hosts, by result", ["result"], registry=REGISTRY
)

KAFKA_CONNECTED = Gauge(
    "skyfill_kafka_connected", "1 while the publisher's last send was acknowledged by the broker", registry=REGISTRY
)
# skyfill_kafka_connected is 0 in a daemon that does not publish too: alerts join on this one
KAFKA_PUBLISHING = Gauge(
    "skyfill_kafka_publishing", "1 while this daemon publishes to Kafka (consume --kafka-bootstrap), from its "
    "start (also while the broker is not reachable yet) to its stop", registry=REGISTRY
)
KAFKA_PUBLISH_RETRIES = Counter(
    "skyfill_kafka_publish_retries_total", "Kafka sends retried after a broker error or timeout", registry=REGISTRY
)
KAFKA_PUBLISHED = Counter(
    "skyfill_kafka_published_total", "Messages acknowledged by the broker, by topic", ["topic"], registry=REGISTRY
)
KAFKA_SINK_MESSAGES = Counter(
    "skyfill_kafka_sink_messages_total", "Messages the sink consumed, by result", ["result"], registry=REGISTRY
)
KAFKA_WORKER_REQUESTS = Counter(
    "skyfill_kafka_worker_requests_total", "Backfill requests a worker handled, by result", ["result"],
    registry=REGISTRY,
)


BACKFILL_RATE_LIMIT_HEADERS = Counter(
    "skyfill_backfill_rate_limit_headers_total",
    "Retry-After / RateLimit-Reset values ignored as malformed or clamped to the longest park, by result",
    ["result"],
    registry=REGISTRY,
)
__all__ += ["BACKFILL_RATE_LIMIT_HEADERS"]

DISCOVERY_REPOS = Counter(
    "skyfill_discovery_repos_total",
    "Repo entries a discovery read from listRepos / listReposByCollection, by result (listed, skipped)",
    ["result"],
    registry=REGISTRY,
)
DISCOVERY_HOSTS = Counter(
    "skyfill_discovery_hosts_total", "Host enumerations a discovery ended, by result (done, failed)", ["result"],
    registry=REGISTRY,
)
PLC_EXPORT_OPERATIONS = Counter(
    "skyfill_plc_export_operations_total",
    "PLC export lines `identities sync` read, by result (stored, skipped: nullified, refused)",
    ["result"],
    registry=REGISTRY,
)
__all__ += ["DISCOVERY_REPOS", "DISCOVERY_HOSTS", "PLC_EXPORT_OPERATIONS"]
