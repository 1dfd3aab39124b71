"""PdsClient, HostLimiter and the SSRF guard against a real local HTTP server with faults."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from skyfill.net.guard import MAX_URL_LENGTH, Target, check_host, check_url, is_unsafe_address
from skyfill.net import http as net_http
from skyfill.net.http import SafeHttp, Transfer
from skyfill.net.pds import ListedRepo, PdsClient
from skyfill.net.ratelimit import HostLimiter, parse_retry_after
from skyfill import metrics
from skyfill.protocol.car import read_car
from skyfill.errors import (
    RateLimited,
    RepoError,
    RetryableFetchError,
    TerminalFetchError,
    UnsafeHostError,
)
from tests.support.faultserver import FaultServer, Reply, Seen, http_date, json_reply, rate_limited, redirect, xrpc_error
from tests.support.wire import read_varint

GET_REPO = "/xrpc/com.atproto.sync.getRepo"
LIST_REPOS = "/xrpc/com.atproto.sync.listRepos"
LATEST = "/xrpc/com.atproto.sync.getLatestCommit"
DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
CAR = (Path(__file__).parent / "vectors/indigo/repo-testdata/bnewbold.robocracy.org.20250310005405.car").read_bytes()


@pytest.fixture
async def client() -> AsyncIterator[PdsClient]:
    async with PdsClient(
        allow_private_hosts=True,  # the fault server is on 127.0.0.1
        transfer=Transfer(connect_timeout=0.5, read_timeout=0.5),
        max_retries=2,
        backoff_base=0.01,
        max_car_bytes=len(CAR) + 10,
        per_host_rps=1000,
    ) as c:
        yield c


def _requests_metric(result: str) -> float:
    value = metrics.REGISTRY.get_sample_value("skyfill_backfill_requests_total", {"result": result})
    return value or 0.0


def _block_boundaries(car: bytes) -> list[int]:
    """Offsets where each block section ends (CAR v1: varint length + CID + data)."""
    n, pos = read_varint(car, 0)
    pos += n
    ends = []
    while pos < len(car):
        n, pos = read_varint(car, pos)
        pos += n
        ends.append(pos)
    return ends


# -- getRepo outcomes ------------------------------------------------------------------------


async def test_get_repo_returns_the_car_and_never_sends_since(server: FaultServer, client: PdsClient) -> None:
    server.script(GET_REPO, Reply(200, CAR))
    assert await client.get_repo(server.url, DID) == CAR
    (req,) = server.seen(GET_REPO)
    assert req.query == {"did": DID}
    assert req.headers["accept-encoding"] == "identity"


async def test_500_then_success_is_retried(server: FaultServer, client: PdsClient) -> None:
    server.script(GET_REPO, Reply(500, b"oops"), Reply(502), Reply(200, CAR))
    assert await client.get_repo(server.url, DID) == CAR
    assert server.count(GET_REPO) == 3


async def test_persistent_5xx_gives_up_as_retryable(server: FaultServer, client: PdsClient) -> None:
    server.script(GET_REPO, Reply(503))
    with pytest.raises(RetryableFetchError) as info:
        await client.get_repo(server.url, DID)
    assert info.value.did == DID
    assert server.count(GET_REPO) == 1 + client.max_retries


@pytest.mark.parametrize("error", ["RepoTakendown", "RepoNotFound", "RepoSuspended", "RepoDeactivated"])
async def test_terminal_repo_errors(server: FaultServer, client: PdsClient, error: str) -> None:
    server.script(GET_REPO, xrpc_error(error, "gone"))
    with pytest.raises(TerminalFetchError) as info:
        await client.get_repo(server.url, DID)
    assert info.value.outcome == error
    assert server.count(GET_REPO) == 1  # terminal: never retried


async def test_unknown_400_is_not_terminal(server: FaultServer, client: PdsClient) -> None:
    server.script(GET_REPO, xrpc_error("InvalidRequest", "?"))
    with pytest.raises(RetryableFetchError):
        await client.get_repo(server.url, DID)


async def test_429_parks_the_host_and_retries_after_reset(server: FaultServer, client: PdsClient) -> None:
    reset = time.time() + 1
    throttled_before = _requests_metric("429")
    server.script(GET_REPO, rate_limited("1", reset=reset), Reply(200, CAR))
    assert await client.get_repo(server.url, DID) == CAR
    assert _requests_metric("429") == throttled_before + 1
    first, second = server.seen(GET_REPO)
    assert second.at >= first.at + 0.9  # the retry waited for the host's reset
    counters = client.limiter.counters()
    assert counters.rate_limited == 1 and counters.parks == 1


async def test_repeated_429s_never_consume_retries(server: FaultServer) -> None:
    # max_retries=0: a single 5xx would fail, yet three 429s in a row do not.
    async with PdsClient(allow_private_hosts=True, max_retries=0, per_host_rps=1000) as c:
        limiter = c.limiter
        limiter._min_park = 0.05  # keep the test fast; the 429 path is the same
        server.script(GET_REPO, *[rate_limited("0")] * 3, Reply(200, CAR))
        assert await c.get_repo(server.url, DID) == CAR
    assert server.count(GET_REPO) == 4


async def test_429_past_the_deadline_surfaces_as_rate_limited(server: FaultServer, client: PdsClient) -> None:
    server.script(GET_REPO, rate_limited("30"))
    with pytest.raises(RateLimited) as info:
        await client.get_repo(server.url, DID, deadline=time.time() + 2)
    assert info.value.retry_at >= time.time() + 20
    assert info.value.did == DID
    host = f"127.0.0.1:{server.port}"
    assert host in client.parked_hosts()
    # A parked host is not asked again: the next call waits (or gives up) without a request.
    with pytest.raises(RateLimited):
        await client.get_repo(server.url, DID, deadline=time.time() + 1)
    assert server.count(GET_REPO) == 1


async def test_retry_after_as_http_date(server: FaultServer, client: PdsClient) -> None:
    server.script(GET_REPO, rate_limited(http_date(time.time() + 600)))
    with pytest.raises(RateLimited) as info:
        await client.get_repo(server.url, DID, deadline=time.time() + 1)
    assert info.value.retry_at > time.time() + 500


async def test_remaining_zero_on_success_parks_until_reset(server: FaultServer, client: PdsClient) -> None:
    reset = time.time() + 300
    server.script(GET_REPO, Reply(200, CAR, {"RateLimit-Remaining": "0", "RateLimit-Reset": str(int(reset))}))
    assert await client.get_repo(server.url, DID) == CAR
    assert client.parked_hosts()[f"127.0.0.1:{server.port}"] == pytest.approx(int(reset))
    with pytest.raises(RateLimited):
        await client.get_repo(server.url, DID, deadline=time.time() + 1)
    assert server.count(GET_REPO) == 1


async def test_truncated_car_at_block_boundary_is_returned_as_served(server: FaultServer, client: PdsClient) -> None:
    cut = _block_boundaries(CAR)[10]
    server.script(GET_REPO, Reply(200, CAR[:cut]))
    body = await client.get_repo(server.url, DID)
    assert body == CAR[:cut]
    # It still splits cleanly: only the MST walk (parse layer) can find the hole.
    _roots, blocks = read_car(body)
    assert len(blocks) == 11


async def test_connection_cut_short_of_content_length_is_retryable(server: FaultServer, client: PdsClient) -> None:
    server.script(GET_REPO, Reply(200, CAR[:1000], content_length=len(CAR)))
    with pytest.raises(RetryableFetchError):
        await client.get_repo(server.url, DID)
    assert server.count(GET_REPO) == 1 + client.max_retries


async def test_slow_response_times_out_and_is_retryable(server: FaultServer, client: PdsClient) -> None:
    server.script(GET_REPO, Reply(200, CAR, delay=3.0))
    with pytest.raises(RetryableFetchError, match="ReadTimeout"):
        await client.get_repo(server.url, DID)
    assert server.count(GET_REPO) == 1 + client.max_retries


async def test_slow_then_fast_succeeds(server: FaultServer, client: PdsClient) -> None:
    server.script(GET_REPO, Reply(200, CAR, delay=3.0), Reply(200, CAR))
    assert await client.get_repo(server.url, DID) == CAR


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_oversized_repo_is_refused(server: FaultServer, client: PdsClient, chunked: bool) -> None:
    big = CAR * 3
    server.script(GET_REPO, Reply(200, big, chunked=chunked))
    with pytest.raises(RepoError) as info:
        await client.get_repo(server.url, DID)
    assert info.value.kind == "too_large" and info.value.did == DID
    assert server.count(GET_REPO) == 1  # terminal for this attempt: not retried inside


async def test_redirect_is_followed_to_a_checked_host(server: FaultServer, client: PdsClient) -> None:
    server.script(GET_REPO, redirect(f"{server.url}/pds{GET_REPO}?did={DID}"))
    server.script(f"/pds{GET_REPO}", Reply(200, CAR))
    assert await client.get_repo(server.url, DID) == CAR
    assert server.seen(f"/pds{GET_REPO}")[0].query == {"did": DID}


async def test_redirect_loop_is_bounded(server: FaultServer, client: PdsClient) -> None:
    server.script(GET_REPO, redirect(GET_REPO))
    with pytest.raises(RetryableFetchError):
        await client.get_repo(server.url, DID)


@pytest.mark.parametrize("target", ["http://10.0.0.1/xrpc/x", "http://169.254.169.254/latest/meta-data", "http://[::1]:1/"])
async def test_redirect_to_private_address_is_refused_without_connecting(server: FaultServer, target: str) -> None:
    # The first hop is trusted (the caller's trusted origin), the redirect target is not.
    async with PdsClient(transfer=Transfer(connect_timeout=0.5, read_timeout=0.5), max_retries=0) as c:
        server.script(GET_REPO, redirect(target))
        with pytest.raises(UnsafeHostError):
            await c.fetch(f"{server.url}{GET_REPO}", trusted_origin=server.url)
    assert server.count(GET_REPO) == 1


async def test_pds_on_loopback_is_refused_without_allow_private(server: FaultServer) -> None:
    async with PdsClient(max_retries=0) as c:
        server.script(GET_REPO, Reply(200, CAR))
        with pytest.raises(UnsafeHostError):
            await c.get_repo(server.url, DID)
        with pytest.raises(UnsafeHostError):
            await c.get_repo(f"http://localhost:{server.port}", DID)
    assert server.count(GET_REPO) == 0


async def test_client_refuses_loopback_name_at_connect(server: FaultServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connect-time guard alone (what defeats DNS rebinding). Fault injection: the early
    check_host is replaced by one that passes, as a rebinding DNS answer would make it; the
    connection is still refused because the socket layer resolves and checks once more."""
    async def passes(url: str, **_: object) -> Target:
        return check_url(url)  # the syntax half only: no address check

    monkeypatch.setattr(net_http, "check_host", passes)
    async with SafeHttp(transfer=Transfer(connect_timeout=0.5, read_timeout=0.5)) as http:
        with pytest.raises(UnsafeHostError):
            await http.get(f"http://localhost:{server.port}{GET_REPO}", max_bytes=100)
    assert server.count(GET_REPO) == 0


