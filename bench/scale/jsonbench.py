"""JSONBench's five queries (ClickHouse/JSONBench, DuckDB flavour) on the mirror, side by side
with the same queries on JSONBench's own layout: one JSON column holding Jetstream events.

JSONBench loads Bluesky Jetstream events into `CREATE TABLE bluesky (j JSON)` and asks:
    Q1 events per collection
    Q2 events and distinct users per collection, commit/create events only
    Q3 events per hour of day per collection, for likes, posts and reposts
    Q4 the 3 users who posted first
    Q5 the 3 users with the longest posting activity span
Here both layouts hold the SAME records: `build_json_table` turns every live row of `records`
into the Jetstream event that would have created it, so `run` can check that both layouts give
the same answers before comparing their times.

Adaptations common to both layouts:
  - the mirror keeps the current state, not the event log: every live record is the effect of a
    create, so the kind = 'commit' AND operation = 'create' filters of Q2-Q5 keep every row;
  - each ORDER BY gets a tie-breaker (event, user) so LIMIT 3 and equal counts give one answer;
  - Q4/Q5 take MIN/MAX of time_us as a number (JSONBench takes them on the text, right only
    while every time_us has 16 digits);
  - the event time is `event_at` (firehose time, else the TID time of the rkey or rev);
  - `run` sets the session TimeZone to UTC: hour() of a TIMESTAMPTZ depends on it (JSONBench
    runs in UTC); the mirror's Q3 takes the UTC hour from the microseconds instead (the same answer).
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Final

import duckdb

from bench.harness import Row

__all__ = [
    "MIRROR_QUERIES",
    "JSON_QUERIES",
    "JSON_TABLE",
    "mirror_queries",
    "build_json_table",
    "run",
    "rows",
    "main",
    "QUERY_TARGET_S",
    "SPEEDUP_TARGET",
]

JSON_TABLE: Final = "jsonbench_json"
QUERY_TARGET_S: Final = 0.5     # issue 11: each query <= 0.5 s at 10M records on this machine
SPEEDUP_TARGET: Final = 5.0     # ... and >= 5x faster than on the JSON column
_DAY_US: Final = 86_400_000_000
# floor(epoch microseconds / 1000), exact before 1970 too (`//` truncates toward zero).
_FLOOR_MS: Final = "((epoch_us({t}) - ((epoch_us({t}) % 1000) + 1000) % 1000) // 1000)"
_UTC_HOUR: Final = f"((epoch_us({{t}}) % {_DAY_US} + {_DAY_US}) % {_DAY_US} // 3_600_000_000)"
_POSTS_LIKES_REPOSTS: Final = "['app.bsky.feed.post', 'app.bsky.feed.repost', 'app.bsky.feed.like']"


def mirror_queries(event_at: str = "event_at") -> tuple[str, ...]:
    """The five queries on `records` (did, collection and the event time `event_at`: an SQL expression)."""
    events = f"(SELECT did, collection, {event_at} AS event_at FROM records)"
    return (
        # Q1: the collection is a column; no JSON is read at all.
        f"SELECT collection AS event, count(*) AS count FROM {events} GROUP BY event ORDER BY count DESC, event",
        # Q2: every live record is a create (see the module doc): no filter.
        f"SELECT collection AS event, count(*) AS count, count(DISTINCT did) AS users FROM {events} "
        "GROUP BY event ORDER BY count DESC, event",
        # Q3: the event time is a TIMESTAMPTZ column (JSONBench: time_us text -> BIGINT -> timestamp);
        # its UTC hour is arithmetic on the microseconds (exact, before 1970 too), half the time of
        # hour(), which goes through the session's ICU calendar (JSONBench runs in UTC).
        f"SELECT collection AS event, {_UTC_HOUR.format(t='event_at')} AS hour_of_day, count(*) AS count FROM {events} "
        f"WHERE collection IN {_POSTS_LIKES_REPOSTS} GROUP BY event, hour_of_day ORDER BY hour_of_day, event",
        # Q4: first post time per user, straight from the column.
        f"SELECT did AS user_id, min(event_at) AS first_post_date FROM {events} "
        "WHERE collection = 'app.bsky.feed.post' GROUP BY user_id ORDER BY first_post_date ASC, user_id LIMIT 3",
        # Q5: posting span per user in milliseconds: the millisecond boundaries crossed, as
        # date_diff('milliseconds', ...) counts them, but on the epoch microseconds (a third of the
        # time: date_diff of a TIMESTAMPTZ goes through the ICU calendar).
        f"SELECT did AS user_id, {_FLOOR_MS.format(t='max(event_at)')} - {_FLOOR_MS.format(t='min(event_at)')} "
        "AS activity_span "
        f"FROM {events} WHERE collection = 'app.bsky.feed.post' GROUP BY user_id "
        "ORDER BY activity_span DESC, user_id LIMIT 3",
    )


MIRROR_QUERIES: Final = mirror_queries()

_CREATE: Final = "(j->>'$.kind' = 'commit') AND (j->>'$.commit.operation' = 'create')"
_TIME: Final = "TO_TIMESTAMP({agg}(CAST(j->>'$.time_us' AS BIGINT)) / 1000000)"

# JSONBench's duckdb/queries.sql on `jsonbench_json`, changed only as the module doc says.
JSON_QUERIES: Final = (
    f"SELECT j->>'$.commit.collection' AS event, count() AS count FROM {JSON_TABLE} GROUP BY event "
    "ORDER BY count DESC, event",
    f"SELECT j->>'$.commit.collection' AS event, count() AS count, count(DISTINCT j->>'$.did') AS users "
    f"FROM {JSON_TABLE} WHERE {_CREATE} GROUP BY event ORDER BY count DESC, event",
    "SELECT j->>'$.commit.collection' AS event, "
    "hour(TO_TIMESTAMP(CAST(j->>'$.time_us' AS BIGINT) / 1000000)) AS hour_of_day, count() AS count "
    f"FROM {JSON_TABLE} WHERE {_CREATE} AND (j->>'$.commit.collection' IN {_POSTS_LIKES_REPOSTS}) "
    "GROUP BY event, hour_of_day ORDER BY hour_of_day, event",
    f"SELECT j->>'$.did'::VARCHAR AS user_id, {_TIME.format(agg='MIN')} AS first_post_date FROM {JSON_TABLE} "
    f"WHERE {_CREATE} AND (j->>'$.commit.collection' = 'app.bsky.feed.post') GROUP BY user_id "
    "ORDER BY first_post_date ASC, user_id LIMIT 3",
    f"SELECT j->>'$.did'::VARCHAR AS user_id, date_diff('milliseconds', {_TIME.format(agg='MIN')}, "
    f"{_TIME.format(agg='MAX')}) AS activity_span FROM {JSON_TABLE} "
    f"WHERE {_CREATE} AND (j->>'$.commit.collection' = 'app.bsky.feed.post') GROUP BY user_id "
    "ORDER BY activity_span DESC, user_id LIMIT 3",
)


def build_json_table(con: duckdb.DuckDBPyConnection, event_at: str = "event_at") -> int:
    """(Re)create `jsonbench_json(j JSON)`: one Jetstream commit event per live record, its
    time_us the record's event time. Returns the rows."""
    con.execute(f"""
        CREATE OR REPLACE TABLE {JSON_TABLE} AS
        SELECT json_object(
                   'did', did, 'time_us', epoch_us(event_at), 'kind', 'commit',
                   'commit', json_object('rev', rev, 'operation', 'create', 'collection', collection,
                                         'rkey', rkey, 'record', record, 'cid', cid)) AS j
        FROM (SELECT did, collection, rkey, cid, rev, record::JSON AS record, {event_at} AS event_at FROM records)
    """)
    row = con.execute(f"SELECT count(*) FROM {JSON_TABLE}").fetchone()
    return int(row[0]) if row else 0


