"""The backfiller end to end: a real local HTTP server plays the PLC directory and the PDS,
serving signed repo CARs (tests.support.generate) and scripted faults; the store is a real
DuckDB file."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.support.faultserver import FaultServer, Reply, json_reply, rate_limited, xrpc_error

from skyfill.backfill.backfiller import open_backfiller, recover_queue
from skyfill.backfill.config import BackfillConfig
from skyfill.backfill.gaps import PdsAuditor
from skyfill.protocol.repo import parse_repo
from tests.support.generate.identity import did_document, make_identity
from tests.support.store import SetupStore
from tests.support.served import GET_REPO, World
from tests.support.wire import read_varint


@pytest.fixture
def srv() -> Iterator[FaultServer]:
    with FaultServer() as s:
        yield s


@pytest.fixture
def world(srv: FaultServer) -> World:
    return World(srv)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SetupStore]:
    s = SetupStore(tmp_path / "bf.duckdb")
    yield s
    s.close()


def doc_with_wrong_key(did: str, srv: FaultServer, seed: int) -> dict[str, Any]:
    """A well-formed DID document for `did` whose #atproto key belongs to someone else."""
    doc = did_document(make_identity(random.Random(seed)), srv.url)
    doc["id"] = did
    for vm in doc["verificationMethod"]:
        vm["controller"] = did
        vm["id"] = f"{did}#atproto"
    return doc


def config(srv: FaultServer, **kw: Any) -> BackfillConfig:
    kw.setdefault("request_backoff", 0.01)
    return BackfillConfig(plc_url=srv.url, allow_private_hosts=True, concurrency=4, **kw)


def repo_row(store: SetupStore, did: str) -> dict[str, Any]:
    cols = ["rev", "data_cid", "sync_state", "backfill_status", "backfill_error", "backfill_attempts",
            "backfill_retry_after", "backfilled_at"]
    rows = store.fetchall(f"SELECT {', '.join(cols)} FROM repos WHERE did = ?", [did])
    assert rows, did
    return dict(zip(cols, rows[0], strict=True))


def stored(store: SetupStore, did: str) -> dict[tuple[str, str], str]:
    return {(c, k): cid for c, k, cid in store.fetchall(
        "SELECT collection, rkey, cid FROM records WHERE did = ?", [did])}


def block_boundaries(car: bytes) -> list[int]:
    """Offsets where each CAR section (header, then each block) ends."""
    out, pos = [], 0
    while pos < len(car):
        n, pos = read_varint(car, pos)
        pos += n
        out.append(pos)
    return out


async def test_reconcile_adds_updates_deletes(store: SetupStore, world: World, srv: FaultServer) -> None:
    ident, car = world.account(n_records=30)
    did = ident.did
    truth = parse_repo(car, did=did, key=None)
    keys = sorted(truth.records)
    matching, changed, missing = keys[:10], keys[10:15], keys[15:]
    vanished = [("app.bsky.feed.like", "3kgone000000a"), ("app.bsky.feed.post", "3kgone000000b")]
    now = datetime.now(UTC)
    store.put_records(
        (did, key[0], key[1], cid, "{}", None, None)
        for key, cid in [(k, truth.records[k]) for k in matching] + [(k, "bafyreistale") for k in changed] + [
            (k, "bafyreivanished") for k in vanished])
    store.execute_write(
        "INSERT INTO repo_base (did, first_seen_at, sync_state, desynced_at, k) "
        "VALUES (?, ?, 'desynchronized', ?, md5_number_lower(?))", [did, now, now, did])

    async with open_backfiller(store, config=config(srv)) as bf:
        summary = await bf.run([did])

    assert (summary.repos_ok, summary.records_added, summary.records_updated, summary.records_deleted,
            summary.records_unchanged) == (1, len(missing), len(changed), len(vanished), len(matching))
    assert stored(store, did) == truth.records
    row = repo_row(store, did)
    assert (row["rev"], row["data_cid"], row["sync_state"], row["backfill_status"]) == (
        truth.rev, truth.data_cid, "synchronized", "ok")
    assert row["backfilled_at"] is not None
    # record bodies were decoded from the CAR, with createdAt
    bodies = store.fetchall("SELECT count(*) FROM records WHERE did = ? AND record::VARCHAR LIKE '%createdAt%'"
                            " AND created_at IS NOT NULL", [did])
    assert bodies[0][0] >= len(missing) + len(changed) - 1  # the profile has no createdAt
    # a second run changes nothing
    async with open_backfiller(store, config=config(srv)) as bf:
        again = await bf.run([did])
    assert (again.records_added, again.records_updated, again.records_deleted, again.records_unchanged) == (
        0, 0, 0, len(keys))