# -- listRepos / getLatestCommit -------------------------------------------------------------


async def test_list_repos_paginates_by_cursor(server: FaultServer, client: PdsClient) -> None:
    dids = [f"did:plc:{i:024d}" for i in range(2500)]

    def page(req):  # type: ignore[no-untyped-def]
        start = int(req.query.get("cursor", "0"))
        limit = int(req.query["limit"])
        chunk = dids[start : start + limit]
        repos = [{"did": d, "head": "bafyhead", "rev": "3l", "active": i % 2 == 0,
                  **({} if i % 2 == 0 else {"status": "deactivated"})} for i, d in enumerate(chunk, start)]
        body: dict[str, object] = {"repos": repos}
        if start + limit < len(dids):
            body["cursor"] = str(start + limit)
        return json_reply(body)

    server.script(LIST_REPOS, page)
    listed = [r async for r in client.list_repos(server.url)]
    assert [r.did for r in listed] == dids
    assert listed[1] == ListedRepo(did=dids[1], head="bafyhead", rev="3l", active=False, status="deactivated")
    assert [r.query.get("cursor") for r in server.seen(LIST_REPOS)] == [None, "1000", "2000"]
    assert all(r.query["limit"] == "1000" for r in server.seen(LIST_REPOS))


async def test_list_repos_skips_malformed_entries_and_stops_on_repeated_cursor(
    server: FaultServer, client: PdsClient
) -> None:
    good = {"did": DID, "head": "bafyhead", "rev": "3l"}
    server.script(LIST_REPOS, json_reply({"repos": [good, {"did": 5}, "x"], "cursor": "same"}))
    listed = [r async for r in client.list_repos(server.url)]
    assert listed == [ListedRepo(DID, "bafyhead", "3l", True, None)] * 2
    assert server.count(LIST_REPOS) == 2


