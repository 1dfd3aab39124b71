"""bench/scale/jsonbench.py: JSONBench's five queries give the same answers on the mirror's
`records` and on the one-JSON-column layout built from the same records."""

from __future__ import annotations

from pathlib import Path

import duckdb
import orjson
import pytest

from bench.scale import jsonbench
from skyfill.storage import Store

from .support.records import generated_records, write_records

N = 3000
# Generated records are written without a firehose time: their event_at is the TID time of the rkey.
TIME = "event_at"


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("jsonbench") / "store.duckdb"
    with Store(path) as store:
        write_records(store, generated_records(N, seed=11, days=30, n_dids=200))
    return path


def test_layouts_agree_and_answers_are_not_trivial(db: Path) -> None:
    with duckdb.connect(str(db)) as con:
        result = jsonbench.run(con, repeats=2, event_at=TIME, build=True)
        assert result["rows"] == N
        answers = result["answers"]
        assert sum(count for _, count in answers["q1"]) == N and len(answers["q1"]) == 8
        assert all(users > 1 for _, _, users in answers["q2"])
        assert {event for event, _, _ in answers["q3"]} == {"app.bsky.feed.post", "app.bsky.feed.like",
                                                            "app.bsky.feed.repost"}
        assert len({hour for _, hour, _ in answers["q3"]}) == 24
        assert len(answers["q4"]) == 3 and all(first is not None for _, first in answers["q4"])
        assert len(answers["q5"]) == 3 and all(span > 0 for _, span in answers["q5"])
        for layout in ("mirror", "json"):
            assert set(result[layout]) == {"q1", "q2", "q3", "q4", "q5"}
            assert all(s > 0 for s in result[layout].values())
        assert result["min_speedup"] == min(result["speedup"].values())
        named = {row.name: row for row in jsonbench.rows(result)}
        assert named["scale.jsonbench.q1"].value == round(result["mirror"]["q1"], 4)
        assert named["scale.jsonbench.vs_json"].target == jsonbench.SPEEDUP_TARGET


def test_json_rows_are_jetstream_events(db: Path) -> None:
    with duckdb.connect(str(db)) as con:
        jsonbench.build_json_table(con, TIME)
        (text,) = con.execute(f"SELECT j FROM {jsonbench.JSON_TABLE} LIMIT 1").fetchone()
        event = orjson.loads(text)
        assert event["kind"] == "commit" and isinstance(event["time_us"], int)
        commit = event["commit"]
        assert commit["operation"] == "create" and commit["record"]["$type"] == commit["collection"]
        stored = con.execute("SELECT cid FROM records WHERE did = ? AND collection = ? AND rkey = ?",
                             [event["did"], commit["collection"], commit["rkey"]]).fetchall()
        assert stored == [(commit["cid"],)]


def test_disagreement_is_caught(db: Path) -> None:
    with duckdb.connect(str(db)) as con:
        jsonbench.build_json_table(con, TIME)
        table = jsonbench.JSON_TABLE
        con.execute(f"DELETE FROM {table} WHERE rowid = (SELECT min(rowid) FROM {table})")  # one event lost
        with pytest.raises(AssertionError, match="q1"):
            jsonbench.run(con, repeats=1, event_at=TIME)


def test_queries_are_five_each() -> None:
    assert len(jsonbench.MIRROR_QUERIES) == len(jsonbench.JSON_QUERIES) == 5
