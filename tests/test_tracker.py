"""consumer.tracker.Tracker: sync 1.1 per-DID state on real frames (indigo relay scenarios and the
derived captures), and one batch written through a real DuckDB file."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import libipld
import orjson
import pytest

from skyfill.consumer import Account, Commit, Identity, Sync, Tracker, Verdict, parse_frame
from skyfill.protocol.car import read_car
from skyfill.errors import FrameError
from skyfill.storage import Batch, RepoRow, Store

from .support.wire import FIREHOSE, encode_car, encode_frame, from_json, load

SCENARIOS = Path(__file__).parent / "vectors" / "indigo" / "relay-scenarios"
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
BNEWBOLD = "did:plc:44ybard66vv44zksje25o7dz"
PENGUA = "did:plc:vvpy7d6y2li5yo73cgbszibl"

A, D = Verdict.APPLIED, Verdict.DESYNCHRONIZED
KEPT = {Verdict.APPLIED, Verdict.DESYNCHRONIZED}

# What each message of each scenario becomes. "bad_*" = parse_frame raised FrameError of that kind.
EXPECTED: dict[str, list[Verdict | str]] = {
    # identity, account, sync (nothing held: just take the head), account deleted (purge)
    "account_lifecycle": [A, A, A, A],
    # the commit sent while deactivated is dropped; so the next one's `since` names a rev we
    # never applied: kept, but the chain is broken (desynchronized)
    "deactivation": [A, A, Verdict.INACTIVE, A, D, A, A, A],
    "legacy": [A, A, A],
    # an intact sync 1.1 chain: every since == held rev, every prevData == held data root
    "post_lifecycle": [A, A, A, A, A, A],
    # the second commit's since (3llxiozhrpa2n) is not the first one's rev: a gap upstream
    "post_lifecycle_legacy": [A, D, A, A, A, A],
    # 01 and 02: body rev edited without re-signing the commit block (see test_frames.REJECTED);
    # rejected before the rev rule is reached. 03 chains onto 00 (since and prevData match).
    "rev_ordering": [A, "bad_tid", "bad_commit", A],
    # 01 repeats seq 1000, 02 goes back to seq 5: dropped; 03 (seq 2000) is the same commit as 02
    "seq_ordering": [A, Verdict.STALE_SEQ, Verdict.STALE_SEQ, A],
}


def scenario(name: str) -> dict[str, Any]:
    return json.loads((SCENARIOS / f"{name}.json").read_text())


def wire(message: dict[str, Any]) -> bytes:
    frame = message["frame"]
    return encode_frame(frame["header"], from_json(frame["body"]))


def replay(
    tracker: Tracker, frames: list[bytes], batch: Batch, *, changed: list[bool] | None = None
) -> list[Verdict | str]:
    """Parse and apply each frame; `changed` collects whether the account's active/status moved."""
    out: list[Verdict | str] = []
    for data in frames:
        try:
            event = parse_frame(data, want=tracker.want)
        except FrameError as exc:
            out.append(exc.kind)
            if changed is not None:
                changed.append(False)
            continue
        assert isinstance(event, (Commit, Sync, Identity, Account))
        row = tracker.row(event.did)
        before = (row.active, row.status) if row else (True, "active")
        out.append(tracker.apply(event, batch))
        if changed is not None:
            row = tracker.row(event.did)
            changed.append(before != ((row.active, row.status) if row else (True, "active")))
    return out


def new_tracker(rows: dict[str, RepoRow] | None = None, **kw: Any) -> Tracker:
    return Tracker(rows or {}, clock=lambda: NOW, **kw)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_relay_scenario_kept_and_dropped_match_the_flags(name: str) -> None:
    data = scenario(name)
    tracker, batch = new_tracker(), Batch()
    changed: list[bool] = []
    verdicts = replay(tracker, [wire(m) for m in data["messages"]], batch, changed=changed)
    assert verdicts == EXPECTED[name]
    assert [v in KEPT for v in verdicts] == [not m["drop"] for m in data["messages"]]
    # `update`: the message changed the account's state (active/status)
    assert changed == [m["update"] for m in data["messages"]]
    assert not any(m["invalid"] for m in data["messages"])

    # Account state after the scenario: the last kept #account wins; none means active.
    (account,) = data["accounts"]
    did = account["identity"]["did"]
    row = tracker.row(did)
    assert row is not None
    kept_accounts = [m["frame"]["body"] for m, v in zip(data["messages"], verdicts, strict=True)
                     if m["frame"]["header"]["t"] == "#account" and v in KEPT]
    last = kept_accounts[-1] if kept_accounts else {"active": True}
    assert row.active is last["active"]
    assert row.status == last.get("status", "active" if last["active"] else "deactivated")
    assert (did in batch.purged_dids) == (row.status == "deleted")
    assert batch.repos[did] is row  # the live row object is what the batch carries