async def test_get_latest_commit(server: FaultServer, client: PdsClient) -> None:
    server.script(LATEST, Reply(500), json_reply({"cid": "bafycommit", "rev": "3lrev"}))
    assert await client.get_latest_commit(server.url, DID) == ("bafycommit", "3lrev")
    server.script(LATEST, xrpc_error("RepoNotFound"))
    with pytest.raises(TerminalFetchError):
        await client.get_latest_commit(server.url, DID)


# -- the guard on its own ------------------------------------------------------------------


@pytest.mark.parametrize(
    "addr",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
     "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "::", "fc00::1", "fd12::1", "fe80::1", "ff02::1",
     "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:0a00:0001::1", "64:ff9b::a00:1",
     # IPv6 special ranges (issue 9): site-local, documentation, local-use NAT64, Teredo and
     # the rest of 2001::/23, IPv4-compatible, SIIT, discard, SRv6, 6to4/NAT64 of loopback
     "fec0::1", "feff::1", "2001:db8::1", "3fff::1", "64:ff9b:1::a00:1", "64:ff9b:1::808:808", "2001::1",
     "2001:0:4136:e378:8000:63bf:3fff:fdd2", "2001:2::1", "2001:10::1", "2001:20::1", "::127.0.0.1", "::8.8.8.8",
     "::ffff:0:0", "::ffff:0:7f00:1", "100::1", "5f00::1", "64:ff9b::7f00:1", "2002:7f00:1::1",
     # IPv4 special-purpose blocks the stdlib may not know
     "192.0.0.9", "192.88.99.1", "198.18.0.1", "192.0.2.1", "203.0.113.9"],
)
async def test_check_host_refuses_unsafe_literals(addr: str) -> None:
    assert is_unsafe_address(ipaddress.ip_address(addr))
    assert is_unsafe_address(ipaddress.ip_address(addr + "%1")) if ":" in addr else True  # zone ids too
    host = f"[{addr}]" if ":" in addr else addr
    with pytest.raises(UnsafeHostError):
        await check_host(f"http://{host}/", allow_private=False)
    await check_host(f"http://{host}/", allow_private=True)


