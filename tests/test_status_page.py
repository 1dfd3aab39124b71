"""The status page (app/status_page.py, status_html.py, status_server.py).

Unit tests of the page model on a real DuckDB file: coverage spans and downtime in a window, what
backfill repaired (per bucket, per enqueue reason), the queue per host, the window's query forms.
Then the page itself in a real headless Chromium (Debian package `chromium`, tests/support/chromium.py):
served by a `skyfill consume` daemon at `/` of its metrics port after a run against the local
reference PDS with a downtime and a backfill, with no console error and the key numbers in the DOM;
and `skyfill status --html FILE` from the file once the daemon stopped. Screenshots are kept in
tests/artifacts/ (gitignored).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from skyfill.app.daemon_client import call_daemon
from skyfill.app.live import IngestHistory, backfill_hosts
from skyfill.app.status_html import CachedPages, render
from skyfill.app.status_page import build_page, page_window
from skyfill.app.status_server import StatusServer
from skyfill.backfill.gaps import detect_gaps
from skyfill.errors import ConfigError
from skyfill.storage.timeline import timeline_report
from tests.support.chromium import ARTIFACTS, Chromium, Visit
from tests.support.daemon import ROOT, announced, reap, spawn_consume, stored_cursor
from tests.support.network import LocalNetwork, PdsAccount, PdsClient, post_record
from tests.support.oracle import commit_seq, head_seq
from tests.support.store import SetupStore
from tests.support.wait import free_port, poll

T0 = datetime(2025, 3, 10, tzinfo=UTC)
POST = "app.bsky.feed.post"


def h(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def add_coverage(store: SetupStore, first: datetime, last: datetime | None, ended: str = "clean",
                 seqs: tuple[int, int] = (1, 100), stopped: datetime | None = None) -> None:
    store.execute_write(
        "INSERT INTO coverage (source, first_seq, last_seq, first_event_at, last_event_at, started_at, stopped_at, "
        "ended) VALUES ('wss://relay', ?, ?, ?, ?, ?, ?, ?)",
        [seqs[0], seqs[1], first, last, first, stopped or last, ended],
    )


def add_repo(store: SetupStore, did: str, *, backfilled_at: datetime | None = None, backfill_status: str | None = None,
             sync_state: str = "synchronized", first_seen: datetime = T0) -> None:
    store.execute_write(
        "INSERT INTO repo_base (did, rev, first_seen_at, last_event_at, sync_state, backfilled_at, backfill_status, "
        "active, status, k) VALUES (?, '3laaaaaaaaa22', ?, ?, ?, ?, ?, true, 'active', md5_number_lower(?))",
        [did, first_seen, first_seen, sync_state, backfilled_at, backfill_status, did],
    )


def add_queued(store: SetupStore, did: str, *, reasons: list[str], state: str, updated: datetime,
               host: str | None) -> None:
    store.execute_write(
        "INSERT INTO queue_base (did, reasons, enqueued_at, state, updated_at, host) VALUES (?, ?, ?, ?, ?, ?)",
        [did, reasons, updated - timedelta(minutes=5), state, updated, host],
    )


@pytest.fixture
def store(tmp_path: Path) -> SetupStore:
    s = SetupStore(tmp_path / "page.duckdb")
    yield s
    s.close()


@pytest.fixture
def fabricated(store: SetupStore) -> SetupStore:
    """Window [0 h, 24 h]: runs [-2, 6] and [9, 20] (clean), [22, now] running -> downtime [6, 9] and
    [20, 22]; backfills: 3 ok and 1 failure inside the window, 1 ok before it; queue rows done for
    downtime (2) and desynchronized (1), one failed, two pending on a second host."""
    add_coverage(store, h(-2), h(6), seqs=(1, 801))
    add_coverage(store, h(9), h(20), seqs=(900, 2000), stopped=h(20.5))
    add_coverage(store, h(22), h(23), ended="running", seqs=(2100, 2200))
    add_repo(store, "did:plc:early", backfilled_at=h(-1), backfill_status="ok")
    for i, at in enumerate((h(9.5), h(9.6), h(21))):
        add_repo(store, f"did:plc:ok{i}", backfilled_at=at, backfill_status="ok")
    add_repo(store, "did:plc:broken", sync_state="desynchronized")
    add_queued(store, "did:plc:ok0", reasons=["downtime"], state="done", updated=h(9.5), host="https://a.example")
    add_queued(store, "did:plc:ok1", reasons=["downtime", "desynchronized"], state="done", updated=h(9.6),
               host="https://a.example")
    add_queued(store, "did:plc:gone", reasons=["downtime"], state="failed", updated=h(10), host="https://a.example")
    add_queued(store, "did:plc:p1", reasons=["never_backfilled"], state="pending", updated=h(11), host="https://b.example")
    add_queued(store, "did:plc:p2", reasons=["never_backfilled"], state="pending", updated=h(11), host="https://b.example")
    return store


def test_timeline_counts_spans_repairs_and_queue_hosts(fabricated: SetupStore) -> None:
    t = timeline_report(fabricated, since=h(0), until=h(24), buckets=24)
    assert [(s.first_event_at, s.ended) for s in t.spans] == [(h(-2), "clean"), (h(9), "clean"), (h(22), "running")]
    assert (t.repaired_ok, t.repaired_failed) == (3, 1)  # the backfill before the window is not counted
    assert [(b, ok, bad) for b, ok, bad in t.repaired_buckets] == [(h(9), 2, 0), (h(10), 0, 1), (h(21), 1, 0)]
    assert t.repaired_by_reason == {"downtime": 2, "desynchronized": 1}
    assert t.queue_by_host == (("https://b.example", {"pending": 2}), ("https://a.example", {"done": 2, "failed": 1}))
    # a window that misses a run leaves it out
    assert [s.first_event_at for s in timeline_report(fabricated, since=h(7), until=h(8)).spans] == []


def test_timeline_counts_retrying_repos_in_and_out_of_the_window(fabricated: SetupStore) -> None:
    """One read of `repos` gives both the window's repairs and every retrying repo (storage/timeline.py)."""
    add_repo(fabricated, "did:plc:retry-out", backfill_status="retrying")  # never backfilled: no bucket
    add_repo(fabricated, "did:plc:retry-in", backfilled_at=h(10.5), backfill_status="retrying")
    t = timeline_report(fabricated, since=h(0), until=h(24), buckets=24)
    assert t.retrying == 2
    assert (t.repaired_ok, t.repaired_failed) == (3, 2)
    assert [(b, ok, bad) for b, ok, bad in t.repaired_buckets] == [(h(9), 2, 0), (h(10), 0, 2), (h(21), 1, 0)]


