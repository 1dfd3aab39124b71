-- Views over the versioned tables: what users query. Created after any migration (storage/migrate.py).

-- One row per live record: base rows not overridden by the log and not purged, plus the newest
-- log row of each key when it is not a deletion and no later purge of its DID removed it.
-- Base rows of DIDs absent from the logs (nearly all of them) pass an anti-join on `did` alone;
-- only the few DIDs with log rows are matched key by key. A correlated NOT EXISTS on the three key
-- columns cost 36 s at 10M records with EMPTY logs (DuckDB de-duplicated the outer keys), an
-- anti-join on the three columns 1.6 s, this 0.3 s.
--
-- "Newest" is by (rev, v), not v alone (storage/records.py): on a lake two writers of one DID can
-- commit in the other order than they took v, and the newest repo rev must win. A version without a
-- rev (legacy, or a producer that did not say) takes the rev of the version before it (`_r`), so on
-- a store written one transaction at a time with revs that only grow, this is exactly v order.
-- The base row of a key wins over its log rows only when its rev is strictly newer than every
-- one's (`_m`; a log row without rev counts as newest): part 2 anti-joins the plain log (a
-- point read pushes its did filter there; behind the windows it did not: 3.5x slower), with
-- plain comparisons (a NOT/coalesce(...) made DuckDB give up the hash join: 30 s at 1M records).
CREATE OR REPLACE VIEW records AS
SELECT b.did, b.collection, b.rkey, cid_text(b.cid) AS cid, b.rev, b.record, created_at_from(b.created_us, b.created_raw, b.event_at) AS created_at, b.indexed_at, b.event_at
FROM record_base b
WHERE b.did NOT IN (SELECT did FROM record_log UNION ALL SELECT did FROM record_purges)
UNION ALL
SELECT b.did, b.collection, b.rkey, cid_text(b.cid) AS cid, b.rev, b.record, created_at_from(b.created_us, b.created_raw, b.event_at) AS created_at, b.indexed_at, b.event_at
FROM (SELECT * FROM record_base WHERE did IN (SELECT did FROM record_log)) b
ANTI JOIN record_log l ON l.did = b.did AND l.collection = b.collection AND l.rkey = b.rkey
    AND coalesce(l.rev, chr(1114111)) >= coalesce(b.rev, '')
ANTI JOIN record_purges p ON p.did = b.did
UNION ALL
SELECT n.did, n.collection, n.rkey, cid_text(n.cid) AS cid, n.rev, n.record, n.created_at, n.indexed_at, n.event_at
FROM (
    SELECT * FROM (
        SELECT *, coalesce(rev, max(rev) OVER (PARTITION BY did, collection, rkey ORDER BY v
                                               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)) AS _r,
               max(coalesce(rev, chr(1114111))) OVER (PARTITION BY did, collection, rkey) AS _m
        FROM record_log
    ) QUALIFY row_number() OVER (PARTITION BY did, collection, rkey ORDER BY _r DESC NULLS LAST, v DESC) = 1
) n
ANTI JOIN record_purges p ON p.did = n.did AND p.v > n.v
ANTI JOIN (SELECT did, collection, rkey, rev FROM record_base
           WHERE did IN (SELECT did FROM record_log) AND did NOT IN (SELECT did FROM record_purges)) b
    ON b.did = n.did AND b.collection = n.collection AND b.rkey = n.rkey AND b.rev > n._m
WHERE n.cid IS NOT NULL;

-- skyfill's typed views: one row per live record of the collections people query most, with the
-- record's fields as columns. Plain views over `records`: no extra storage, no write cost; each
-- parses a record's JSON once (json_transform into a struct `r`, then its fields). Fields are read
-- as (r).x: a bare r.x would name a table x of a catalog r when the database file is r.duckdb.
--   uri           at://<did>/<collection>/<rkey> of the record itself
--   created_at    the record's claimed createdAt (records.created_at: NULL when not a valid datetime)
--   event_at      when the network saw it (records.event_at)
-- Fields a record lacks, or holds with another JSON type than the lexicon's, are NULL (json_transform
-- is lenient: a number where a string belongs comes through as its text).

CREATE OR REPLACE VIEW posts AS
SELECT did, rkey, 'at://' || did || '/app.bsky.feed.post/' || rkey AS uri, cid,
       (r).text AS text,
       (r).langs AS langs,
       (r).reply.parent.uri AS reply_parent_uri,
       (r).reply.root.uri AS reply_root_uri,
       -- app.bsky.embed.record: embed.record is the strongRef; app.bsky.embed.recordWithMedia:
       -- embed.record is an app.bsky.embed.record whose .record is the strongRef
       coalesce((r).embed.record.uri, (r).embed.record.record.uri) AS quote_uri,
       (r).embed."$type" AS embed_type,
       created_at, event_at
