"""The whole network over TWO real reference PDSes on one real PLC (tests/support/network).

Issue 12's "Tests (real parts)": accounts created on both PDSes and idle before skyfill runs are
found by `discover` through a relay, flagged `unseen`, and backfilled until the mirror equals
getRepo for every DID of every PDS; a new write makes only its DID `stale`, and only that DID is
fetched again; widening `--collections` backfills the added collection (`filter_changed`);
`identities sync` reads both PDSes' DIDs from the PLC's real /export; one host answering 429
never slows the other and gets no request before its Retry-After; a `backfill --from-queue`
killed with SIGKILL resumes without fetching a finished repo again.

Real: the two PDSes (@atproto/pds, each with its own data, secrets and port, in one node process),
the PLC (@did-plc/server, its real /export route), skyfill (in process and as the CLI).
STAND-INS, said where they are used:
- the RELAY (a scripted server on 127.0.0.1): no real relay lists the hosts of a local network.
  Its listHosts names both PDSes, its listRepos is theirs, and its listReposByCollection is
  computed from their real repos (listRepos + listRecords), since the reference PDS does not serve it;
- a PROXY in front of each PDS (tests/support/pds_proxy.py): each PDS publishes the proxy's port
  in its DID documents, so skyfill reaches it only through the proxy. It passes every request
  through and records it (that is how getRepo is counted per DID); the 429 and the hang of the
  kill test are the proxy playing a fault, not the PDS.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from skyfill.app.jobs import run_backfill
from skyfill.app.network import run_discover, run_identities_sync
from skyfill.backfill.backfiller import open_backfiller
from skyfill.backfill.config import BackfillConfig
from skyfill.backfill.gaps import detect_gaps
from skyfill.storage import Store

from tests.support.faultserver import FaultServer, Reply, Seen, rate_limited
from tests.support.network import (
    Create,
    LocalNetwork,
    LocalPds,
    PdsAccount,
    XrpcError,
    like_record,
    post_record,
)
from tests.support.oracle import fetch_truth, mirror_diff
from tests.support.pds_proxy import GET_REPO, PdsProxy
from tests.support.relay_stand_in import serve_relay
from tests.support.wait import poll

pytestmark = pytest.mark.pds

ROOT = Path(__file__).resolve().parents[1]
POST = "app.bsky.feed.post"
LIKE = "app.bsky.feed.like"


@dataclass
class Net:
    network: LocalNetwork
    proxies: list[PdsProxy]     # proxies[i] in front of network.pdses[i]
    relay: FaultServer          # the relay stand-in
    users: dict[int, list[PdsAccount]]  # the idle population, by PDS index, written before skyfill ran

    @property
    def pdses(self) -> list[LocalPds]:
        return self.network.pdses

    def host(self, i: int) -> str:
        return f"localhost:{self.proxies[i].port}"

    def clear(self) -> None:
        for proxy in self.proxies:
            proxy.fault = None
            proxy.clear()

    def get_repos(self) -> list[str]:
        """Every getRepo the PDSes were asked since the last clear(), as DIDs."""
        return [seen.query["did"] for proxy in self.proxies for seen in proxy.requests(GET_REPO)]

    def listed(self) -> dict[int, list[str]]:
        """Each PDS's own listRepos (asked directly): every DID of every PDS."""
        out = {}
        for pds in self.pdses:
            with pds.client() as c:
                out[pds.index] = list(c.list_repos())
        return out


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    """Two real PDSes on one PLC, each behind its pass-through proxy, and the relay stand-in."""
    with PdsProxy() as pa, PdsProxy() as pb, FaultServer() as relay, \
            LocalNetwork(pds_count=2, public_ports=(pa.port, pb.port)) as network:
        for proxy, pds in zip((pa, pb), network.pdses, strict=True):
            proxy.upstream = pds.url
            assert pds.public_url == f"http://localhost:{proxy.port}"
        serve_relay(relay, {f"localhost:{p.port}": pds.url for p, pds in zip((pa, pb), network.pdses, strict=True)})
        net = Net(network, [pa, pb], relay, {})
        # Accounts on both PDSes, written before anything of skyfill runs, idle afterwards (each
        # test mirrors them into a store of its own). Created once: an account costs ~1 s.
        net.users = accounts(net, {0: (10, 9, 7, 3, 2), 1: (6, 5, 4, 2)}, like=True)
        yield net


