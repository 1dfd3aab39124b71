-- Views over the versioned tables: what users query. Created after any migration (storage/migrate.py).

-- One row per live record: base rows not overridden by the log and not purged, plus the newest
-- log row of each key when it is not a deletion and no later purge of its DID removed it.
CREATE OR REPLACE VIEW records AS
WITH newest AS (
    SELECT * FROM record_log
    QUALIFY row_number() OVER (PARTITION BY did, collection, rkey ORDER BY v DESC) = 1
)
SELECT b.did, b.collection, b.rkey, b.cid, b.rev, b.record, b.created_at, b.indexed_at, b.event_at, b.refs
FROM record_base b
WHERE NOT EXISTS (SELECT 1 FROM record_log l WHERE l.did = b.did AND l.collection = b.collection AND l.rkey = b.rkey)
  AND NOT EXISTS (SELECT 1 FROM record_purges p WHERE p.did = b.did)
UNION ALL
SELECT n.did, n.collection, n.rkey, n.cid, n.rev, n.record, n.created_at, n.indexed_at, n.event_at, n.refs
FROM newest n
WHERE n.cid IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM record_purges p WHERE p.did = n.did AND p.v > n.v);