FROM (
    SELECT did, rkey, cid, created_at, event_at,
           json_transform(record, '{"text": "VARCHAR", "langs": ["VARCHAR"],
               "reply": {"parent": {"uri": "VARCHAR"}, "root": {"uri": "VARCHAR"}},
               "embed": {"$type": "VARCHAR", "record": {"uri": "VARCHAR", "record": {"uri": "VARCHAR"}}}}') AS r
    FROM records WHERE collection = 'app.bsky.feed.post'
);

CREATE OR REPLACE VIEW likes AS
SELECT did, rkey, 'at://' || did || '/app.bsky.feed.like/' || rkey AS uri,
       (r).subject.uri AS subject_uri, (r).subject.cid AS subject_cid,
       nullif(split_part((r).subject.uri, '/', 3), '') AS subject_did,
       created_at, event_at
FROM (
    SELECT did, rkey, created_at, event_at,
           json_transform(record, '{"subject": {"uri": "VARCHAR", "cid": "VARCHAR"}}') AS r
    FROM records WHERE collection = 'app.bsky.feed.like'
);

CREATE OR REPLACE VIEW reposts AS
SELECT did, rkey, 'at://' || did || '/app.bsky.feed.repost/' || rkey AS uri,
       (r).subject.uri AS subject_uri, (r).subject.cid AS subject_cid,
       nullif(split_part((r).subject.uri, '/', 3), '') AS subject_did,
       created_at, event_at
FROM (
    SELECT did, rkey, created_at, event_at,
           json_transform(record, '{"subject": {"uri": "VARCHAR", "cid": "VARCHAR"}}') AS r
    FROM records WHERE collection = 'app.bsky.feed.repost'
);

CREATE OR REPLACE VIEW follows AS
SELECT did, rkey, 'at://' || did || '/app.bsky.graph.follow/' || rkey AS uri,
       json_extract_string(record, '$.subject') AS subject_did,
       created_at, event_at
FROM records WHERE collection = 'app.bsky.graph.follow';

CREATE OR REPLACE VIEW blocks AS
SELECT did, rkey, 'at://' || did || '/app.bsky.graph.block/' || rkey AS uri,
       json_extract_string(record, '$.subject') AS subject_did,
       created_at, event_at
FROM records WHERE collection = 'app.bsky.graph.block';

-- One row per account: the profile record's key is always 'self'.
CREATE OR REPLACE VIEW profiles AS
SELECT did, cid,
       (r).displayName AS display_name,
       (r).description AS description,
       -- a blob's CID is ref.$link; legacy blobs (before the blob type) carried it as `cid`
       coalesce((r).avatar.ref."$link", (r).avatar.cid) AS avatar_cid,
       coalesce((r).banner.ref."$link", (r).banner.cid) AS banner_cid,
       (r).pinnedPost.uri AS pinned_post_uri,
       created_at, event_at
FROM (
    SELECT did, cid, created_at, event_at,
           json_transform(record, '{"displayName": "VARCHAR", "description": "VARCHAR",
               "avatar": {"ref": {"$link": "VARCHAR"}, "cid": "VARCHAR"},
               "banner": {"ref": {"$link": "VARCHAR"}, "cid": "VARCHAR"},
               "pinnedPost": {"uri": "VARCHAR"}}') AS r
    FROM records WHERE collection = 'app.bsky.actor.profile' AND rkey = 'self'
);

CREATE OR REPLACE VIEW lists AS
SELECT did, rkey, 'at://' || did || '/app.bsky.graph.list/' || rkey AS uri,
       (r).name AS name, (r).purpose AS purpose, (r).description AS description,
       created_at, event_at
FROM (
    SELECT did, rkey, created_at, event_at,
           json_transform(record, '{"name": "VARCHAR", "purpose": "VARCHAR", "description": "VARCHAR"}') AS r
    FROM records WHERE collection = 'app.bsky.graph.list'
);

CREATE OR REPLACE VIEW list_items AS
SELECT did, rkey, 'at://' || did || '/app.bsky.graph.listitem/' || rkey AS uri,
       (r).list AS list_uri, (r).subject AS subject_did,
       created_at, event_at
FROM (
    SELECT did, rkey, created_at, event_at,
           json_transform(record, '{"list": "VARCHAR", "subject": "VARCHAR"}') AS r
    FROM records WHERE collection = 'app.bsky.graph.listitem'
);