def test_account_lifecycle_ends_purged_and_deleted() -> None:
    tracker, batch = new_tracker(), Batch()
    replay(tracker, [wire(m) for m in scenario("account_lifecycle")["messages"]], batch)
    row = tracker.row(PENGUA)
    assert row is not None
    assert (row.handle, row.active, row.status, row.rev, row.last_seq) == (
        "pengua.bsky.social", False, "deleted", "3lmxrbvasth2t", 140)
    # first_seen_at is on the event timeline: the time of the DID's first event
    assert row.sync_state == "unknown" and row.first_seen_at == datetime(2025, 4, 16, 23, 40, 33, 895000, tzinfo=UTC)
    assert batch.purged_dids == {PENGUA}


def test_deleting_a_synchronized_account_forgets_that_it_was_synchronized() -> None:
    """After a purge nothing stored proves the repo: a reactivated account must be refetched."""
    messages = [wire(m) for m in scenario("account_lifecycle")["messages"]]
    tracker, batch = new_tracker(), Batch()
    replay(tracker, messages[:-1], batch)
    tracker.mark_synchronized(PENGUA, "3lmxrbvasth2t", "bafyreidata", "bafyreicommit")
    assert tracker.row(PENGUA).sync_state == "synchronized"
    replay(tracker, messages[-1:], batch)  # #account status deleted
    assert tracker.row(PENGUA).sync_state == "unknown"
    assert PENGUA in batch.purged_dids


def test_deactivation_records_and_desync_reason() -> None:
    tracker, batch = new_tracker(), Batch()
    replay(tracker, [wire(m) for m in scenario("deactivation")["messages"]], batch)
    row = tracker.row(BNEWBOLD)
    assert row is not None
    assert (row.sync_state, row.desync_reason) == ("desynchronized", "since_mismatch")
    assert row.desynced_at == datetime(2025, 4, 4, 7, 25, 56, 795000, tzinfo=UTC)  # the breaking commit's time
    assert (row.rev, row.last_seq, row.active, row.status) == ("3llxvapijbc2o", 107, True, "active")
    puts = {key[1:]: put.cid for key, put in batch.records.items() if put is not None}
    deletes = {key[1:] for key, put in batch.records.items() if put is None}
    assert set(puts) == {("app.bsky.feed.like", "3llpyftcvih2r"), ("app.bsky.feed.threadgate", "3llxv7pnd3s2q")}
    # the post was created by the dropped commit; its delete still reaches the batch (a no-op in the DB)
    assert deletes == {("app.bsky.feed.like", "3llxva3wc7x22"), ("app.bsky.feed.post", "3llxv7pnd3s2q")}
    assert tracker.counts[Verdict.INACTIVE] == 1 and tracker.desynchronized_total == 1
    assert tracker.desync_reasons == {"since_mismatch": 1}


def _reseq(name: str, seq: int, **changes: Any) -> bytes:
    header, body = load(name)
    body["seq"] = seq
    body.update(changes)
    return encode_frame(header, body)


def test_stale_rev_is_dropped_without_effects() -> None:
    tracker, batch = new_tracker(), Batch()
    first = parse_frame((FIREHOSE / "post_lifecycle__01.frame").read_bytes())
    assert tracker.apply(first, batch) is A
    before = (tracker.row(BNEWBOLD).rev, dict(batch.records))  # type: ignore[union-attr]
    # the same commit again, and the commit before it, both under a higher seq
    again = parse_frame(_reseq("post_lifecycle__01.frame", 40_000_000))
    older = parse_frame(_reseq("post_lifecycle__00.frame", 40_000_001))
    assert tracker.apply(again, batch) is Verdict.STALE_REV
    assert tracker.apply(older, batch) is Verdict.STALE_REV
    assert (tracker.row(BNEWBOLD).rev, dict(batch.records)) == before  # type: ignore[union-attr]
    assert tracker.row(BNEWBOLD).last_seq == 35942466  # type: ignore[union-attr]


def test_prev_data_mismatch_applies_ops_and_desynchronizes() -> None:
    tracker, batch = new_tracker(), Batch()
    tracker.apply(parse_frame((FIREHOSE / "post_lifecycle__00.frame").read_bytes()), batch)
    _, first = load("post_lifecycle__00.frame")
    # commit 01 chains by `since`, but claims the MST root before 00 as its previous root
    event = parse_frame(_reseq("post_lifecycle__01.frame", 35942466, prevData=first["prevData"]))
    assert tracker.apply(event, batch) is D
    row = tracker.row(BNEWBOLD)
    assert row is not None
    assert (row.sync_state, row.desync_reason, row.rev) == ("desynchronized", "prev_data_mismatch", "3lmxjzbfkb522")
    assert batch.records[(BNEWBOLD, "app.bsky.feed.like", "3lmxjza3h2i27")] is None  # the delete applied


