-- skyfill's DuckDB schema. States are plain strings stored as-is (see storage/states.py).

-- `repos` (one row per account) is storage/repos.py's: repo_base, repo_log and the view.

-- Records: an append-only log of versions folded by compaction into a deduplicated base
-- (storage/records.py). Nothing here has a primary key or is ever UPDATEd: DuckDB re-writes a
-- whole indexed table at the COMMIT of an upsert, so those costs grew with the mirror. Users
-- query the `records` view (storage/views.sql): one row per live record.
CREATE SEQUENCE IF NOT EXISTS write_version;   -- one value per reduced batch written (`v`)

CREATE TABLE IF NOT EXISTS record_log (
    v           BIGINT NOT NULL,
    did         VARCHAR NOT NULL,
    collection  VARCHAR NOT NULL,
    rkey        VARCHAR NOT NULL,
    cid         BLOB,                 -- cid_bin(CID text), storage/cids.py; NULL: the key was deleted at v
    rev         VARCHAR,
    record      JSON USING COMPRESSION zstd,
    created_at  TIMESTAMPTZ,
    indexed_at  TIMESTAMPTZ NOT NULL,
    event_at    TIMESTAMPTZ
);

-- Account deletions: every record of `did` written before version v is gone.
CREATE TABLE IF NOT EXISTS record_purges (
    v    BIGINT NOT NULL,
    did  VARCHAR NOT NULL
);

-- One row per live record as of the last compaction, sorted by (did, collection, rkey) when
-- written, so a DID's rows sit in few row groups and `WHERE did = ?` is served by zone maps.
CREATE TABLE IF NOT EXISTS record_base (
    did         VARCHAR NOT NULL,
    collection  VARCHAR NOT NULL,
    rkey        VARCHAR NOT NULL,
    cid         BLOB NOT NULL,        -- cid_bin(CID text): a dag-cbor CID's 32-byte sha256 digest, else the text
    rev         VARCHAR,
    record      JSON USING COMPRESSION zstd,
    -- what the record claims (`createdAt`), as written: stored as microseconds after event_at
    -- (created_off; ~4 B a record fewer than the timestamp), the view adds them back (created_at_from)
    created_us  BIGINT,
    created_raw TIMESTAMPTZ,          -- only a created_at created_off cannot express (infinite, extreme years)
    indexed_at  TIMESTAMPTZ NOT NULL, -- when this mirror stored this version
    event_at    TIMESTAMPTZ           -- when the network saw it: firehose `time`, else TID time of rkey, else of rev
);
-- The DIDs records reference, by hour of event_at: ref_log / ref_base (storage/refs.py).

-- Key/value facts about the file itself (schema_version).
CREATE TABLE IF NOT EXISTS meta (
    key    VARCHAR PRIMARY KEY,
    value  VARCHAR NOT NULL
);

-- record_base keeps created_at as microseconds after event_at (event_at NULL or infinite: after the
-- epoch): created_off(created_at, event_at) writes them, created_raw keeps what they cannot express
-- (an infinite or far-out timestamp, bounded so the difference cannot overflow), created_at_from
-- gives created_at back exactly: created_at_from(created_off(c, e), created_raw(c, e), e) = c.
CREATE OR REPLACE MACRO created_off(c, e) AS CASE
    WHEN epoch_us(c) BETWEEN -4611686018427387904 AND 4611686018427387903
     AND coalesce(epoch_us(e), 0) BETWEEN -4611686018427387904 AND 4611686018427387903
    THEN epoch_us(c) - coalesce(epoch_us(e), 0)
END;
CREATE OR REPLACE MACRO created_raw(c, e) AS CASE WHEN created_off(c, e) IS NULL THEN c END;
CREATE OR REPLACE MACRO created_at_from(us, raw, e) AS
    coalesce(make_timestamptz(us + coalesce(epoch_us(e), 0)), raw);

-- The microseconds of a TID (13 base32-sortable chars) as a timestamp; NULL when `t` is not a TID.
CREATE OR REPLACE MACRO tid_time(t) AS CASE
    WHEN regexp_full_match(t, '[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}') THEN
        make_timestamptz(list_reduce(
            list_transform(range(1, 14), lambda i: (instr('234567abcdefghijklmnopqrstuvwxyz', t[i]) - 1)::BIGINT),
            lambda acc, x: acc * 32 + x) >> 10)