@pytest.mark.parametrize(
    ("reply", "status"),
    [(xrpc_error("RepoTakendown", "gone"), "RepoTakendown"), (xrpc_error("RepoNotFound", "?"), "RepoNotFound"),
     (xrpc_error("RepoDeactivated", "zzz"), "RepoDeactivated")],
)
async def test_terminal_fetch_outcomes_recorded_and_not_retried(
    store: SetupStore, world: World, srv: FaultServer, reply: Reply, status: str
) -> None:
    ident, _ = world.account()
    world.repos[ident.did] = [reply]
    store.enqueue({ident.did: ["explicit"]})
    async with open_backfiller(store, config=config(srv)) as bf:
        summary = await bf.run_queue()
        assert summary.failed == {status: 1} and summary.repos_ok == 0
        row = repo_row(store, ident.did)
        assert row["backfill_status"] == status and row["backfill_retry_after"] is None
        assert row["backfilled_at"] is None and row["sync_state"] != "synchronized"
        assert store.fetchall("SELECT state FROM backfill_queue")[0][0] == "failed"
        # the queue never hands it out again
        again = await bf.run_queue()
    assert again.repos_ok == 0 and again.repos_failed == 0
    assert world.repo_hits[ident.did] == 1


async def test_invalid_did_document_is_terminal(store: SetupStore, world: World, srv: FaultServer) -> None:
    ident, _ = world.account()
    doc = dict(world.docs[ident.did])
    doc["service"] = []  # no #atproto_pds
    world.set_doc(ident.did, doc)
    store.enqueue({ident.did: ["explicit"]})
    async with open_backfiller(store, config=config(srv)) as bf:
        summary = await bf.run_queue()
        again = await bf.run_queue()
    assert again.repos_ok == 0 and again.repos_failed == 0  # nothing left to claim
    assert summary.failed == {"InvalidDidDocument": 1}
    assert repo_row(store, ident.did)["backfill_status"] == "InvalidDidDocument"
    assert world.repo_hits.get(ident.did, 0) == 0


async def test_signature_failure_reresolves_once_then_terminal(store: SetupStore, world: World, srv: FaultServer) -> None:
    ident, _ = world.account()
    world.set_doc(ident.did, doc_with_wrong_key(ident.did, srv, 99))
    store.enqueue({ident.did: ["explicit"]})
    async with open_backfiller(store, config=config(srv)) as bf:
        summary = await bf.run_queue()
        assert (await bf.run_queue()).repos_failed == 0
    assert summary.failed == {"SignatureFailed": 1}
    assert world.plc_hits[ident.did] == 2  # cached resolve, then exactly one fresh re-resolve
    row = repo_row(store, ident.did)
    assert row["backfill_status"] == "SignatureFailed" and row["backfill_retry_after"] is None
    assert stored(store, ident.did) == {}


async def test_rotated_key_recovers_on_fresh_resolve(store: SetupStore, world: World, srv: FaultServer) -> None:
    ident, car = world.account()
    good = world.docs[ident.did]
    wrong = doc_with_wrong_key(ident.did, srv, 5)
    # the cache holds a stale document with an old key; PLC now serves the current one
    world.set_doc(ident.did, wrong)
    async with open_backfiller(store, config=config(srv)) as bf:
        await bf.resolver.resolve(ident.did)
        world.set_doc(ident.did, good)
        summary = await bf.run([ident.did])
    assert summary.repos_ok == 1
    assert stored(store, ident.did) == parse_repo(car, did=ident.did, key=None).records


async def test_no_verify_skips_signature(store: SetupStore, world: World, srv: FaultServer) -> None:
    ident, car = world.account()
    world.set_doc(ident.did, doc_with_wrong_key(ident.did, srv, 5))
    async with open_backfiller(store, config=config(srv, verify=False)) as bf:
        summary = await bf.run([ident.did])
    assert summary.repos_ok == 1


async def test_500_then_success(store: SetupStore, world: World, srv: FaultServer) -> None:
    ident, car = world.account()
    world.repos[ident.did] = [Reply(500, b"oops"), Reply(503, b"busy")] + world.repos[ident.did]
    async with open_backfiller(store, config=config(srv)) as bf:
        summary = await bf.run([ident.did])
    assert summary.repos_ok == 1 and summary.repos_failed == 0
    assert world.repo_hits[ident.did] == 3
    assert repo_row(store, ident.did)["backfill_status"] == "ok"