def test_chain_from_rows_loaded_at_start_up() -> None:
    commit = parse_frame((FIREHOSE / "post_lifecycle__01.frame").read_bytes())
    assert isinstance(commit, Commit) and commit.prev_data is not None
    held = RepoRow(did=BNEWBOLD, rev="3lmxjza3nva27", data_cid=commit.prev_data, sync_state="synchronized")
    tracker = new_tracker({BNEWBOLD: held})
    assert tracker.apply(commit, Batch()) is A
    assert held.sync_state == "synchronized" and held.rev == commit.rev and held.data_cid == commit.data_cid
    # the same start state but a different held rev: since does not match
    other = RepoRow(did=BNEWBOLD, rev="3lmxjza3nva22", data_cid=commit.prev_data, sync_state="synchronized")
    assert new_tracker({BNEWBOLD: other}).apply(commit, Batch()) is D
    assert other.desync_reason == "since_mismatch"


def test_sync_with_a_different_data_root_desynchronizes() -> None:
    sync = parse_frame((FIREHOSE / "account_lifecycle__02.frame").read_bytes())
    assert isinstance(sync, Sync)
    same = RepoRow(did=PENGUA, rev="3lmxr22222222", data_cid=sync.data_cid, sync_state="synchronized")
    assert new_tracker({PENGUA: same}).apply(sync, Batch()) is A
    assert same.sync_state == "synchronized" and same.commit_cid == sync.commit_cid
    other = RepoRow(did=PENGUA, rev="3lmxr22222222", data_cid="bafyreibs6fzaletha2gggf3wnldgxs4w4aqm3eu2jpwo5ffg2trxra7lu4")
    batch = Batch()
    assert new_tracker({PENGUA: other}).apply(sync, batch) is D
    assert (other.sync_state, other.desync_reason, other.rev, other.data_cid) == (
        "desynchronized", "sync_data_mismatch", sync.rev, sync.data_cid)
    assert batch.repos[PENGUA] is other


def test_commit_and_sync_for_inactive_accounts_are_ignored() -> None:
    row = RepoRow(did=PENGUA, active=False, status="takendown")
    tracker, batch = new_tracker({PENGUA: row}), Batch()
    sync = parse_frame((FIREHOSE / "account_lifecycle__02.frame").read_bytes())
    assert tracker.apply(sync, batch) is Verdict.INACTIVE
    assert row.rev is None and batch.is_empty()


def test_filter_keeps_wanted_collections_and_still_advances_rev() -> None:
    tracker, batch = new_tracker(want=lambda c: c == "app.bsky.feed.post"), Batch()
    event = parse_frame((FIREHOSE / "post_lifecycle__05.frame").read_bytes(), want=tracker.want)
    assert tracker.apply(event, batch) is A
    assert [k[1] for k in batch.records] == ["app.bsky.feed.post"]
    assert tracker.row(BNEWBOLD).rev == "3lmxk36v2fg2o"  # type: ignore[union-attr]


def test_too_big_commit_desynchronizes_and_stores_no_bodies() -> None:
    header, body = load("post_lifecycle__02.frame")
    _, blocks = read_car(body["blocks"])
    body["tooBig"] = True
    body["blocks"] = encode_car([body["commit"]], {body["commit"]: blocks[body["commit"]]})
    tracker, batch = new_tracker(), Batch()
    assert tracker.apply(parse_frame(encode_frame(header, body)), batch) is D
    assert batch.records == {}
    assert tracker.row(BNEWBOLD).desync_reason == "too_big"  # type: ignore[union-attr]


def test_identity_without_handle_keeps_the_handle_and_account_status_defaults() -> None:
    tracker, batch = new_tracker(), Batch()
    messages = scenario("legacy")["messages"]  # identity without a handle, account active without status
    tracker.apply(parse_frame(_reseq_json(messages[0], handle="bnewbold.net")), batch)
    tracker.apply(parse_frame(_reseq_json(messages[0], seq=7278969008 + 1)), batch)
    tracker.apply(parse_frame(_reseq_json(messages[1], seq=7278969008 + 2)), batch)
    row = tracker.row(BNEWBOLD)
    assert row is not None
    assert (row.handle, row.active, row.status, row.last_seq) == ("bnewbold.net", True, "active", 7278969010)


def _reseq_json(message: dict[str, Any], **changes: Any) -> bytes:
    frame = message["frame"]
    return encode_frame(frame["header"], {**from_json(frame["body"]), **changes})