@pytest.fixture
def fresh(net: Net) -> Net:
    net.clear()
    return net


def config(net: Net, **kw: Any) -> BackfillConfig:
    return BackfillConfig(plc_url=net.network.plc_url, allow_private_hosts=True, per_host_rps=200.0, **kw)


def accounts(net: Net, counts: dict[int, Sequence[int]], *, like: bool = False) -> dict[int, list[PdsAccount]]:
    """{pds index: [n posts each]} -> accounts written now (before skyfill runs), idle afterwards."""
    out: dict[int, list[PdsAccount]] = {}
    for index, sizes in counts.items():
        with net.pdses[index].client() as c:
            for n in sizes:
                user = c.create_account(f"p{index}-{os.urandom(4).hex()}.test")
                c.apply_writes(user, [Create(POST, post_record(f"{user.handle} {i}")) for i in range(n)])
                out.setdefault(index, []).append(user)
    if like:  # the first account of each PDS likes a post of the other PDS's first account
        for index, users in out.items():
            other = out[1 - index][0]
            with net.pdses[1 - index].client() as c:
                post = c.create_record(other, POST, post_record("liked"))
            with net.pdses[index].client() as c:
                c.create_record(users[0], LIKE, like_record(post))
    return out


def network_gaps(store: Store, collections: Sequence[str] = ()) -> dict[str, set[str]]:
    """{reason: DIDs} over the whole (two-PDS) network: no DID filter."""
    now = datetime.now(UTC)
    report = asyncio.run(detect_gaps(store, start=now - timedelta(hours=1), end=now, audit=None,
                                     collections=collections))
    out: dict[str, set[str]] = {}
    for did, reasons in report.reasons_by_did.items():
        for reason in reasons:
            out.setdefault(reason, set()).add(did)
    return out


def discover_all(store: Store, net: Net) -> None:
    found = asyncio.run(run_discover(store, relay=net.relay.url, config=config(net)))
    assert found.mode == "relay" and found.hosts == 2 and found.hosts_done == 2 and not found.errors, found


def assert_mirror_is_the_network(store: Store, net: Net, collections: Sequence[str] | None = None) -> int:
    """The mirror equals getRepo for every DID of every PDS (only `collections` of it, if given)."""
    diff: list[str] = []
    every: set[str] = set()
    for pds, dids in zip(net.pdses, net.listed().values(), strict=True):
        every.update(dids)
        with pds.client() as c:
            if collections is None:
                diff += mirror_diff(store, c, dids, exhaustive=False)
                continue
            for did in dids:
                want = {k: v for k, v in fetch_truth(c, did).records.items() if k[0] in collections}
                rows = store.fetchall("SELECT collection, rkey, cid FROM records WHERE did = ?", [did])
                have = {(col, rkey): cid for col, rkey, cid in rows}
                diff += [f"{did}: {sorted(want.items() ^ have.items())}"] if want != have else []
    stored = {d for (d,) in store.fetchall("SELECT DISTINCT did FROM records")}
    assert not diff, "\n".join(diff[:40])
    assert stored <= every, f"records of DIDs no PDS holds: {stored - every}"
    return len(every)


