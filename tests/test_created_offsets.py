"""record_base keeps created_at as microseconds after event_at (schema version 5, the
`created_off` macros of storage/schema.sql): every created_at comes back identical through the
`records` view, before and after compaction, after the v4 -> v5 migration and on a read-only open."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from skyfill.errors import StorageError
from skyfill.storage import Batch, RecordPut, Store
from skyfill.storage.migrate import SCHEMA_VERSION

# (rkey, created_at text, event_at text): TID and non-TID keys, event_at given, from the rkey's
# TID, or from the rev's (the non-TID keys), created_at absent, far from event_at, at the ends
# of the range, infinite, with the firehose time itself infinite
CASES = [
    ("3kaaaaaaaaaa2", "2024-05-01T12:00:00.123Z", None),
    ("3lmrcvminhu33", "2025-04-14T10:07:10.892Z", "2025-04-14T10:07:12.000123Z"),
    ("3lmrcvminhu34", None, "2025-04-14T10:07:12Z"),
    ("3lmrcvminhu35", None, None),
    ("self", "2023-01-01T00:00:00Z", None),
    ("self2", "2023-01-01T00:00:00.000001Z", "2026-12-01T23:59:59.999999Z"),
    ("old", "0001-01-01T00:00:00Z", "2025-01-01T00:00:00Z"),
    ("far", "9999-12-31T23:59:59.999999Z", "1970-01-01T00:00:00Z"),
    ("farther", "200000-01-01T00:00:00Z", "2025-01-01T00:00:00Z"),
    ("before", "1969-12-31T23:59:59.999999Z", None),
    ("inf", "infinity", "2025-01-01T00:00:00Z"),
    ("ninf", "-infinity", None),
    ("inf-event", "2025-01-01T00:00:00.5Z", "infinity"),
    ("garbage", "not a time", "2025-01-01T00:00:00Z"),
]
REV = "3kbbbbbbbbbbb"


def write_cases(store: Store, did: str = "did:plc:a") -> None:
    batch = Batch()
    for rkey, created, event in CASES:
        batch.put_record(did, "app.bsky.feed.post", rkey, RecordPut("bafyreib", REV, '{"text": "t"}', created, event))
    store.apply(batch)


def view_rows(store: Store) -> dict[tuple[str, str], tuple]:
    return {(d, k): (c, e) for d, k, c, e in store.fetchall("SELECT did, rkey, created_at, event_at FROM records")}


def test_created_at_round_trips_through_the_view_before_and_after_compaction(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        write_cases(store)
        logged = view_rows(store)
        assert len(logged) == len(CASES)
        store.compact()
        assert store.fetchall("SELECT count(*) FROM record_log") == [(0,)]
        assert view_rows(store) == logged
        # stored as an offset, except what an offset cannot express
        raw = store.fetchall("SELECT rkey FROM record_base WHERE created_raw IS NOT NULL ORDER BY rkey")
        assert raw == [("farther",), ("inf",), ("ninf",)]
        assert store.fetchall("SELECT created_us FROM record_base WHERE rkey = '3lmrcvminhu33'") == [(-1_108_123,)]
        write_cases(store, "did:plc:b")              # base and log together
        both = view_rows(store)
        assert {k[1]: v for k, v in both.items() if k[0] == "did:plc:b"} == {k[1]: v for k, v in logged.items()}
    with Store(tmp_path / "s.duckdb", read_only=True) as store:
        assert view_rows(store) == both


def make_v4(path: Path) -> dict[tuple[str, str], tuple]:
    """A schema-version-4 file: record_base keeps created_at as a TIMESTAMPTZ (rows in base and log)."""
    with Store(path) as store:
        write_cases(store)
        store.compact()
        write_cases(store, "did:plc:b")
        expected = view_rows(store)
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE old AS SELECT did, collection, rkey, cid, rev, record, "
                "created_at_from(created_us, created_raw, event_at) AS created_at, indexed_at, event_at FROM record_base")
    con.execute("DROP VIEW records; DROP TABLE record_base; ALTER TABLE old RENAME TO record_base")
    con.execute("CREATE VIEW records AS SELECT did, collection, rkey, cid_text(cid) AS cid, rev, record, created_at, "
                "indexed_at, event_at FROM record_base")
    con.execute("DROP MACRO created_at_from; DROP MACRO created_raw; DROP MACRO created_off")
    con.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    con.close()
    return expected


def test_a_v4_file_is_migrated_to_created_offsets_on_open_losing_nothing(tmp_path: Path) -> None:
    path = tmp_path / "v4.duckdb"
    expected = make_v4(path)
    with pytest.raises(StorageError, match=r"skyfill migrate --db .*v4\.duckdb"):
        Store(path, read_only=True)
    with Store(path) as store:
        assert store.fetchall("SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
        columns = [c for (c,) in store.fetchall(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = 'record_base' ORDER BY column_index")]
        assert "created_at" not in columns and {"created_us", "created_raw"} <= set(columns)
        assert store.fetchall("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'record_base_v4'") == [(0,)]
        assert view_rows(store) == expected
        store.compact()
        assert view_rows(store) == expected
    with Store(path) as store:                       # a second open changes nothing
        assert view_rows(store) == expected
    with Store(path, read_only=True) as store:
        assert view_rows(store) == expected
