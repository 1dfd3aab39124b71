"""Gap reasons against a real DuckDB file: each reason flags the DID it must and not the one it must not."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from skyfill.backfill.gaps import GapReport, HeldRevs, Reason, detect_gaps, downtime_spans
from skyfill.errors import SyntaxError_
from tests.support.store import SetupStore

T0 = datetime(2025, 3, 10, tzinfo=UTC)
START = T0
END = T0 + timedelta(days=1)
NOW = T0 + timedelta(days=3)


def h(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def add_repo(
    store: SetupStore,
    did: str,
    *,
    first_seen: datetime,
    last_event: datetime | None = None,
    rev: str | None = "3laaaaaaaaa22",
    sync_state: str = "synchronized",
    desynced_at: datetime | None = None,
    backfilled_at: datetime | None = None,
    backfill_status: str | None = None,
    active: bool = True,
    status: str = "active",
) -> None:
    store.execute_write(
        "INSERT INTO repo_base (did, rev, first_seen_at, last_event_at, sync_state, desynced_at, backfilled_at, "
        "backfill_status, active, status, k) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, md5_number_lower(?))",
        [did, rev, first_seen, last_event, sync_state, desynced_at, backfilled_at, backfill_status, active, status, did],
    )


def add_record(store: SetupStore, did: str, collection: str, rkey: str, record: dict, created_at: datetime) -> None:
    at = created_at.isoformat()
    store.put_records([(did, collection, rkey, "bafyreia", json.dumps(record), at, at)])


def add_coverage(store: SetupStore, first: datetime, last: datetime | None, ended: str = "clean") -> None:
    store.execute_write(
        "INSERT INTO coverage (source, first_event_at, last_event_at, started_at, ended) VALUES ('r', ?, ?, ?, ?)",
        [first, last, first, ended],
    )


@pytest.fixture
def store(tmp_path: Path) -> SetupStore:
    s = SetupStore(tmp_path / "gaps.duckdb")
    yield s
    s.close()


async def gaps(store: SetupStore, **kw: object) -> GapReport:
    kw.setdefault("audit", None)
    return await detect_gaps(store, start=START, end=END, now=NOW, **kw)  # type: ignore[arg-type]


def flagged(report: GapReport, reason: Reason) -> set[str]:
    return {d for d, rs in report.reasons_by_did.items() if reason.value in rs}


async def test_desynchronized(store: SetupStore) -> None:
    add_coverage(store, h(-48), h(60))  # no downtime
    add_repo(store, "did:plc:broken", first_seen=h(-48), last_event=h(-30), sync_state="desynchronized",
             desynced_at=h(2), backfilled_at=h(-40))
    add_repo(store, "did:plc:repaired", first_seen=h(-48), last_event=h(-30), sync_state="desynchronized",
             desynced_at=h(2), backfilled_at=h(3))
    add_repo(store, "did:plc:later", first_seen=h(-48), last_event=h(-30), sync_state="desynchronized",
             desynced_at=h(30))
    add_repo(store, "did:plc:takendown", first_seen=h(-48), last_event=h(-30), sync_state="desynchronized",
             desynced_at=h(2), backfill_status="RepoTakendown", active=False, status="takendown")
    report = await gaps(store)
    assert flagged(report, Reason.DESYNCHRONIZED) == {"did:plc:broken"}
    assert report.counts["desynchronized"] == 1


async def test_never_backfilled(store: SetupStore) -> None:
    add_coverage(store, h(-48), h(60))
    add_repo(store, "did:plc:fresh", first_seen=h(1), last_event=h(5))
    add_repo(store, "did:plc:done", first_seen=h(1), last_event=h(5), backfilled_at=h(6), backfill_status="ok")
    add_repo(store, "did:plc:quietbefore", first_seen=h(-40), last_event=h(-20))
    add_repo(store, "did:plc:seenafter", first_seen=h(30), last_event=h(31))
    add_repo(store, "did:plc:gone", first_seen=h(1), last_event=h(5), backfill_status="RepoNotFound")
    add_repo(store, "did:plc:retrying", first_seen=h(1), last_event=h(5), backfill_status="retrying")
    report = await gaps(store)
    assert flagged(report, Reason.NEVER_BACKFILLED) == {"did:plc:fresh", "did:plc:retrying"}


async def test_referenced(store: SetupStore) -> None:
    add_coverage(store, h(-48), h(60))
    add_repo(store, "did:plc:actor", first_seen=h(-40), last_event=h(-30), backfilled_at=h(-35), backfill_status="ok")
    add_repo(store, "did:plc:heldfull", first_seen=h(-40), last_event=h(-30), backfilled_at=h(-35), backfill_status="ok")
    add_repo(store, "did:plc:partial", first_seen=h(-40), last_event=h(-30))
    a = "did:plc:actor"
    like = {"$type": "app.bsky.feed.like", "subject": {"uri": "at://did:plc:liked/app.bsky.feed.post/1", "cid": "x"}}
    add_record(store, a, "app.bsky.feed.like", "l1", like, h(2))
    add_record(store, a, "app.bsky.feed.repost", "r1",
               {"subject": {"uri": "at://did:plc:reposted/app.bsky.feed.post/2", "cid": "x"}}, h(3))
    add_record(store, a, "app.bsky.graph.follow", "f1", {"subject": "did:plc:followed"}, h(4))
    add_record(store, a, "app.bsky.feed.post", "p1", {
        "text": "hi", "reply": {"parent": {"uri": "at://did:plc:parent/app.bsky.feed.post/3", "cid": "x"},
                                "root": {"uri": "at://did:plc:partial/app.bsky.feed.post/4", "cid": "x"}}}, h(5))
    add_record(store, a, "app.bsky.feed.post", "p2", {
        "text": "q", "embed": {"$type": "app.bsky.embed.record",
                               "record": {"uri": "at://did:web:quoted.example/app.bsky.feed.post/5", "cid": "x"}}}, h(6))
    add_record(store, a, "app.bsky.feed.post", "p3", {
        "text": "qm", "embed": {"$type": "app.bsky.embed.recordWithMedia",
                                "record": {"record": {"uri": "at://did:plc:quotedmedia/app.bsky.feed.post/6"}}}}, h(7))
    # must not be flagged: already backfilled, outside the window, a handle authority, not an interaction
    add_record(store, a, "app.bsky.graph.follow", "f2", {"subject": "did:plc:heldfull"}, h(8))
    add_record(store, a, "app.bsky.graph.follow", "f3", {"subject": "did:plc:oldfollow"}, h(-10))
    add_record(store, a, "app.bsky.feed.like", "l2",
               {"subject": {"uri": "at://alice.example/app.bsky.feed.post/1", "cid": "x"}}, h(9))
    add_record(store, a, "app.bsky.graph.block", "b1", {"subject": "did:plc:blocked"}, h(10))
    report = await gaps(store)
    assert flagged(report, Reason.REFERENCED) == {
        "did:plc:liked", "did:plc:reposted", "did:plc:followed", "did:plc:parent", "did:plc:partial",
        "did:web:quoted.example", "did:plc:quotedmedia",
    }


async def test_downtime_without_audit(store: SetupStore) -> None:
    add_coverage(store, h(-48), h(6))
    add_coverage(store, h(6) + timedelta(seconds=2), h(10))   # 2 s restart gap: not downtime
    add_coverage(store, h(14), h(60))                         # 10:00-14:00 uncovered
    add_repo(store, "did:plc:known", first_seen=h(-40), last_event=h(-2), backfilled_at=h(-39), backfill_status="ok")
    add_repo(store, "did:plc:longquiet", first_seen=h(-400), last_event=h(-300), backfilled_at=h(-399),
             backfill_status="ok")
    add_repo(store, "did:plc:newcomer", first_seen=h(15), last_event=h(15), backfilled_at=h(16), backfill_status="ok")
    report = await gaps(store, no_audit_margin=timedelta(hours=24))
    assert report.downtime == ((h(10), h(14)),)
    assert flagged(report, Reason.DOWNTIME) == {"did:plc:known"}


async def test_downtime_with_audit_flags_only_moved_heads(store: SetupStore) -> None:
    add_coverage(store, h(-48), h(10))
    add_coverage(store, h(14), h(60))
    add_repo(store, "did:plc:moved", first_seen=h(-40), last_event=h(-2), rev="3laaaaaaaaa22",
             backfilled_at=h(-39), backfill_status="ok")
    add_repo(store, "did:plc:still", first_seen=h(-40), last_event=h(-2), rev="3lbbbbbbbbb22",
             backfilled_at=h(-39), backfill_status="ok")
    add_repo(store, "did:plc:newcomer", first_seen=h(15), last_event=h(15), backfilled_at=h(16), backfill_status="ok")
    store.execute_write(
        "INSERT INTO identities (did, pds, resolved_at) VALUES ('did:plc:moved', 'https://pds.example', ?)", [NOW]
    )
    seen: dict[str, list[tuple[str, str | None]]] = {}

    # A real Auditor is PdsAuditor (tests/test_backfiller.py runs it over HTTP); this one plays a
    # PDS whose heads are known, to pin what detect_gaps asks and what it keeps.
    heads = {"did:plc:moved": "3lzzzzzzzzz22", "did:plc:still": "3lbbbbbbbbb22", "did:plc:stranger": "3lzz"}

    async def audit(held: HeldRevs) -> set[str]:
        seen.update({k: list(v) for k, v in held.items()})
        return {did for did, rev in (x for rows in held.values() for x in rows) if heads[did] != rev} | {
            "did:plc:stranger"}

    report = await gaps(store, audit=audit)
    assert seen == {"https://pds.example": [("did:plc:moved", "3laaaaaaaaa22")],
                    "": [("did:plc:still", "3lbbbbbbbbb22")]}
    assert flagged(report, Reason.DOWNTIME) == {"did:plc:moved"}
    assert report.audited and report.audit_candidates == 2


async def test_explicit_and_merge(store: SetupStore) -> None:
    add_coverage(store, h(-48), h(60))
    add_repo(store, "did:plc:fresh", first_seen=h(1), last_event=h(5))
    report = await gaps(store, explicit_dids=["did:plc:fresh", "did:web:x.example"])
    assert report.reasons_by_did == {
        "did:plc:fresh": ("never_backfilled", "explicit"),
        "did:web:x.example": ("explicit",),
    }
    with pytest.raises(SyntaxError_):
        await gaps(store, explicit_dids=["not-a-did"])


async def test_enqueue_is_idempotent(store: SetupStore) -> None:
    add_coverage(store, h(-48), h(60))
    add_repo(store, "did:plc:fresh", first_seen=h(1), last_event=h(5))
    report = await gaps(store)
    assert store.enqueue(report.reasons_by_did) == 1
    assert store.enqueue(report.reasons_by_did) == 0
    assert store.fetchall("SELECT did, reasons, state FROM backfill_queue") == [
        ("did:plc:fresh", ["never_backfilled"], "pending")]


def test_downtime_spans_running_and_empty() -> None:
    # no coverage at all: the whole window (clipped to now) is downtime
    assert downtime_spans([], start=h(0), end=h(10), now=h(5)) == [(h(0), h(5))]
    # a running consumer covers up to now
    assert downtime_spans([(h(-1), h(2), True)], start=h(0), end=h(10), now=h(5)) == []
    assert downtime_spans([(h(1), h(2), False), (h(3), h(20), False)], start=h(0), end=h(10), now=h(30)) == [
        (h(0), h(1)), (h(2), h(3))]


def test_cli_gaps_json_and_enqueue(store: SetupStore, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from skyfill.cli import main

    add_coverage(store, h(-48), h(60))
    add_repo(store, "did:plc:fresh", first_seen=h(1), last_event=h(5))
    store.close()
    args = ["gaps", "--db", store.path, "--start", "2025-03-10", "--end", "2025-03-10", "--no-audit", "--json",
            "--enqueue", "--dids", "did:web:x.example"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    data = json.loads(first.output)
    assert data["dids"] == {"did:plc:fresh": ["never_backfilled"], "did:web:x.example": ["explicit"]}
    assert data["counts"]["never_backfilled"] == 1 and data["enqueued"] == 2
    again = CliRunner().invoke(main, args)
    assert json.loads(again.output)["enqueued"] == 0
    bad = CliRunner().invoke(main, ["gaps", "--db", store.path, "--start", "2025-03-11", "--end", "2025-03-10"])
    assert bad.exit_code != 0 and "before" in bad.output