@pytest.mark.parametrize(
    "addr",
    ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "2a00:1450:4001::1", "2002:808:808::1",
     "64:ff9b::808:808"],
)
async def test_check_host_accepts_public_literals(addr: str) -> None:
    assert not is_unsafe_address(ipaddress.ip_address(addr))
    host = f"[{addr}]" if ":" in addr else addr
    await check_host(f"https://{host}/", allow_private=False)


# Spellings that every URL parser (and inet_aton) reads as a loopback IPv4 address, URLs
# httpx cannot parse, over-long URLs: refused by syntax, even with allow_private.
NON_CANONICAL = [
    "http://0177.0.0.1/", "http://0x7f.0.0.1/", "http://0x7f.1/", "http://2130706433/", "http://127.1/",
    "http://127.0.1/", "http://017700000001/", "http://127.0.0.1./", "http://127.000.000.001/", "http://1.2.3.4.5/",
    "http://0x7f000001/", "http://example.0x10/", "http://example.123/",
]
MALFORMED = [
    "http://[::1/", "http://[fec0::1%25eth0]/", "http://ex ample.com/", "http://%31%32%37.0.0.1/",
    "http://a:99999/", "http://[::1]:0/", "http://a:-1/", "http://\u0000x.com/",
    "http://" + "a" * 64 + ".com/", "http://" + "a." * 35_000 + "com/", "http://x.com/" + "p" * MAX_URL_LENGTH,
]


@pytest.mark.parametrize("url", NON_CANONICAL + MALFORMED)
def test_check_url_refuses_ambiguous_and_malformed_urls(url: str) -> None:
    with pytest.raises(UnsafeHostError):
        check_url(url)


@pytest.mark.parametrize(
    "url, origin",
    [("http://127.0.0.1:8080/x", ("http", "127.0.0.1", 8080)), ("https://PDS.Example.com", ("https", "pds.example.com", 443)),
     ("http://[::1]/", ("http", "::1", 80)), ("https://bsky.network:443/xrpc", ("https", "bsky.network", 443)),
     ("http://10.0.0.1/", ("http", "10.0.0.1", 80)), ("https://my_pds.example.com/", ("https", "my_pds.example.com", 443))],
)
def test_check_url_accepts_canonical_urls(url: str, origin: tuple[str, str, int]) -> None:
    assert check_url(url).origin == origin