END;

-- The DIDs a record references: the subject of a follow (a DID) or of a like/repost (an at://
-- URI), a post's reply parent and root and its quoted record. NULL for other collections.
CREATE OR REPLACE MACRO record_refs(collection, record) AS CASE
    WHEN collection IN ('app.bsky.feed.like', 'app.bsky.feed.repost', 'app.bsky.feed.post', 'app.bsky.graph.follow') THEN
        list_distinct(list_filter(
            list_transform(
                json_extract_string(record, ['$.subject', '$.subject.uri', '$.reply.parent.uri', '$.reply.root.uri',
                                             '$.embed.record.uri', '$.embed.record.record.uri']),
                lambda ref: CASE WHEN starts_with(ref, 'did:') THEN ref
                                 WHEN starts_with(ref, 'at://did:') THEN split_part(ref, '/', 3) END),
            lambda d: d IS NOT NULL AND length(d) <= 2048
                      AND regexp_full_match(d, '^did:[a-z]+:[a-zA-Z0-9._:%-]*[a-zA-Z0-9._-]$')))
END;

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

-- The backfill queue (`backfill_queue`, a view over queue_base + queue_log) is storage/queue_log.py's.

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

-- The whole network (issue 12; storage/discovery.py, storage/plc.py). Append-only like the logs above:
-- the listings and the PLC export grow to tens of millions of rows, so no primary key, no upsert.

-- Every repo a host listed (listRepos) or a collection directory named (listReposByCollection:
-- head/rev NULL), one row per listing; the `listed` view keeps each DID's newest listing.
CREATE SEQUENCE IF NOT EXISTS listing_seq;
CREATE TABLE IF NOT EXISTS listed_repos (
    n          BIGINT NOT NULL,       -- listing_seq: the newest listing of a DID has the highest n
    did        VARCHAR NOT NULL,
    host       VARCHAR NOT NULL,      -- the host (URL) that listed it
    endpoint   VARCHAR NOT NULL,      -- listRepos | listReposByCollection:<nsid>
    head       VARCHAR,
    rev        VARCHAR,
    active     BOOLEAN,
    status     VARCHAR,
    listed_at  TIMESTAMPTZ NOT NULL
);

-- Where each enumeration stands: one row per (host, endpoint), small (one per PDS host), written in
-- the same transaction as the rows of the page it points past. cursor NULL + done: listed to the end.
CREATE TABLE IF NOT EXISTS enum_cursors (
    host        VARCHAR NOT NULL,
    endpoint    VARCHAR NOT NULL,     -- listHosts | listRepos | listReposByCollection:<nsid> | plc_export
    cursor      VARCHAR,
    done        BOOLEAN NOT NULL DEFAULT FALSE,
    pages       BIGINT NOT NULL DEFAULT 0,
    items       BIGINT NOT NULL DEFAULT 0,
    skipped     BIGINT NOT NULL DEFAULT 0,
    error       VARCHAR,              -- the last failure of this enumeration (it stopped there)
    updated_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (host, endpoint)
);

-- The PLC directory's export, newest operation per DID (storage/plc.py): plc_log is appended page by
-- page; `fold` rewrites plc_base (one row per DID, sorted by did: a point read touches one row group).
CREATE TABLE IF NOT EXISTS plc_log (
    did          VARCHAR NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,  -- the operation's createdAt: the newest wins
    pds          VARCHAR,               -- NULL: tombstone, or an operation a resolve would refuse
    signing_key  VARCHAR,
    handle       VARCHAR,
    tombstone    BOOLEAN NOT NULL DEFAULT FALSE,
    error        VARCHAR
);
CREATE TABLE IF NOT EXISTS plc_base (
    did          VARCHAR NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    pds          VARCHAR,
    signing_key  VARCHAR,
    handle       VARCHAR,
    tombstone    BOOLEAN NOT NULL DEFAULT FALSE,
    error        VARCHAR
);

-- The collections filter each backfill used, per DID (NULL filter: every collection), newest row wins.
CREATE TABLE IF NOT EXISTS backfill_filters (
    did          VARCHAR NOT NULL,
    filter       VARCHAR NOT NULL,      -- canonical: sorted patterns joined by ","; "*" = every collection
    recorded_at  TIMESTAMPTZ NOT NULL
);
