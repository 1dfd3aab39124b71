"""The whole network against the real reference PDS and PLC (tests/support/network).

The issue's opening example: accounts created and idle before skyfill ever ran are invisible to
a mirror that only follows the firehose. `discover --relay <pds>` lists them (the PDS does not
serve listHosts, so its own listRepos is the list), `gaps` flags them `unseen`, the backfill fills
them; a new write makes one `stale`; a wider collections filter makes them `filter_changed`.

The relay here is a STAND-IN (a scripted server on 127.0.0.1): no real relay can list the hosts
of a local network. Its listHosts names the real PDS and a hostile host; its
listReposByCollection asks the real PDS (listRepos + listRecords) which repos hold a collection.
The PLC's /export is the real @did-plc/server route (the launcher serves its in-memory operations
the way the Postgres database does; see tests/support/network/launcher.js).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from skyfill.app.jobs import run_backfill
from skyfill.app.network import run_discover, run_identities_sync
from skyfill.backfill.config import BackfillConfig
from skyfill.backfill.gaps import detect_gaps
from skyfill.storage import Store

from tests.support.faultserver import FaultServer, Reply, json_reply
from tests.support.network import (
    Create,
    LocalNetwork,
    PdsAccount,
    PdsClient,
    like_record,
    post_record,
)
from tests.support.relay_stand_in import serve_relay

pytestmark = pytest.mark.pds

POST = "app.bsky.feed.post"
LIKE = "app.bsky.feed.like"
MakeAccount = Callable[..., PdsAccount]


def config(net: LocalNetwork, **kw: Any) -> BackfillConfig:
    return BackfillConfig(plc_url=net.plc_url, allow_private_hosts=True, per_host_rps=200.0, **kw)


def gaps(store: Store, dids: Sequence[str], collections: Sequence[str] = ()) -> dict[str, set[str]]:
    """{reason: our DIDs flagged for it} (the session's PDS holds other tests' accounts too)."""
    now = datetime.now(UTC)
    report = asyncio.run(detect_gaps(store, start=now - timedelta(hours=1), end=now, audit=None,
                                     collections=collections))
    out: dict[str, set[str]] = {}
    for did, reasons in report.reasons_by_did.items():
        if did in dids:
            for reason in reasons:
                out.setdefault(reason, set()).add(did)
    return out


def held(store: Store, dids: Sequence[str], collection: str | None = None) -> int:
    marks = ", ".join("?" for _ in dids)
    extra = " AND collection = ?" if collection else ""
    return int(store.fetchall(f"SELECT count(*) FROM records WHERE did IN ({marks}){extra}",
                              [*dids, *([collection] if collection else [])])[0][0])


def idle_accounts(pds_client: PdsClient, make_account: MakeAccount) -> list[PdsAccount]:
    """Three accounts with 26 records (10 + 9 + 7 posts), written before skyfill runs."""
    users = [make_account(name) for name in ("idle-a", "idle-b", "idle-c")]
    for user, n in zip(users, (10, 9, 7), strict=True):
        pds_client.apply_writes(user, [Create(POST, post_record(f"{user.handle} {i}")) for i in range(n)])
    return users


def test_idle_accounts_are_discovered_flagged_unseen_and_backfilled(
    tmp_path: Path, pds_network: LocalNetwork, pds_client: PdsClient, make_account: MakeAccount
) -> None:
    users = idle_accounts(pds_client, make_account)
    dids = [u.did for u in users]
    with Store(tmp_path / "m.duckdb") as store:
        assert gaps(store, dids) == {}   # what the issue saw: nothing to do
        found = asyncio.run(run_discover(store, relay=pds_network.pds_url, config=config(pds_network)))
        assert found.mode == "pds" and not found.errors and found.listed >= 3
        assert gaps(store, dids) == {"unseen": set(dids)}

        summary = asyncio.run(run_backfill(store, dids=sorted(gaps(store, dids)["unseen"]),
                                           config=config(pds_network)))
        assert (summary.repos_ok, summary.repos_failed) == (3, 0)
        assert held(store, dids) == 26
        assert gaps(store, dids) == {}

        # a new write: the next discovery (a fresh run: the last one finished) sees a newer rev
        pds_client.create_record(users[0], POST, post_record("one more"))
        again = asyncio.run(run_discover(store, relay=pds_network.pds_url, config=config(pds_network)))
        assert again.fresh
        assert gaps(store, dids) == {"stale": {users[0].did}}
        summary = asyncio.run(run_backfill(store, dids=[users[0].did], config=config(pds_network)))
        assert summary.repos_ok == 1 and held(store, dids) == 27
        assert gaps(store, dids) == {}


def test_a_wider_collections_filter_flags_filter_changed(
    tmp_path: Path, pds_network: LocalNetwork, pds_client: PdsClient, make_account: MakeAccount
) -> None:
    users = idle_accounts(pds_client, make_account)
    dids = [u.did for u in users]
    post = pds_client.create_record(users[1], POST, post_record("liked"))
    pds_client.create_record(users[0], LIKE, like_record(post))
    with Store(tmp_path / "m.duckdb") as store:
        posts_only = config(pds_network, collections=(POST,))
        assert asyncio.run(run_backfill(store, dids=dids, config=posts_only)).repos_ok == 3
        assert held(store, dids, LIKE) == 0 and held(store, dids) == 27
        assert gaps(store, dids, [POST]) == {}
        assert gaps(store, dids, ["app.bsky.feed.*"]) == {"filter_changed": set(dids)}

        wider = config(pds_network, collections=("app.bsky.feed.*",))
        flagged = sorted(gaps(store, dids, ["app.bsky.feed.*"])["filter_changed"])
        assert asyncio.run(run_backfill(store, dids=flagged, config=wider)).repos_ok == 3
        assert held(store, dids, LIKE) == 1 and held(store, dids) == 28
        assert gaps(store, dids, ["app.bsky.feed.*"]) == {}


def stand_in_relay(relay: FaultServer, net: LocalNetwork, hostile: FaultServer) -> None:
    """listHosts over the local PDS (and a hostile host); listReposByCollection asked of the PDS
    (tests/support/relay_stand_in.py)."""
    serve_relay(relay, {net.pds_url.removeprefix("http://"): net.pds_url}, also_list=[f"127.0.0.1:{hostile.port}"])
    hostile.script("/xrpc/com.atproto.sync.listRepos", json_reply({"repos": [
        {"did": "did:plc:../../etc/passwd", "head": "x", "rev": "3laaaaaaaaa22"}, {"did": 7}, "garbage"]}))


def test_stand_in_relay_lists_its_hosts_and_collections(
    tmp_path: Path, pds_network: LocalNetwork, pds_client: PdsClient, make_account: MakeAccount
) -> None:
    users = idle_accounts(pds_client, make_account)
    dids = [u.did for u in users]
    post = pds_client.create_record(users[2], POST, post_record("liked"))
    pds_client.create_record(users[1], LIKE, like_record(post))
    with FaultServer() as relay, FaultServer() as hostile, Store(tmp_path / "m.duckdb") as store:
        stand_in_relay(relay, pds_network, hostile)
        found = asyncio.run(run_discover(store, relay=relay.url, config=config(pds_network)))
        assert found.mode == "relay" and found.hosts == 2 and found.hosts_done == 2 and found.skipped == 3
        assert gaps(store, dids) == {"unseen": set(dids)}

        with Store(tmp_path / "likes.duckdb") as likes:
            by = asyncio.run(run_discover(likes, relay=relay.url, collections=[LIKE], config=config(pds_network)))
            assert by.mode == "collections" and not by.errors, by
            assert gaps(likes, dids) == {"unseen": {users[1].did}}


def test_identities_sync_from_the_real_plc_export(
    tmp_path: Path, pds_network: LocalNetwork, pds_client: PdsClient, make_account: MakeAccount, server: FaultServer
) -> None:
    users = idle_accounts(pds_client, make_account)
    dids = [u.did for u in users]
    with Store(tmp_path / "m.duckdb") as store:
        synced = asyncio.run(run_identities_sync(store, config=config(pds_network), page_size=2))
        assert synced.complete and synced.error is None and synced.refused == 0 and synced.pages >= 2
        for user in users:
            row = store.load_identity(user.did, max_age=3600)
            assert row is not None and row.pds == pds_network.pds_public_url and row.handle == user.handle
        # a backfill whose PLC answers nothing: keys and endpoints can only come from the export
        server.script("/", Reply(500))
        dead_plc = BackfillConfig(plc_url=server.url, allow_private_hosts=True, per_host_rps=200.0)
        summary = asyncio.run(run_backfill(store, dids=dids, config=dead_plc))
        assert (summary.repos_ok, summary.repos_failed) == (3, 0) and held(store, dids) == 26
        assert not [s for s in server.requests if s.path.startswith("/did:")]
        # resumable: a second sync asks only for what came after the stored cursor
        newcomer = make_account("late")
        more = asyncio.run(run_identities_sync(store, config=config(pds_network)))
        assert more.complete and more.stored >= 1 and more.operations < synced.operations + 1
        assert store.load_identity(newcomer.did, max_age=3600) is not None