def test_two_pdses_on_one_plc_each_serve_their_own_repos(net: Net) -> None:
    """The network's shape: one PLC holds the DIDs of both PDSes, each DID document names its own
    PDS (through its proxy), each PDS serves only its own repos, accepts only its own sessions and
    resolves only its own `.test` handles. Both PDSes keep the service DID did:web:localhost
    (nothing resolves it) on different ports of the one hostname."""
    a, b = net.users[0][0], net.users[1][0]
    assert [p.did for p in net.pdses] == ["did:web:localhost"] * 2
    assert len({p.url for p in net.pdses}) == 2
    for user, pds in ((a, net.pdses[0]), (b, net.pdses[1])):
        doc = httpx.get(f"{net.network.plc_url}/{user.did}").json()
        assert [s["serviceEndpoint"] for s in doc["service"]] == [pds.public_url]
    with net.pdses[1].client() as c:
        assert c.get_repo(b.did)
        with pytest.raises(XrpcError) as missing:
            c.get_repo(a.did)
        assert missing.value.error == "RepoNotFound"
        session = httpx.get(f"{net.pdses[1].url}/xrpc/com.atproto.server.getSession",
                            headers={"Authorization": f"Bearer {a.access_jwt}"})
        assert session.status_code in (400, 401)
    # resolveHandle answers a handle of the PDS's service domain (.test, on both) from its own
    # accounts only: the reference PDS's rule, not the launcher's
    for pds, own, other in ((net.pdses[0], a, b), (net.pdses[1], b, a)):
        got = httpx.get(f"{pds.url}/xrpc/com.atproto.identity.resolveHandle", params={"handle": own.handle})
        assert got.json() == {"did": own.did}
        got = httpx.get(f"{pds.url}/xrpc/com.atproto.identity.resolveHandle", params={"handle": other.handle})
        assert got.json()["error"] == "HandleNotFound"


def test_idle_accounts_of_both_pdses_are_discovered_backfilled_and_only_the_stale_one_refetched(
    tmp_path: Path, fresh: Net
) -> None:
    net = fresh
    users = net.users
    ours = {u.did for group in users.values() for u in group}
    with Store(tmp_path / "m.duckdb") as store:
        assert network_gaps(store) == {}   # a mirror that only follows the firehose sees nothing to do
        discover_all(store, net)
        listed = net.listed()
        assert ours <= set(listed[0]) | set(listed[1])
        assert {u.did for u in users[1]} <= set(listed[1]) and not {u.did for u in users[1]} & set(listed[0])
        unseen = network_gaps(store)
        assert unseen == {"unseen": set(listed[0]) | set(listed[1])}

        summary = asyncio.run(run_backfill(store, dids=sorted(unseen["unseen"]), config=config(net)))
        assert (summary.repos_ok, summary.repos_failed) == (len(unseen["unseen"]), 0)
        assert sorted(net.get_repos()) == sorted(unseen["unseen"])  # each fetched once, from its own PDS
        assert assert_mirror_is_the_network(store, net) == len(unseen["unseen"])
        assert network_gaps(store) == {}

        # one new write on PDS 1: only that DID is stale, only it is fetched again
        writer = users[1][0]
        with net.pdses[1].client() as c:
            c.create_record(writer, POST, post_record("one more"))
        net.clear()
        discover_all(store, net)
        stale = network_gaps(store)
        assert stale == {"stale": {writer.did}}
        store.enqueue({did: sorted(r for r, ds in stale.items() if did in ds) for did in stale["stale"]})
        summary = asyncio.run(run_backfill(store, dids=None, from_queue=True, config=config(net)))
        assert (summary.repos_ok, summary.repos_failed) == (1, 0)
        assert net.get_repos() == [writer.did], "an unchanged repo was fetched"
        assert_mirror_is_the_network(store, net)
        assert network_gaps(store) == {}