async def test_truncated_car_is_retryable_and_not_done(store: SetupStore, world: World, srv: FaultServer) -> None:
    ident, car = world.account(n_records=10)
    cut = block_boundaries(car)[-3]  # ends exactly at a block boundary: the CAR itself parses
    world.repos[ident.did] = [Reply(200, car[:cut])]
    store.enqueue({ident.did: ["never_backfilled"]})
    async with open_backfiller(store, config=config(srv)) as bf:
        summary = await bf.run_queue()
    assert summary.failed == {"retrying": 1}
    row = repo_row(store, ident.did)
    assert row["backfill_status"] == "retrying" and row["backfilled_at"] is None
    assert row["backfill_retry_after"] > datetime.now(UTC) + timedelta(seconds=20)
    assert "missing" in row["backfill_error"]
    # the attempt is counted once, on the repo row (the queue row only says when it is due again)
    queue = store.fetchall("SELECT q.state, r.backfill_attempts, q.retry_after IS NOT NULL "
                           "FROM backfill_queue q JOIN repos r USING (did)")
    assert queue == [("pending", 1, True)]
    assert stored(store, ident.did) == {}

    # once retry_after has passed and the PDS serves the whole CAR, the queue completes it
    world.repos[ident.did] = [Reply(200, car)]
    store.execute_write("UPDATE queue_log SET retry_after = now() - INTERVAL 1 MINUTE")
    async with open_backfiller(store, config=config(srv)) as bf:
        summary = await bf.run_queue()
    assert summary.repos_ok == 1
    assert store.fetchall("SELECT state FROM backfill_queue") == [("done",)]


async def test_transient_failures_end_in_failed(store: SetupStore, world: World, srv: FaultServer) -> None:
    ident, _ = world.account()
    world.repos[ident.did] = [Reply(500, b"down")]
    async with open_backfiller(store, config=config(srv, request_retries=0, max_attempts=2)) as bf:
        first = await bf.run([ident.did])
        second = await bf.run([ident.did])
    assert first.failed == {"retrying": 1} and second.failed == {"Failed": 1}
    row = repo_row(store, ident.did)
    assert row["backfill_status"] == "Failed" and row["backfill_retry_after"] is None


async def test_run_queue_skips_rows_not_yet_due_and_recovers_stranded(store: SetupStore, world: World,
                                                                      srv: FaultServer) -> None:
    a, _ = world.account()
    b, _ = world.account()
    store.enqueue({a.did: ["explicit"], b.did: ["explicit"]})
    store.execute_write("UPDATE queue_log SET retry_after = now() + INTERVAL 1 HOUR WHERE did = ?", [a.did])
    store.execute_write("UPDATE queue_log SET state = 'in_progress' WHERE did = ?", [b.did])
    assert recover_queue(store) == 1
    async with open_backfiller(store, config=config(srv)) as bf:
        summary = await bf.run_queue()
    assert summary.repos_ok == 1
    assert dict(store.fetchall("SELECT did, state FROM backfill_queue")) == {a.did: "pending", b.did: "done"}


async def test_many_dids_concurrently(store: SetupStore, world: World, srv: FaultServer) -> None:
    accounts = [world.account(n_records=5) for _ in range(12)]
    async with open_backfiller(store, config=config(srv)) as bf:
        summary = await bf.run(i.did for i, _ in accounts)
    assert summary.repos_ok == 12
    assert store.fetchall("SELECT count(DISTINCT did) FROM records")[0][0] == 12