@pytest.mark.parametrize("url", ["ftp://8.8.8.8/", "file:///etc/passwd", "http:///x", "http://u:p@8.8.8.8/", "gopher://x"])
async def test_check_host_refuses_bad_urls_even_with_allow_private(url: str) -> None:
    with pytest.raises(UnsafeHostError):
        await check_host(url, allow_private=True)


async def test_check_host_resolves_names() -> None:
    with pytest.raises(UnsafeHostError):
        await check_host("http://localhost:8080/", allow_private=False)
    await check_host("http://localhost/", allow_private=False, trusted_origin="http://localhost")
    with pytest.raises(UnsafeHostError):  # trust is for the exact origin: not another port or scheme
        await check_host("http://localhost:81/", allow_private=False, trusted_origin="http://localhost")
    with pytest.raises(UnsafeHostError):
        await check_host("https://localhost/", allow_private=False, trusted_origin="http://localhost")
    with pytest.raises(RetryableFetchError):  # does not resolve: a network failure, not unsafe
        await check_host("https://no-such-host.invalid/", allow_private=False)


# -- limiter units -----------------------------------------------------------------------------


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("5", now=now) == now + 5
    assert parse_retry_after(http_date(now + 60), now=now) == pytest.approx(now + 60)
    assert parse_retry_after("soon", now=now) is None


async def test_limiter_caps_per_host_concurrency() -> None:
    import asyncio

    limiter = HostLimiter(per_host_rps=1000, per_host_concurrency=2, global_concurrency=10)
    active = peak = 0

    async def one() -> None:
        nonlocal active, peak
        async with limiter.slot("a"):
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.01)
            active -= 1

    await asyncio.gather(*(one() for _ in range(8)))
    assert peak == 2
    assert limiter.counters().requests == 8


def test_limiter_caps_hostile_park_and_reads_delta_reset() -> None:
    limiter = HostLimiter(max_park=60)
    limiter.observe("h", 429, {"retry-after": "99999999"})
    assert limiter.parked_hosts()["h"] <= time.time() + 60
    limiter.observe("d", 200, {"ratelimit-remaining": "0", "ratelimit-reset": "30"})
    assert time.time() + 25 < limiter.parked_hosts()["d"] <= time.time() + 30
    limiter.observe("ok", 200, {"ratelimit-remaining": "5", "ratelimit-reset": "30"})
    assert "ok" not in limiter.parked_hosts()


# -- issue 9: malformed targets and redirects are refused, and nothing connects --------------


TARGETS = {
    "octal": "http://0177.0.0.1:{port}",
    "hex": "http://0x7f.0.0.1:{port}",
    "integer": "http://2130706433:{port}",
    "short": "http://127.1:{port}",
    "trailing-dot": "http://127.0.0.1.:{port}",
    "unclosed-ipv6": "http://[::1:{port}",
    "percent-host": "http://%31%32%37.0.0.1:{port}",
    "70k-path": "http://127.0.0.1:{port}/" + "x" * 70_000,
    "70k-host": "http://" + "a." * 35_000 + "com",
}


@pytest.mark.parametrize("case", sorted(TARGETS))
async def test_malformed_or_non_canonical_target_is_refused_without_connecting(server: FaultServer, case: str) -> None:
    """allow_private: the address check is off, so only the syntax check stands between the
    client and this server (`127.1` resolves to it). Before: httpx.InvalidURL escaped the
    client, or the server was reached."""
    async with PdsClient(allow_private_hosts=True, max_retries=0) as c:
        with pytest.raises(UnsafeHostError):
            await c.get_repo(TARGETS[case].replace("{port}", str(server.port)), DID)
    assert server.connections_made() == 0


@pytest.mark.parametrize(
    "location",
    ["http://127.1:{port}/x", "http://0177.0.0.1:{port}/x", "http://2130706433:{port}/x", "http://[::1:{port}/x",
     "http://127.0.0.1:{port}/" + "x" * 70_000],
)
async def test_malformed_redirect_is_refused_without_connecting(server: FaultServer, location: str) -> None:
    with FaultServer("127.0.0.2") as target:
        server.script(GET_REPO, redirect(location.format(port=target.port)))
        async with PdsClient(allow_private_hosts=True, max_retries=0) as c:
            with pytest.raises(UnsafeHostError):
                await c.get_repo(server.url, DID)
        assert target.connections_made() == 0
    assert server.count(GET_REPO) == 1