def test_timeline_lumps_hosts_past_the_limit(store: SetupStore) -> None:
    for i in range(5):
        add_queued(store, f"did:plc:q{i}", reasons=["explicit"], state="pending", updated=h(1), host=f"https://h{i}")
    t = timeline_report(store, since=h(0), until=h(2), max_hosts=3)
    assert [host for host, _ in t.queue_by_host] == ["https://h0", "https://h1", "https://h2", "other (2 hosts)"]
    assert t.queue_by_host[-1][1] == {"pending": 2}


async def test_page_model_downtime_repairs_and_history_from_runs(fabricated: SetupStore) -> None:
    page = await build_page(fabricated, since=h(0), until=h(24), source="page.duckdb", now=h(23))
    # runs cover [-2, 6], [9, 20], [22, now=23]: downtime [6, 9] and [20, 22]; the window ends at now
    assert page.downtime == ((h(6), h(9)), (h(20), h(22)))
    assert page.downtime_seconds == 5 * 3600
    assert page.covered_fraction == pytest.approx(1 - 5 / 23)
    assert page.timeline.repaired_ok == 3
    assert page.history_kind == "runs" and page.hosts_kind == "queue"
    # one step per run: seq/s between its first and last event, and the lag it stopped at
    assert [(p.at, round(p.rate, 4), p.lag) for p in page.history[:4]] == [
        (h(-2), round(800 / (8 * 3600), 4), None), (h(6), round(800 / (8 * 3600), 4), 0.0),
        (h(9), round(1100 / (11 * 3600), 4), None), (h(20), round(1100 / (11 * 3600), 4), 1800.0)]
    assert page.history[-1].lag == 0.0  # the running run: now - its last event (23 - 23)
    assert page.to_repair.get("desynchronized") == 1  # did:plc:broken, never repaired
    html = render(page)
    assert html.count('class="downtime"') == 2 and html.count('class="span"') == 3
    for ident, text in (("downtime-count", "2"), ("repaired-ok", "3"), ("repaired-failed", "1"),
                        ("desynchronized", "1"), ("consumer", "running"), ("covered", "78.3%")):
        assert re.search(rf'id="{ident}">{re.escape(text)}<', html), (ident, text)
    assert "<script" not in html and "http://" not in html and "https://b.example" in html