async def test_pds_auditor_flags_moved_heads(store: SetupStore, world: World, srv: FaultServer) -> None:
    # three accounts on one PDS: one moved past the held rev, one did not, one unknown to listRepos
    accounts = [world.account(n_records=2)[0] for _ in range(3)]
    moved, still, unlisted = (i.did for i in accounts)
    listing = [{"did": moved, "head": "bafyreia", "rev": "3lzzzzzzzzz22", "active": True},
               {"did": still, "head": "bafyreib", "rev": "3lbbbbbbbbb22", "active": True}]
    srv.script("/xrpc/com.atproto.sync.listRepos",
               lambda seen: json_reply({"repos": listing} if "cursor" not in seen.query
                                       else {"repos": []}))
    srv.script("/xrpc/com.atproto.sync.getLatestCommit", json_reply({"cid": "bafyreic", "rev": "3lccccccccc22"}))
    async with open_backfiller(store, config=config(srv)) as bf:
        audit = PdsAuditor(bf.client, bf.resolver, per_did_threshold=0)
        held = {"": [(moved, "3laaaaaaaaa22"), (still, "3lbbbbbbbbb22"), (unlisted, "3lccccccccc22")]}
        assert await audit(held) == {moved}
        # few DIDs on a host: getLatestCommit per DID instead of paging the whole host
        audit_small = PdsAuditor(bf.client, bf.resolver, per_did_threshold=10)
        assert await audit_small({srv.url: [(unlisted, "3laaaaaaaaa22")]}) == {unlisted}


async def test_rate_limited_host_defers_without_counting_an_attempt(store: SetupStore, world: World,
                                                                    srv: FaultServer) -> None:
    ident, _ = world.account()
    world.repos[ident.did] = [rate_limited(retry_after="120")]
    store.enqueue({ident.did: ["explicit"]})
    async with open_backfiller(store, config=config(srv)) as bf:
        summary = await bf.run_queue()
    assert summary.failed == {"deferred": 1} and summary.hosts_parked == 1
    state, retry_after = store.fetchall("SELECT state, retry_after FROM backfill_queue")[0]
    assert state == "pending" and store.backfill_attempts(ident.did) == 0
    assert retry_after > datetime.now(UTC) + timedelta(seconds=60)
    # a 429 is never a failure of the repo: nothing recorded on its row
    assert store.fetchall("SELECT count(*) FROM repos WHERE backfill_status IS NOT NULL")[0][0] == 0


# -- issue 9: the host guard, end to end (PLC on 127.0.0.2, no --allow-private-hosts) --------


def _plc_world(plc: FaultServer, endpoint: str) -> str:
    """One DID whose document, served by `plc`, names `endpoint` as its PDS."""
    ident = make_identity(random.Random(11))
    plc.script(f"/{ident.did}", json_reply(did_document(ident, endpoint)))
    return ident.did


ENDPOINTS = {
    "plc-host-other-port": "http://127.0.0.2:{port}",
    "octal": "http://0177.0.0.2:{port}",
    "hex": "http://0x7f.0.0.2:{port}",
    "integer": "http://2130706434:{port}",
    "short": "http://127.2:{port}",
    "70k": "http://127.0.0.2:{port}" + "0" * 70_000,
    "70k-host": "http://" + "a." * 35_000 + "com",
}


@pytest.mark.parametrize("allow_private", [False, True], ids=["guarded", "allow-private"])
@pytest.mark.parametrize("case", sorted(ENDPOINTS))
async def test_unsafe_pds_endpoint_is_refused_without_connecting(store: SetupStore, case: str, allow_private: bool) -> None:
    """Before: the PLC's host was trusted on ANY port (`plc-host-other-port` reached the
    victim), and `0177...` / 70,000 characters crashed the backfill with httpx.InvalidURL.
    Numeric spellings are refused even with allow_private_hosts (only `plc-host-other-port`
    is then a legitimate private PDS)."""
    if allow_private and case == "plc-host-other-port":
        pytest.skip("a private PDS is allowed with allow_private_hosts")
    with FaultServer("127.0.0.2") as plc, FaultServer("127.0.0.2") as victim:
        victim.script(GET_REPO, Reply(200, b"never"))
        did = _plc_world(plc, ENDPOINTS[case].replace("{port}", str(victim.port)))
        cfg = BackfillConfig(plc_url=plc.url, allow_private_hosts=allow_private, request_backoff=0.01)
        async with open_backfiller(store, config=cfg) as bf:
            summary = await asyncio.wait_for(bf.run([did]), 60)
        assert victim.connections_made() == 0
        assert plc.count(f"/{did}") >= 1  # the PLC itself was reachable
    assert summary.failed == {"UnsafeHost": 1}
    row = repo_row(store, did)
    assert row["backfill_status"] == "UnsafeHost" and row["backfill_retry_after"] is None


async def test_pds_on_the_plc_origin_is_not_a_plc_request(store: SetupStore) -> None:
    """Trust is per request: a DID document naming the PLC's own origin as its PDS does not
    make getRepo a PLC request."""
    with FaultServer("127.0.0.2") as plc:
        did = _plc_world(plc, plc.url)
        async with open_backfiller(store, config=BackfillConfig(plc_url=plc.url)) as bf:
            summary = await asyncio.wait_for(bf.run([did]), 60)
        assert plc.count(GET_REPO) == 0
    assert summary.failed == {"UnsafeHost": 1}