async def test_trust_is_for_the_exact_origin_and_only_when_asked(server: FaultServer) -> None:
    """The PLC's origin is trusted for PLC requests: not its host on another port, not a
    redirect to it, not the same origin for a request that is not a PLC request."""
    with FaultServer() as other:
        other.script(GET_REPO, Reply(200, CAR))
        server.script(GET_REPO, Reply(200, CAR))
        server.script("/to-other", redirect(f"http://127.0.0.1:{other.port}{GET_REPO}"))
        async with PdsClient(max_retries=0) as c:
            result = await c.fetch(f"{server.url}{GET_REPO}", trusted_origin=server.url)
            assert result.body == CAR
            with pytest.raises(UnsafeHostError):  # same host, another port
                await c.fetch(f"{other.url}{GET_REPO}", trusted_origin=server.url)
            with pytest.raises(UnsafeHostError):  # the trusted origin redirects elsewhere on its host
                await c.fetch(f"{server.url}/to-other", trusted_origin=server.url)
            with pytest.raises(UnsafeHostError):  # the trusted origin, but not a trusted request
                await c.fetch(f"{server.url}{GET_REPO}")
            with pytest.raises(UnsafeHostError):  # the same host and port over another scheme
                await c.fetch(f"https://127.0.0.1:{server.port}{GET_REPO}", trusted_origin=server.url)
        assert other.connections_made() == 0
    assert server.count(GET_REPO) == 1


# -- issue 10: time is bounded ---------------------------------------------------------------


async def test_trickling_body_is_cut_after_one_window(server: FaultServer) -> None:
    """A PDS sending 1 byte every 0.1 s (the trial: every 2 s) never trips the read timeout;
    the progress deadline cuts it. Before: alive until the 900 s total timeout."""
    server.script(GET_REPO, Reply(200, CAR, trickle=0.1))
    before = _requests_metric("too_slow")
    async with PdsClient(
        allow_private_hosts=True, max_retries=0,
        transfer=Transfer(read_timeout=5, min_transfer_bytes=1024, transfer_window=1.0)
    ) as c:
        with pytest.raises(RetryableFetchError, match="stalled"):
            await asyncio.wait_for(c.get_repo(server.url, DID), timeout=60)
    assert _requests_metric("too_slow") == before + 1


async def test_steady_slow_body_is_not_cut(server: FaultServer) -> None:
    # 4 KiB every 0.05 s: each window of 1 s sees far more than the 1 KiB minimum.
    server.script(GET_REPO, Reply(200, CAR, trickle=0.05, trickle_bytes=4096))
    async with PdsClient(
        allow_private_hosts=True, max_retries=0,
        transfer=Transfer(read_timeout=5, min_transfer_bytes=1024, transfer_window=1.0)
    ) as c:
        assert await c.get_repo(server.url, DID) == CAR


async def test_request_deadline_scales_with_the_size_cap(server: FaultServer) -> None:
    """Progress just fast enough for the window (1 byte per 0.05 s, minimum 1 byte per 5 s)
    still ends at the request deadline: base 0.5 s + cap / rate = 1.5 s here."""
    server.script(GET_REPO, Reply(200, CAR, trickle=0.05))
    async with PdsClient(
        allow_private_hosts=True, max_retries=0, max_car_bytes=len(CAR),
        transfer=Transfer(read_timeout=5, min_transfer_bytes=1, transfer_window=5.0, deadline_base=0.5,
                          deadline_rate=len(CAR)),
    ) as c:
        assert c.http.request_deadline(len(CAR)) == 1.5
        with pytest.raises(RetryableFetchError, match="no complete answer within"):
            await asyncio.wait_for(c.get_repo(server.url, DID), timeout=60)


def _rate_limit_metric(result: str) -> float:
    value = metrics.REGISTRY.get_sample_value("skyfill_backfill_rate_limit_headers_total", {"result": result})
    return value or 0.0