def test_adding_a_collection_to_the_filter_backfills_it_on_both_pdses(tmp_path: Path, fresh: Net) -> None:
    net = fresh
    users = net.users
    likers = {users[0][0].did, users[1][0].did}
    with Store(tmp_path / "likes.duckdb") as store:  # the relay's listReposByCollection spans both PDSes
        by = asyncio.run(run_discover(store, relay=net.relay.url, collections=[LIKE], config=config(net)))
        assert by.mode == "collections" and not by.errors, by
        assert network_gaps(store) == {"unseen": likers}
    with Store(tmp_path / "m.duckdb") as store:
        discover_all(store, net)
        everyone = sorted(network_gaps(store)["unseen"])
        posts = config(net, collections=(POST,))
        assert asyncio.run(run_backfill(store, dids=everyone, config=posts)).repos_ok == len(everyone)
        assert_mirror_is_the_network(store, net, collections=[POST])
        assert network_gaps(store, [POST]) == {}

        both = [POST, LIKE]
        flagged = network_gaps(store, both)
        assert flagged == {"filter_changed": set(everyone)}
        net.clear()
        assert asyncio.run(run_backfill(store, dids=sorted(flagged["filter_changed"]),
                                        config=config(net, collections=tuple(both)))).repos_ok == len(everyone)
        assert_mirror_is_the_network(store, net, collections=both)
        liked = {d for (d,) in store.fetchall("SELECT DISTINCT did FROM records WHERE collection = ?", [LIKE])}
        assert likers <= liked
        assert network_gaps(store, both) == {}


def test_identities_sync_from_the_real_plc_export_covers_both_pdses(tmp_path: Path, fresh: Net) -> None:
    net = fresh
    listed = net.listed()
    with Store(tmp_path / "m.duckdb") as store, FaultServer() as dead_plc:
        synced = asyncio.run(run_identities_sync(store, config=config(net), page_size=3))
        assert synced.complete and synced.error is None and synced.refused == 0 and synced.pages >= 2
        for pds, dids in zip(net.pdses, listed.values(), strict=True):
            for did in dids:
                row = store.load_identity(did, max_age=3600)
                assert row is not None and row.pds == pds.public_url, (did, row)
        # a backfill whose PLC answers nothing: both PDSes' endpoints and keys come from the export
        dead_plc.script("/", Reply(500))
        everyone = sorted(listed[0] + listed[1])
        dead = BackfillConfig(plc_url=dead_plc.url, allow_private_hosts=True, per_host_rps=200.0)
        summary = asyncio.run(run_backfill(store, dids=everyone, config=dead))
        assert (summary.repos_ok, summary.repos_failed) == (len(everyone), 0)
        assert not [s for s in dead_plc.requests if s.path.startswith("/did:")]
        assert_mirror_is_the_network(store, net)


def test_a_host_answering_429_never_slows_the_other_and_gets_nothing_before_retry_after(
    tmp_path: Path, fresh: Net
) -> None:
    """PDS 1's proxy (a fault stand-in) answers every getRepo with 429 + Retry-After: 6 for 6 s
    from the first one. PDS 1 is asked nothing more within those 6 s, while every DID of PDS 0
    is fetched meanwhile; then PDS 1's DIDs complete, none counted as a failed attempt."""
    net = fresh
    park = 6.0
    parked_at: list[float] = []

    def limited(seen: Seen) -> Reply | None:
        if seen.path != GET_REPO:
            return None
        if not parked_at:
            parked_at.append(seen.at)
        return rate_limited(retry_after=str(int(park))) if seen.at < parked_at[0] + park else None

    with Store(tmp_path / "m.duckdb") as store:
        discover_all(store, net)
        listed = net.listed()
        store.enqueue({did: ["unseen"] for did in network_gaps(store)["unseen"]})
        net.proxies[1].fault = limited

        async def run() -> Any:
            cfg = config(net, concurrency=4, per_host_concurrency=1, request_backoff=0.01)
            async with open_backfiller(store, config=cfg) as bf:
                return await asyncio.wait_for(bf.run_queue(), 120)

        summary = asyncio.run(run())
        total = len(listed[0]) + len(listed[1])
        assert summary.repos_ok == total and summary.failed == {}
        end = parked_at[0] + park
        b = net.proxies[1]
        assert next(a.status for a in b.server.answered if a.request.path == GET_REPO) == 429
        early = [s.at - parked_at[0] for s in b.requests(GET_REPO)[1:] if s.at < end]
        assert not early, f"requests to the parked host {early} s after its 429 (Retry-After {park} s)"
        assert sorted(s.query["did"] for s in b.requests(GET_REPO)[1:]) == sorted(listed[1])
        a_done = [a.at for a in net.proxies[0].server.answered if a.request.path == GET_REPO]
        assert len(a_done) == len(listed[0]), "the other host's DIDs were fetched once each"
        assert max(a_done) < end, f"the other host waited for the park: done {max(a_done) - parked_at[0]:.2f} s after it"
        assert store.fetchall("SELECT max(backfill_attempts) FROM repos") == [(0,)]
        assert_mirror_is_the_network(store, net)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "skyfill.cli", *args]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SKYFILL_")}