async def test_plc_redirect_to_its_host_on_another_port_is_refused(store: SetupStore) -> None:
    """Before: the redirect target `http://127.0.0.2:<other port>/x` passed as the PLC's host."""
    with FaultServer("127.0.0.2") as plc, FaultServer("127.0.0.2") as victim:
        did = _plc_world(plc, "https://pds.invalid")
        plc.script(f"/{did}", Reply(302, b"", {"Location": f"http://127.0.0.2:{victim.port}/x"}))
        async with open_backfiller(store, config=BackfillConfig(plc_url=plc.url, request_backoff=0.01)) as bf:
            summary = await asyncio.wait_for(bf.run([did]), 60)
        assert victim.connections_made() == 0
    # the operator's PLC misbehaving is not the DID's fault: retried later, not terminal
    assert summary.failed == {"retrying": 1}
    assert "refused" in repo_row(store, did)["backfill_error"]


@pytest.mark.parametrize(
    "location",
    ["http://127.2:{port}/x", "http://0177.0.0.2:{port}/x", "http://[::1:{port}/x", "http://127.0.0.2:{port}/" + "x" * 70_000],
    ids=["short", "octal", "unclosed-ipv6", "70k"],
)
async def test_pds_redirect_to_malformed_target_is_unsafe_host(store: SetupStore, world: World, srv: FaultServer,
                                                               location: str) -> None:
    with FaultServer("127.0.0.2") as victim:
        ident, _ = world.account()
        world.repos[ident.did] = [Reply(302, b"", {"Location": location.replace("{port}", str(victim.port))})]
        async with open_backfiller(store, config=config(srv)) as bf:  # allow_private_hosts
            summary = await asyncio.wait_for(bf.run([ident.did]), 60)
        assert victim.connections_made() == 0
    assert summary.failed == {"UnsafeHost": 1}
    assert repo_row(store, ident.did)["backfill_status"] == "UnsafeHost"


# -- issue 10: time is bounded ---------------------------------------------------------------


async def test_trickling_pds_ends_in_retrying(store: SetupStore, world: World, srv: FaultServer) -> None:
    """Before: 1 byte every 2 s kept the backfill alive until the 900 s total timeout."""
    ident, car = world.account()
    world.repos[ident.did] = [Reply(200, car, trickle=0.1)]
    cfg = config(srv, min_transfer_bytes=1024, transfer_window=1.0, request_retries=0)
    async with open_backfiller(store, config=cfg) as bf:
        summary = await asyncio.wait_for(bf.run([ident.did]), 60)
    assert summary.failed == {"retrying": 1}
    row = repo_row(store, ident.did)
    assert "stalled" in row["backfill_error"] and row["backfill_retry_after"] is not None
    assert row["rev"] is None  # nothing half-stored


async def test_always_429_host_ends_a_list_backfill(store: SetupStore, world: World, srv: FaultServer) -> None:
    """Before: `backfill --dids` against a host answering 429 forever never finished. Now,
    past the patience (2 s here, 10 min by default) the DID is recorded 'retrying' with
    retry_after = the park's end, no attempt counted, and the run ends; no request was sent
    before a Retry-After expired."""

    ident, _ = world.account()
    world.repos[ident.did] = [rate_limited(retry_after="1")]
    cfg = config(srv, rate_limit_patience=timedelta(seconds=2))
    async with open_backfiller(store, config=cfg) as bf:
        summary = await asyncio.wait_for(bf.run([ident.did]), 60)
    assert summary.failed == {"deferred": 1} and summary.repos_ok == 0
    row = repo_row(store, ident.did)
    assert row["backfill_status"] == "retrying" and row["backfill_attempts"] == 0
    assert "rate limited" in row["backfill_error"]
    answers = [a for a in srv.answered if a.request.path == GET_REPO]
    assert len(answers) >= 2 and all(a.status == 429 for a in answers)
    # retry_after is the end of the park the last 429 asked for (1 s after it was answered)
    assert row["backfill_retry_after"].timestamp() >= answers[-1].request.at + 1 - 1e-3
    arrivals = [a.request.at for a in answers]
    for before, after in zip(answers, arrivals[1:]):
        assert after >= before.request.at + 1  # never before the Retry-After expired