@pytest.mark.parametrize(
    "headers",
    [{"Retry-After": v} for v in ("1e309", "inf", "nan", "-5", "0x10", "soon", "1e3", "", "Fri, 31 Dec 99999 23:59:59 GMT")]
    + [{"RateLimit-Reset": v} for v in ("nan", "inf", "1e309", "-1")],
    ids=lambda h: repr(h),
)
async def test_malformed_rate_limit_header_is_ignored(server: FaultServer, headers: dict[str, str]) -> None:
    """Read as if absent: a 429 parks for the default 5 s, never for the 1 h cap."""
    server.script(GET_REPO, json_reply({"error": "RateLimitExceeded"}, 429, headers))
    before = _rate_limit_metric("ignored")
    async with PdsClient(allow_private_hosts=True, max_retries=0) as c:
        with pytest.raises(RateLimited) as info:
            await c.get_repo(server.url, DID, deadline=time.time() + 0.2)
    assert info.value.retry_at <= time.time() + 5
    assert _rate_limit_metric("ignored") == before + 1
    assert server.count(GET_REPO) == 1


@pytest.mark.parametrize(
    "headers",
    [{"Retry-After": "99999999999999999999999"}, {"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"},
     {"Retry-After": "1" + "0" * 400}, {"RateLimit-Reset": "99999999999"}],
    ids=["huge-int", "year-9999", "400-digits", "reset-far"],
)
async def test_far_rate_limit_is_clamped_to_max_park(server: FaultServer, headers: dict[str, str]) -> None:
    server.script(GET_REPO, json_reply({"error": "RateLimitExceeded"}, 429, headers))
    before = _rate_limit_metric("clamped")
    async with PdsClient(allow_private_hosts=True, max_retries=0, max_park=60) as c:
        with pytest.raises(RateLimited) as info:
            await c.get_repo(server.url, DID, deadline=time.time() + 0.2)
    (answer,) = server.answered
    assert answer.at + 59 <= info.value.retry_at <= time.time() + 60
    assert _rate_limit_metric("clamped") == before + 1


@pytest.mark.parametrize("kind", ["delta", "date", "reset"])
async def test_no_request_is_sent_before_a_rate_limit_ends(server: FaultServer, kind: str) -> None:
    """A storm: six requests queue for one host (one in flight at a time, so the order is
    exact); it answers 429 three times, then 200. No request may arrive before the park the
    previous 429 asked for has ended (server clock = client clock: one machine)."""
    parks: list[tuple[float, float]] = []  # (time the 429 was about to be written, park end)

    def limited(seen: Seen) -> Reply:
        now = time.time()
        if kind == "delta":
            parks.append((now, now + 1))
            return rate_limited("1")
        end = int(now) + 2  # whole seconds: at least 1 s from now
        parks.append((now, end))
        header = {"Retry-After": http_date(end)} if kind == "date" else {"RateLimit-Reset": str(end)}
        return json_reply({"error": "RateLimitExceeded"}, 429, header)

    server.script(GET_REPO, limited, limited, limited, Reply(200, CAR))
    async with PdsClient(allow_private_hosts=True, max_retries=0, per_host_concurrency=1, per_host_rps=1000) as c:
        results = await asyncio.wait_for(asyncio.gather(*(c.get_repo(server.url, DID) for _ in range(6))), 60)
    assert results == [CAR] * 6
    assert len(parks) == 3 and server.count(GET_REPO) == 9
    for answered_at, end in parks:
        later = [r.at for r in server.seen(GET_REPO) if r.at > answered_at]
        assert later and min(later) >= end, (kind, end, later)


async def test_request_queued_for_the_global_cap_waits_for_a_park_set_meanwhile(server: FaultServer) -> None:
    """The second request holds its host slot and waits for the one global slot, which the
    first holds; the first gets a 429. Before: the park was checked before the global wait,
    so the second request went out at once, inside the park."""
    parks: list[tuple[float, float]] = []

    def limited(seen: Seen) -> Reply:
        now = time.time()
        parks.append((now, now + 1))
        return rate_limited("1")

    server.script(GET_REPO, limited, Reply(200, CAR))
    limiter = HostLimiter(per_host_rps=1000, per_host_concurrency=4, global_concurrency=1)
    async with PdsClient(allow_private_hosts=True, max_retries=0, limiter=limiter) as c:
        results = await asyncio.wait_for(asyncio.gather(c.get_repo(server.url, DID), c.get_repo(server.url, DID)), 30)
    assert results == [CAR, CAR]
    ((answered_at, end),) = parks
    later = [r.at for r in server.seen(GET_REPO) if r.at > answered_at]
    assert len(later) == 2 and min(later) >= end