def test_backfill_killed_with_sigkill_resumes_without_refetching_finished_repos(tmp_path: Path, fresh: Net) -> None:
    """`skyfill gaps --discover --enqueue db` through the relay, then `skyfill backfill --from-queue
    --concurrency 1` (a DID's getRepo is asked only after the previous DID committed) killed with
    SIGKILL while the 6th getRepo (of either PDS) hangs in its proxy; the restart fetches exactly
    the DIDs not done, and the mirror equals getRepo for every DID of both PDSes."""
    net = fresh
    db = tmp_path / "kill.duckdb"
    plc = net.network.plc_url
    now = datetime.now(UTC)
    out = subprocess.run(_cli("gaps", "--db", str(db), "--discover", "--relay", net.relay.url, "--enqueue", "db",
                              "--start", (now - timedelta(hours=1)).isoformat(), "--end", now.isoformat(),
                              "--plc-url", plc, "--allow-private-hosts", "--json"),
                         cwd=ROOT, env=_env(), capture_output=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    report = orjson.loads(out.stdout)
    with Store(db) as store:
        unseen = network_gaps(store)["unseen"]
        queued = {d for (d,) in store.fetchall("SELECT did FROM backfill_queue WHERE state = 'pending'")}
    assert queued == unseen, report
    assert len(unseen) >= 9

    release = threading.Event()
    served: list[str] = []
    lock = threading.Lock()

    def hang_the_sixth(seen: Seen) -> Reply | None:
        if seen.path != GET_REPO:
            return None
        with lock:
            served.append(seen.query["did"])
            sixth = len(served) > 5
        if sixth and not release.is_set():
            release.wait(60)  # hangs until the process is dead
            return Reply(503)
        return None

    for proxy in net.proxies:
        proxy.fault = hang_the_sixth
    backfill = _cli("backfill", "--db", str(db), "--from-queue", "--plc-url", plc, "--allow-private-hosts",
                    "--concurrency", "1", "--per-host-rps", "200", "--json")
    proc = subprocess.Popen(backfill, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        poll(lambda: len(served) >= 6 or proc.poll() is not None, timeout=120, what="the 6th getRepo")
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
    first = list(served)
    with Store(db) as store:
        done = {d for (d,) in store.fetchall("SELECT did FROM backfill_queue WHERE state = 'done'")}
    listed = net.listed()
    assert done == set(first[:5]) and done & set(listed[0]) and done & set(listed[1])  # both hosts worked
    for proxy in net.proxies:
        proxy.fault = None
    with lock:
        served.clear()
    net.clear()
    started = time.monotonic()
    again = subprocess.run(backfill, cwd=ROOT, env=_env(), capture_output=True, timeout=180, check=False)
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    assert orjson.loads(again.stdout)["repos_ok"] == len(unseen) - 5
    assert sorted(net.get_repos()) == sorted(unseen - done), "a finished repo was fetched again"
    assert time.monotonic() - started < 120
    with Store(db) as store:
        assert dict(store.fetchall("SELECT state, count(*) FROM backfill_queue GROUP BY 1")) == {"done": len(unseen)}
        assert_mirror_is_the_network(store, net)