async def test_still_to_repair_leaves_out_downtime_dids_backfilled_after_the_downtime(fabricated: SetupStore) -> None:
    # the no-audit rule flags every active DID seen near a downtime stretch, backfilled since or not
    add_repo(fabricated, "did:plc:late", backfilled_at=h(22.5), backfill_status="ok")
    gaps = await detect_gaps(fabricated, start=h(0), end=h(24), audit=None, now=h(23))
    assert gaps.counts["downtime"] == 6 and "did:plc:late" in gaps.reasons_by_did
    page = await build_page(fabricated, since=h(0), until=h(24), source="x", now=h(23))
    assert page.to_repair["downtime"] == 5  # did:plc:late: reconciled after the last stretch ended (22 h)
    assert page.to_repair_total == gaps.total - 1
    assert re.search(r'id="to-repair">5<', render(page))


async def test_page_of_an_empty_store_renders(store: SetupStore) -> None:
    now = datetime.now(UTC)
    page = await build_page(store, since=now - timedelta(hours=1), until=now, source="empty", now=now)
    assert page.downtime == ((now - timedelta(hours=1), now),) and page.history == ()
    html = render(page)
    assert 'id="repos-total">0<' in html and "no samples in this window" in html


def test_page_window_forms() -> None:
    now = h(30)
    assert page_window({}, now) == (h(6), h(30))
    assert page_window({"since": "6h"}, now) == (h(24), h(30))
    assert page_window({"since": "2025-03-10", "until": "2025-03-10T12:00:00Z"}, now) == (h(0), h(12))
    assert page_window({"since": "1d", "until": "now"}, now) == (h(6), h(30))
    assert page_window({"until": "2025-03-10"}, now)[1] == h(24) - timedelta(microseconds=1)
    for bad in ({"since": "yesterday"}, {"since": "2025-03-11", "until": "2025-03-10T00:00:00"}):
        with pytest.raises(ConfigError):
            page_window(bad, now)


def test_history_ring_rates_and_window() -> None:
    ring = IngestHistory(interval=10, keep=timedelta(seconds=30))
    assert ring.samples.maxlen == 3
    base = h(0).timestamp()
    for i in range(5):
        ring.sample(base + 10 * i)
    points = ring.points(h(0), h(1))
    assert len(points) == 2 and all(p.stored_per_s == 0 for p in points)  # 3 kept -> 2 rates, no events here
    assert [p.at for p in points] == [h(0) + timedelta(seconds=30), h(0) + timedelta(seconds=40)]
    assert ring.points(h(2), h(3)) == []
    hosts, parked = backfill_hosts()
    assert isinstance(hosts, list) and isinstance(parked, list)


async def test_cached_pages_reuse_a_page_per_query_for_the_ttl(fabricated: SetupStore) -> None:
    pages = CachedPages(fabricated, source="cached", history=None, ttl=60, refresh=None)
    one = await pages({"since": "2025-03-10", "until": "2025-03-11"})
    assert await pages({"until": "2025-03-11", "since": "2025-03-10"}) is one  # same query, any order
    other = await pages({"since": "2025-03-10", "until": "2025-03-10T12:00:00"})
    assert other != one and 'id="downtime-count">1<' in other
    pages.ttl = 0
    assert await pages({"since": "2025-03-10", "until": "2025-03-11"}) is not one