def test_reset_stream_accepts_lower_seqs_again() -> None:
    tracker, batch = new_tracker(), Batch()
    frames = [wire(m) for m in scenario("seq_ordering")["messages"]]
    tracker.apply(parse_frame(frames[0]), batch)  # seq 1000
    low = parse_frame(frames[2])  # seq 5
    assert tracker.apply(low, batch) is Verdict.STALE_SEQ
    tracker.reset_stream()
    assert tracker.apply(low, batch) is A


def test_mark_synchronized_clears_desync_but_keeps_a_newer_head() -> None:
    tracker, batch = new_tracker(), Batch()
    replay(tracker, [wire(m) for m in scenario("post_lifecycle_legacy")["messages"]], batch)
    row = tracker.row(BNEWBOLD)
    assert row is not None and row.sync_state == "desynchronized"
    head = (row.rev, row.data_cid, row.commit_cid)
    # reconciled at an older rev while newer commits were applied: the newer head stays
    assert tracker.mark_synchronized(BNEWBOLD, "3llxva3wrtx22", "bafyold", "bafyoldcommit") is row
    assert (row.rev, row.data_cid, row.commit_cid) == head
    assert (row.sync_state, row.desync_reason, row.desynced_at) == ("synchronized", None, None)
    fresh = tracker.mark_synchronized("did:plc:brandnew", "3llxva3wrtx22", "bafydata", "bafycommit")
    assert (fresh.rev, fresh.data_cid, fresh.sync_state, fresh.first_seen_at) == (
        "3llxva3wrtx22", "bafydata", "synchronized", NOW)


def test_batch_from_the_tracker_through_a_real_duckdb_file(tmp_path: Path) -> None:
    # pengua's seqs (110..130) are lower than bnewbold's: they go first on this one stream
    frames = [wire(m) for m in scenario("account_lifecycle")["messages"][:3]]  # pengua: no delete yet
    frames += [wire(m) for m in scenario("post_lifecycle")["messages"]]
    tracker, batch = Tracker({}), Batch()
    assert all(v in KEPT for v in replay(tracker, frames, batch))
    path = tmp_path / "x.duckdb"
    with Store(path) as store:
        store.apply(batch)
        records = store.fetchall("SELECT did, collection, rkey, cid, rev, record FROM records ORDER BY collection, rkey")
        repos = {r[0]: r[1:] for r in store.fetchall(
            "SELECT did, rev, data_cid, commit_cid, last_seq, handle, active, status, sync_state FROM repos")}
    # like and reply were created and deleted again; profile updated; post + threadgate + postgate created
    assert [(r[1], r[2], r[4]) for r in records] == [
        ("app.bsky.actor.profile", "self", "3lmxk25y7ad22"),
        ("app.bsky.feed.post", "3lmxk35znys2k", "3lmxk36v2fg2o"),
        ("app.bsky.feed.postgate", "3lmxk35znys2k", "3lmxk36v2fg2o"),
        ("app.bsky.feed.threadgate", "3lmxk35znys2k", "3lmxk36v2fg2o"),
    ]
    post = orjson.loads(records[1][5])
    assert post["$type"] == "app.bsky.feed.post" and post["text"] == "test post"
    last = libipld.decode_dag_cbor_multi(frames[-1])[1]
    assert repos[BNEWBOLD] == ("3lmxk36v2fg2o", tracker.row(BNEWBOLD).data_cid,  # type: ignore[union-attr]
                               libipld.encode_cid(last["commit"]), last["seq"], None, True, "active", "unknown")
    assert repos[PENGUA][4:] == ("pengua.bsky.social", True, "active", "unknown")

    # Restart: the tracker rebuilt from the file continues the chain; then bnewbold is deleted.
    with Store(path) as store:
        tracker2 = Tracker(store.load_repos())
        held = tracker2.row(BNEWBOLD)
        assert held is not None and (held.rev, held.data_cid) == ("3lmxk36v2fg2o", tracker.row(BNEWBOLD).data_cid)  # type: ignore[union-attr]
        batch2 = Batch()
        replayed = parse_frame(frames[-1])  # the relay replays the last commit after a restart
        assert tracker2.apply(replayed, batch2) is Verdict.STALE_REV
        deleted = parse_frame(_reseq("account_lifecycle__03.frame", 35986866, did=BNEWBOLD))
        assert tracker2.apply(deleted, batch2) is A
        store.apply(batch2)
        assert store.fetchall("SELECT count(*) FROM records WHERE did = ?", [BNEWBOLD]) == [(0,)]
        assert store.fetchall("SELECT active, status, rev FROM repos WHERE did = ?", [BNEWBOLD]) == [
            (False, "deleted", "3lmxk36v2fg2o")]
        assert store.fetchall("SELECT status FROM repos WHERE did = ?", [PENGUA]) == [("active",)]