def _best(con: duckdb.DuckDBPyConnection, sql: str, repeats: int) -> tuple[float, list[tuple[Any, ...]]]:
    best, rows = float("inf"), []
    for _ in range(repeats):
        started = time.perf_counter()
        rows = con.execute(sql).fetchall()
        best = min(best, time.perf_counter() - started)
    return best, rows


def run(con: duckdb.DuckDBPyConnection, repeats: int = 3, *, event_at: str = "event_at",
        build: bool = False, json_repeats: int | None = None) -> dict[str, Any]:
    """Best-of-`repeats` seconds of each query on both layouts (`json_repeats` for the JSON
    column's, default `repeats`), and the speed-ups (JSON / mirror).

    Builds `jsonbench_json` first when `build` (or when it is missing). Raises AssertionError
    when a query's answers differ between the layouts. Returns
    {"rows": n, "mirror": {"q1": s, ...}, "json": {...}, "speedup": {...}, "min_speedup": x,
     "answers": {"q1": rows, ...}}.
    """
    con.execute("SET TimeZone = 'UTC'")
    exists = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [JSON_TABLE]).fetchone()
    rows = build_json_table(con, event_at) if build or not (exists and exists[0]) else None
    if rows is None:
        counted = con.execute(f"SELECT count(*) FROM {JSON_TABLE}").fetchone()
        rows = int(counted[0]) if counted else 0
    out: dict[str, Any] = {"rows": rows, "mirror": {}, "json": {}, "speedup": {}, "answers": {}}
    for i, (mirror_sql, json_sql) in enumerate(zip(mirror_queries(event_at), JSON_QUERIES, strict=True), start=1):
        name = f"q{i}"
        mirror_s, mirror_rows = _best(con, mirror_sql, repeats)
        json_s, json_rows = _best(con, json_sql, json_repeats or repeats)
        assert mirror_rows == json_rows, f"{name}: the layouts disagree: {mirror_rows[:5]} vs {json_rows[:5]}"
        out["mirror"][name] = mirror_s
        out["json"][name] = json_s
        out["speedup"][name] = json_s / mirror_s if mirror_s > 0 else float("inf")
        out["answers"][name] = mirror_rows
    out["min_speedup"] = min(out["speedup"].values())
    return out