async def test_server_serves_page_metrics_and_refuses_the_rest(fabricated: SetupStore) -> None:
    async def page(query: dict[str, str]) -> str:
        since, until = page_window(query, now=h(23))
        return render(await build_page(fabricated, since=since, until=until, source="test", now=h(23)))

    server = StatusServer(port=0, page=page)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, trust_env=False) as client:
            r = await client.get("/", params={"since": "2025-03-10", "until": "2025-03-10T23:00:00Z"})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
            assert 'id="downtime-count">2<' in r.text
            m = await client.get("/metrics")
            assert m.status_code == 200 and "skyfill_firehose_events_total" in m.text
            assert m.headers["content-type"].startswith("text/plain")
            bad = await client.get("/", params={"since": "soon"})
            assert bad.status_code == 400 and "not a date" in bad.text
            assert (await client.get("/nope")).status_code == 404
            assert (await client.post("/metrics")).status_code == 405
        taken = StatusServer(port=int(server.url.rsplit(":", 1)[1]), page=page)
        with pytest.raises(ConfigError, match="--metrics-port"):
            await taken.start()
    finally:
        await server.aclose()
    await asyncio.sleep(0)


def test_cli_status_html_writes_the_page_from_the_file(fabricated: SetupStore, tmp_path: Path) -> None:
    db = fabricated.path
    fabricated.close()
    out = tmp_path / "page.html"
    assert _cli("status", "--db", db, "--html", str(out), "--since", "2025-03-10", "--until",
                "2025-03-10T23:00:00Z").strip() == str(out)
    html = out.read_text()
    assert 'id="downtime-count">2<' in html and 'id="consumer">running<' in html and "<script" not in html
    bad = subprocess.run([sys.executable, "-m", "skyfill", "status", "--db", db, "--since", "6h"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--since/--until go with --html" in bad.stderr
    late = subprocess.run([sys.executable, "-m", "skyfill", "status", "--db", db, "--html", str(out), "--since",
                           "2025-03-11", "--until", "2025-03-10T12:00:00Z"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert late.returncode == 1 and "is not after since" in late.stderr


# -- the page in a real Chromium, served by a daemon after a run against the local reference PDS ----------


def _spawn(db: Path, net: LocalNetwork, port: int, *extra: str) -> subprocess.Popen[bytes]:
    return spawn_consume(db, net.pds_url, "--flush-interval", "0.05", "--batch-events", "50", "--metrics-port",
                         str(port), "--plc-url", net.plc_url, "--allow-private-hosts", *extra,
                         stderr=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def _visit(browser: Chromium, url: str, name: str) -> Visit:
    visit = browser.open(url, screenshot=ARTIFACTS / name)
    print(f"status page screenshot: {visit.screenshot}")
    assert visit.errors == [], visit.errors
    assert "<script" not in visit.html
    return visit


def test_chromium_renders_the_daemons_page_after_a_downtime_and_a_backfill(
    pds_network: LocalNetwork, pds_client: PdsClient, make_account: Callable[..., PdsAccount], tmp_path: Path
) -> None:
    c = pds_client
    db = tmp_path / "page.duckdb"
    port = free_port()
    start = head_seq(c)
    proc = _spawn(db, pds_network, port, "--cursor", str(start))
    try:
        info = announced(db, proc)
        users = [make_account(f"page{i}") for i in range(5)]
        for i, u in enumerate(users):
            last = c.create_record(u, POST, post_record(f"first {i}"))
        poll(lambda: stored_cursor(info) >= commit_seq(c, users[-1].did, last.commit.rev, since=start),
             timeout=60, what="the first run's writes stored")
        _stop(proc)
        stopped = datetime.now(UTC)
        # downtime: three accounts write while no consumer runs (longer than the 5 s a gap must last)
        for u in users[:3]:
            c.create_record(u, POST, post_record("written while we were down"))
        while datetime.now(UTC) - stopped < timedelta(seconds=7):
            time.sleep(0.2)
        restart = head_seq(c)
        proc = _spawn(db, pds_network, port, "--cursor", str(restart), "--backfill")
        info = announced(db, proc)
        alive = c.create_record(users[3], POST, post_record("after the restart"))
        poll(lambda: stored_cursor(info) >= commit_seq(c, users[3].did, alive.commit.rev, since=restart),
             timeout=60, what="the second run's write stored")
        # the window starts at the first run's first event: its only downtime is the outage
        began = datetime.fromisoformat(min(
            row["first_event_at"] for row in call_daemon(info, "/status", timeout=10)["coverage"]))
        report = call_daemon(info, "/gaps", {"start": began.isoformat(), "end": datetime.now(UTC).isoformat(),
                                             "enqueue": True, "audit": True})
        assert len(report["downtime"]) == 1 and report["counts"]["downtime"] == 3, report
        # the daemon's own repair loop (--backfill) takes the queue
        poll(lambda: call_daemon(info, "/status", timeout=10)["backfill_queue"].get("done", 0) >= report["total"],
             timeout=90, what="the queued backfills done")
        status = call_daemon(info, "/status", timeout=10)
        url = f"http://127.0.0.1:{port}/?since={began.strftime('%Y-%m-%dT%H:%M:%S.%fZ')}"
        # the ring samples every 10 s: wait until it holds a rate (two samples)
        # (a page is reused for 15 s: up to 10 + 15 s)
        poll(lambda: 'id="rate-now"' in httpx.get(url, timeout=30).text, timeout=60, what="two ingest samples")
        assert "skyfill_firehose_events_total" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text

        with Chromium() as browser:
            live = _visit(browser, url, "status-page-daemon.png")
            t = live.texts
            assert t["consumer"] == "running"
            assert t["downtime-count"] == "1"
            assert int(t["repaired-ok"].replace(",", "")) >= 3
            assert t["to-repair"] == "0"  # every DID was reconciled after the outage
            assert t["records-total"] == f"{status['records']['total']:,}"
            assert t["repos-total"] == f"{status['repos']['total']:,}"
            assert t["cursor"] == f"{status['cursors'][0]['seq']:,}"
            assert "downtime" in t["coverage"] and "events/s" in t["ingest"]
            assert live.html.count('class="span"') == 2 and live.html.count('class="downtime"') == 1
            assert "Sampled by this daemon" in t["ingest"]

            # `skyfill status --html` while the daemon runs: its page, through the admin API
            through = tmp_path / "through.html"
            _cli("status", "--db", str(db), "--html", str(through), "--since", began.isoformat())
            assert 'id="downtime-count">1<' in through.read_text()
            # one more event after the backfills, so the stopped run's coverage reaches past them
            tail = c.create_record(users[4], POST, post_record("before the stop"))
            poll(lambda: stored_cursor(info) >= commit_seq(c, users[4].did, tail.commit.rev, since=restart),
                 timeout=60, what="the last write stored")
            _stop(proc)

            # ... and from the file, no daemon: the same page, history from the coverage rows
            # (until the stopped run's last event: after it, the file covers nothing)
            ended = json.loads(_cli("status", "--db", str(db), "--json"))["coverage"][0]["last_event_at"]
            offline = tmp_path / "offline.html"
            _cli("status", "--db", str(db), "--html", str(offline), "--since", began.isoformat(), "--until", ended)
            page = _visit(browser, offline.as_uri(), "status-page-file.png")
            assert page.texts["consumer"] == "stopped" and page.texts["downtime-count"] == "1"
            assert page.texts["records-total"] == f"{status['records']['total'] + 1:,}"
            assert page.texts["repaired-ok"] == t["repaired-ok"] and page.texts["to-repair"] == "0"
            assert "one average per consumer run" in page.texts["ingest"]
    finally:
        reap(proc)


def _cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "skyfill", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout
