-- skyfill's DuckDB schema. States are plain strings stored as-is (see storage/states.py).

-- `repos` (one row per account) is storage/repos.py's: repo_base, repo_log and the view.

-- One row per live record.
CREATE TABLE IF NOT EXISTS records (
    did         VARCHAR NOT NULL,
    collection  VARCHAR NOT NULL,
    rkey        VARCHAR NOT NULL,
    cid         VARCHAR NOT NULL,
    rev         VARCHAR,
    record      JSON,
    created_at  TIMESTAMPTZ,
    indexed_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (did, collection, rkey)
);

-- Where to resume each firehose source. Written in the same transaction as the effects.
CREATE TABLE IF NOT EXISTS cursors (
    source      VARCHAR PRIMARY KEY,
    seq         BIGINT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);

-- One row per consumer run: the span of the firehose it covered. Gaps between spans are downtime.
CREATE SEQUENCE IF NOT EXISTS coverage_id;
CREATE TABLE IF NOT EXISTS coverage (
    id              BIGINT PRIMARY KEY DEFAULT nextval('coverage_id'),
    source          VARCHAR NOT NULL,
    first_seq       BIGINT,
    last_seq        BIGINT,
    first_event_at  TIMESTAMPTZ,
    last_event_at   TIMESTAMPTZ,
    started_at      TIMESTAMPTZ NOT NULL,
    stopped_at      TIMESTAMPTZ,
    ended           VARCHAR NOT NULL DEFAULT 'running'    -- CoverageEnd
);

-- DIDs waiting for a backfill, with the reasons the gap detector found. Idempotent by DID.
CREATE TABLE IF NOT EXISTS backfill_queue (
    did          VARCHAR PRIMARY KEY,
    reasons      VARCHAR[] NOT NULL,
    enqueued_at  TIMESTAMPTZ NOT NULL,
    state        VARCHAR NOT NULL DEFAULT 'pending',      -- QueueState
    retry_after  TIMESTAMPTZ,
    error        VARCHAR,
    updated_at   TIMESTAMPTZ NOT NULL
);

-- Resolved DID documents (PDS endpoint, signing key), cached with a TTL.
CREATE TABLE IF NOT EXISTS identities (
    did          VARCHAR PRIMARY KEY,
    pds          VARCHAR,
    signing_key  VARCHAR,          -- multibase public key from the #atproto verification method
    handle       VARCHAR,
    doc          JSON,
    resolved_at  TIMESTAMPTZ NOT NULL,
    error        VARCHAR
);