def rows(result: dict[str, Any], *, prefix: str = "scale.jsonbench") -> list[Row]:
    """`run`'s result as bench rows: `<prefix>.q1`..`q5` (mirror seconds), `<prefix>.json.q1`..
    (informational) and `<prefix>.vs_json` (the smallest speed-up)."""
    out = [Row.at_most(f"{prefix}.{name}", round(s, 4), "s", QUERY_TARGET_S) for name, s in result["mirror"].items()]
    out += [Row(f"{prefix}.json.{name}", round(s, 4), "s") for name, s in result["json"].items()]
    out.append(Row.at_least(f"{prefix}.vs_json", round(result["min_speedup"], 1), "x", SPEEDUP_TARGET))
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.scale.jsonbench DB [--event-at SQL] [--repeats N]`: build the JSON table
    inside DB (a copy: it is written to) and print both layouts' times."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("db")
    parser.add_argument("--event-at", default="event_at", help="event-time expression over records")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with duckdb.connect(args.db) as con:
        started = time.perf_counter()
        rows = build_json_table(con, args.event_at)
        print(f"{JSON_TABLE}: {rows} events built in {time.perf_counter() - started:.1f} s")
        result = run(con, args.repeats, event_at=args.event_at)
    for name in result["mirror"]:
        print(f"{name}  mirror {result['mirror'][name]:.4f} s   json {result['json'][name]:.4f} s   "
              f"x{result['speedup'][name]:.1f}")
    print(f"smallest speed-up x{result['min_speedup']:.1f}")


if __name__ == "__main__":
    main()
