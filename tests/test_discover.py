"""Discovery against real HTTP servers on 127.0.0.1 (tests/support/faultserver.py): paging, resume
after a kill, a relay's hosts listed in parallel, hostile hosts counted and skipped; and the
whole-network gap reasons (unseen, stale, filter_changed) over a store.

The reference PDS versions of these (idle accounts found and backfilled, a stale repo refetched)
are in tests/test_discover_pds.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from skyfill.app.network import run_discover
from skyfill.backfill.config import BackfillConfig
from skyfill.backfill.gaps import Reason, detect_gaps
from skyfill.backfill.network import covers
from skyfill.cli.main import main
from skyfill.net.listing import LIST_HOSTS, LIST_REPOS, host_url
from skyfill.storage import Store
from skyfill.storage.discovery import ListedRow
from tests.support.faultserver import FaultServer, Reply, Seen, json_reply
from tests.support.store import SetupStore
from tests.support.wait import poll

LIST_REPOS_PATH = f"/xrpc/{LIST_REPOS}"
LIST_HOSTS_PATH = f"/xrpc/{LIST_HOSTS}"
_B32 = "234567abcdefghijklmnopqrstuvwxyz"
CONFIG = BackfillConfig(allow_private_hosts=True, per_host_rps=500.0, request_retries=0)


def did(n: int) -> str:
    return "did:plc:" + "".join(_B32[(n >> (5 * i)) & 31] for i in range(24))


def tid(n: int) -> str:
    return "3l" + "".join(_B32[(n >> (5 * i)) & 31] for i in reversed(range(11)))


def repo(n: int, rev: int = 1, active: bool = True) -> dict[str, object]:
    return {"did": did(n), "head": f"bafyhead{n}", "rev": tid(rev), "active": active}


def pages(*chunks: list[dict[str, object]]) -> Callable[[Seen], Reply]:
    """A listRepos handler: page i answers with chunks[i] and cursor "c{i+1}" (none after the last)."""

    def handler(seen: Seen) -> Reply:
        i = int(seen.query["cursor"][1:]) if "cursor" in seen.query else 0
        body: dict[str, object] = {"repos": chunks[i] if i < len(chunks) else []}
        if i < len(chunks):
            body["cursor"] = f"c{i + 1}"  # like the reference PDS: a cursor even on the last page
        return json_reply(body)

    return handler


@pytest.fixture
def servers() -> Iterator[list[FaultServer]]:
    started = [FaultServer().start() for _ in range(4)]
    try:
        yield started
    finally:
        for srv in started:
            srv.stop()


def listed(store: Store) -> list[tuple[str, str]]:
    return [(d, h) for d, h in store.fetchall("SELECT did, host FROM listed_repos ORDER BY n")]


def test_single_pds_is_listed_page_by_page(tmp_path: Path, server: FaultServer) -> None:
    server.script(LIST_REPOS_PATH, pages([repo(1), repo(2)], [repo(3)]))
    with Store(tmp_path / "d.duckdb") as store:
        summary = asyncio.run(run_discover(store, relay=server.url, config=CONFIG))
        assert summary.mode == "pds" and summary.listed == 3 and summary.pages == 3 and not summary.errors
        assert [d for d, _ in listed(store)] == [did(1), did(2), did(3)]
        (cursor,) = store.enum_cursors()
        assert (cursor.host, cursor.endpoint, cursor.done, cursor.items) == (server.url, LIST_REPOS, True, 3)
        # a finished run is listed again from the start by the next one
        again = asyncio.run(run_discover(store, relay=server.url, config=CONFIG))
        assert again.fresh and again.listed == 3
    assert [s.query.get("cursor") for s in server.seen(LIST_REPOS_PATH)] == [None, "c1", "c2"] * 2


def test_relay_hosts_in_parallel_and_hostile_hosts_skipped(tmp_path: Path, servers: list[FaultServer]) -> None:
    relay, good, garbage, huge = servers
    name = {s: f"127.0.0.1:{s.port}" for s in servers}
    relay.script(LIST_HOSTS_PATH,
                 lambda seen: json_reply({"hosts": [{"hostname": name[good], "status": "active"},
                                                    {"hostname": "bad/host?x"},
                                                    {"hostname": "banned.example", "status": "banned"}],
                                          "cursor": "h1"}) if "cursor" not in seen.query
                 else json_reply({"hosts": [{"hostname": name[garbage]}, {"hostname": name[huge]}]}))
    good.script(LIST_REPOS_PATH, pages(
        [repo(1), {"did": "not-a-did", "head": "x", "rev": tid(1)}, 5, {"did": did(9), "head": "x", "rev": "nope"}],
        [repo(2), {"did": did(10) + "\n", "head": "x", "rev": tid(1)}]))
    garbage.script(LIST_REPOS_PATH, Reply(200, b'{"repos": [{"did": "did:plc:', {"Content-Type": "application/json"}))
    huge.script(LIST_REPOS_PATH, Reply(200, b'{"repos": [' + b" " * (17 * 1024 * 1024) + b"]}", chunked=True))
    with Store(tmp_path / "d.duckdb") as store:
        summary = asyncio.run(run_discover(store, relay=relay.url, config=CONFIG))
        assert summary.mode == "relay" and summary.hosts == 3 and summary.hosts_done == 1
        assert summary.listed == 2 and summary.skipped == 1 + 4  # one hostname, four repo entries
        assert set(summary.errors) == {host_url(name[garbage], allow_private=True),
                                       host_url(name[huge], allow_private=True)}
        assert "invalid JSON" in summary.errors[garbage.url] and "exceeds" in summary.errors[huge.url]
        assert [d for d, _ in listed(store)] == [did(1), did(2)]
        rows = {c.host: c for c in store.enum_cursors(endpoints=[LIST_REPOS])}
        assert rows[good.url].done and rows[good.url].skipped == 4
        assert not rows[garbage.url].done and "invalid JSON" in (rows[garbage.url].error or "")
    assert relay.count(LIST_REPOS_PATH) == 0  # a relay that lists hosts is not enumerated itself


def test_a_killed_run_resumes_from_the_stored_cursor(tmp_path: Path, server: FaultServer) -> None:
    chunks = [[repo(1), repo(2)], [repo(3), repo(4)], [repo(5)]]
    normal = pages(*chunks)
    stalled: list[Seen] = []

    def handler(seen: Seen) -> Reply:
        if seen.query.get("cursor") == "c2" and not stalled:
            stalled.append(seen)
            return Reply(200, b"{}", delay=120.0)  # the first process is killed while waiting here
        return normal(seen)

    server.script(LIST_REPOS_PATH, handler)
    db = tmp_path / "d.duckdb"
    proc = subprocess.Popen(
        [sys.executable, "-m", "skyfill", "--log-json", "discover", "--db", str(db), "--relay", server.url,
         "--allow-private-hosts"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        poll(lambda: stalled, timeout=60, what="the third page to be asked for")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with Store(db) as store:
        assert sorted(d for d, _ in listed(store)) == [did(n) for n in (1, 2, 3, 4)]  # two pages stored
        before = server.count(LIST_REPOS_PATH)
        summary = asyncio.run(run_discover(store, relay=server.url, config=CONFIG))
        assert not summary.fresh and summary.pages == 2 and summary.listed == 1  # page 3, then the empty end
        assert [s.query.get("cursor") for s in server.seen(LIST_REPOS_PATH)[before:]] == ["c2", "c3"]
        assert sorted(d for d, _ in listed(store)) == [did(n) for n in range(1, 6)]  # each once
        (cursor,) = store.enum_cursors()
        assert cursor.done and cursor.items == 5


# -- the gap reasons ----------------------------------------------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def add_repo(store: SetupStore, d: str, rev: str | None, *, backfilled: bool = True,
             status: str | None = None) -> None:
    store.execute_write(
        "INSERT INTO repo_base (did, rev, first_seen_at, last_event_at, sync_state, backfilled_at, backfill_status, k) "
        "VALUES (?, ?, ?, ?, 'synchronized', ?, ?, md5_number_lower(?))",
        [d, rev, T0, T0, T0 if backfilled else None, status, d])


def test_unseen_stale_and_filter_changed(tmp_path: Path) -> None:
    with SetupStore(tmp_path / "g.duckdb") as store:
        add_repo(store, did(1), tid(5))                   # listed newer: stale
        add_repo(store, did(2), tid(5))                   # listed at the same rev: nothing
        add_repo(store, did(3), tid(1), status="RepoTakendown")  # terminal: never stale
        add_repo(store, did(4), None)                     # held with no rev: stale
        store.save_listing("h", LIST_REPOS, [
            ListedRow(did(1), "x", tid(6), True, None), ListedRow(did(2), "x", tid(5), True, None),
            ListedRow(did(3), "x", tid(9), True, None), ListedRow(did(4), "x", tid(2), True, None),
            ListedRow(did(5), "x", tid(1), True, None),    # never held: unseen
            ListedRow(did(6), "x", tid(1), False, "deactivated"),  # inactive: not a gap
        ], cursor=None, skipped=0)
        # a collection listing (no rev) after the repo listing keeps the listed rev
        store.save_listing("r", "listReposByCollection:app.bsky.feed.post",
                           [ListedRow(did(1), None, None, None, None), ListedRow(did(7), None, None, None, None)],
                           cursor=None, skipped=0)
        for n in (10, 11, 12):
            add_repo(store, did(n), tid(1))
        store.record_backfill_filter([did(10)], "app.bsky.feed.post")
        store.record_backfill_filter([did(11)], "app.bsky.feed.*")
        store.record_backfill_filter([did(12)], "app.bsky.feed.post")
        store.record_backfill_filter([did(12)], "*")      # backfilled whole since: covered

        def report(collections: tuple[str, ...]) -> dict[str, list[str]]:
            found = asyncio.run(detect_gaps(store, start=T0, end=T0 + timedelta(days=1), audit=None,
                                            collections=collections, now=T0 + timedelta(days=1)))
            return {r.value: sorted(d for d, rs in found.reasons_by_did.items() if r.value in rs)
                    for r in (Reason.UNSEEN, Reason.STALE, Reason.FILTER_CHANGED)}

        assert report(()) == {"unseen": sorted([did(5), did(7)]), "stale": sorted([did(1), did(4)]),
                              "filter_changed": []}
        assert report(("app.bsky.feed.like",))["filter_changed"] == [did(10)]
        assert report(("app.bsky.feed.*",))["filter_changed"] == [did(10)]
        assert report(("app.bsky.graph.follow",))["filter_changed"] == sorted([did(10), did(11)])


def test_covers() -> None:
    assert covers("*", ["app.bsky.feed.post", "x.y.*"])
    assert covers("app.bsky.feed.*", ["app.bsky.feed.post", "app.bsky.feed.threadgate.*"])
    assert not covers("app.bsky.feed.*", ["app.bsky.graph.follow"])
    assert not covers("app.bsky.feed.post", ["app.bsky.feed.*"])
    assert not covers("app.bsky.feed.post", ["*"])
    assert covers("app.bsky.feed.like,app.bsky.feed.post", ["app.bsky.feed.post"])


def test_a_failed_list_hosts_then_a_single_pds(tmp_path: Path, server: FaultServer) -> None:
    # the first listHosts answer is over the page cap (a failure, recorded); then the host says it
    # is no relay: its own listRepos is listed, and the run after lists it again from the start
    server.script(LIST_HOSTS_PATH, Reply(200, b"{}", content_length=64 * 1024 * 1024),
                  json_reply({"error": "MethodNotImplemented"}, 501))
    server.script(LIST_REPOS_PATH, pages([repo(1)]))
    with Store(tmp_path / "d.duckdb") as store:
        failed = asyncio.run(run_discover(store, relay=server.url, config=CONFIG))
        assert failed.mode == "relay" and failed.hosts == 0 and "exceeds" in failed.errors[server.url]
        second = asyncio.run(run_discover(store, relay=server.url, config=CONFIG))
        assert (second.mode, second.fresh, second.listed, second.errors) == ("pds", False, 1, {})
        third = asyncio.run(run_discover(store, relay=server.url, config=CONFIG))
        assert (third.mode, third.fresh, third.listed) == ("pds", True, 1)


def test_cli_gaps_discover_and_identities_sync(tmp_path: Path, server: FaultServer) -> None:
    server.script(LIST_REPOS_PATH, pages([repo(1), repo(2)]))
    server.script("/export", Reply(200, b"", {"Content-Type": "application/jsonlines"}))
    db = str(tmp_path / "c.duckdb")
    runner = CliRunner()
    out = runner.invoke(main, ["gaps", "--db", db, "--start", "2026-01-01", "--end", "2026-01-02", "--no-audit",
                               "--discover", "--relay", server.url, "--allow-private-hosts",
                               "--collections", "app.bsky.feed.*", "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["discovery"]["listed"] == 2 and report["counts"]["unseen"] == 2
    assert sorted(report["dids"]) == [did(1), did(2)]
    out = runner.invoke(main, ["identities", "sync", "--db", db, "--plc-url", server.url, "--allow-private-hosts"])
    assert out.exit_code == 0 and "(complete)" in out.output, out.output
    out = runner.invoke(main, ["discover", "--db", db, "--relay", server.url, "--collection", "app.bsky.feed.*"])
    assert out.exit_code != 0 and "exact NSIDs" in out.output
