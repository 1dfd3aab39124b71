"""The local reference PDS network behaves like a real PDS: writes land in getRepo, account
status shows in getRepo/listRepos, and subscribeRepos replays real #commit/#account frames.

These prove the world the end-to-end tests build on; they exercise no skyfill pipeline code
beyond skyfill.car (CAR splitting, CID strings).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import libipld
import pytest
from websockets.sync.client import connect

from skyfill.protocol.car import cid_to_str, read_car, verify_block
from tests.support.network import (
    Create,
    Delete,
    LocalNetwork,
    PdsAccount,
    PdsClient,
    Update,
    XrpcError,
    like_record,
    post_record,
)

pytestmark = pytest.mark.pds

POST = "app.bsky.feed.post"
LIKE = "app.bsky.feed.like"
PROFILE = "app.bsky.actor.profile"

MakeAccount = Callable[..., PdsAccount]


def repo_records(car: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """(signed commit, {"collection/rkey": record CID}) by walking the MST from the root."""
    roots, blocks = read_car(car)
    assert all(verify_block(cid, data) for cid, data in blocks.items())
    commit = libipld.decode_dag_cbor(blocks[roots[0]])
    records: dict[str, str] = {}

    def walk(node_cid: bytes) -> None:
        node = libipld.decode_dag_cbor(blocks[node_cid])
        if node["l"] is not None:
            walk(node["l"])
        key = b""
        for entry in node["e"]:
            key = key[: entry["p"]] + entry["k"]
            records[key.decode()] = cid_to_str(entry["v"])
            if entry["t"] is not None:
                walk(entry["t"])

    walk(commit["data"])
    return commit, records


def test_writes_are_visible_in_get_repo(pds_client: PdsClient, make_account: MakeAccount) -> None:
    alice, bob = make_account("alice"), make_account("bob")
    p1 = pds_client.create_record(alice, POST, post_record("one"))
    p2 = pds_client.create_record(alice, POST, post_record("two"))
    pds_client.delete_record(alice, POST, p2.rkey)
    profile = pds_client.put_record(alice, PROFILE, "self", {"$type": PROFILE, "displayName": "Alice"})
    profile = pds_client.put_record(alice, PROFILE, "self", {"$type": PROFILE, "displayName": "Alice B"})
    commit, results = pds_client.apply_writes(
        alice,
        [Create(POST, post_record(f"batch {i}")) for i in range(3)]
        + [Update(POST, p1.rkey, post_record("one, edited")), Delete(PROFILE, "self")],
    )
    like = pds_client.create_record(bob, LIKE, like_record(p1))

    signed, records = repo_records(pds_client.get_repo(alice.did))
    batch = {r["uri"].split("/", 3)[3]: r["cid"] for r in results[:3]}
    assert records == {f"{POST}/{p1.rkey}": results[3]["cid"], **batch}
    assert signed["did"] == alice.did and signed["rev"] == commit.rev
    assert pds_client.get_latest_commit(alice.did) == commit
    assert profile.cid != p1.cid  # the profile existed (updated once), then the batch deleted it

    _, bob_records = repo_records(pds_client.get_repo(bob.did))
    assert bob_records == {f"{LIKE}/{like.rkey}": like.cid}
    assert pds_client.get_record(bob.did, LIKE, like.rkey)["value"]["subject"]["uri"] == p1.uri


def test_account_status_shows_in_get_repo_and_list_repos(
    pds_client: PdsClient, make_account: MakeAccount
) -> None:
    carol = make_account("carol")
    head = pds_client.create_record(carol, POST, post_record("hello")).commit

    pds_client.deactivate(carol)
    with pytest.raises(XrpcError) as err:
        pds_client.get_repo(carol.did)
    assert (err.value.status, err.value.error) == (400, "RepoDeactivated")
    listed = pds_client.list_repos()[carol.did]
    assert (listed["active"], listed["status"], listed["rev"]) == (False, "deactivated", head.rev)

    pds_client.activate(carol)
    assert pds_client.list_repos()[carol.did]["active"] is True
    assert repo_records(pds_client.get_repo(carol.did))[0]["rev"] == head.rev

    pds_client.takedown(carol.did)
    with pytest.raises(XrpcError) as err:
        pds_client.get_repo(carol.did)
    assert err.value.error == "RepoTakendown"
    listed = pds_client.list_repos()[carol.did]
    assert (listed["active"], listed["status"]) == (False, "takendown")

    pds_client.reverse_takedown(carol.did)
    assert pds_client.list_repos()[carol.did]["active"] is True

    pds_client.delete_account(carol.did)
    with pytest.raises(XrpcError) as err:
        pds_client.get_repo(carol.did)
    assert err.value.error == "RepoNotFound"
    assert carol.did not in pds_client.list_repos()


def read_firehose(url: str, *, until: Callable[[dict[str, Any], dict[str, Any]], bool]) -> list[tuple[dict, dict]]:
    """Decoded (header, body) frames from `url` up to and including the one `until` accepts."""
    frames: list[tuple[dict, dict]] = []
    with connect(url, max_size=None, open_timeout=10) as ws:
        while True:
            message = ws.recv(timeout=30)
            assert isinstance(message, bytes)
            header, body = libipld.decode_dag_cbor_multi(message)
            assert header["op"] == 1, body  # op -1 is an error frame
            frames.append((header, body))
            if until(header, body):
                return frames


def test_subscribe_repos_replays_commits_and_account_events(
    pds_network: LocalNetwork, pds_client: PdsClient, make_account: MakeAccount
) -> None:
    dave, erin, frank = make_account("dave"), make_account("erin"), make_account("frank")
    p1 = pds_client.create_record(dave, POST, post_record("first"))
    p2 = pds_client.create_record(dave, POST, post_record("second"))
    gone = pds_client.delete_record(dave, POST, p2.rkey)
    batch, results = pds_client.apply_writes(dave, [Create(POST, post_record(f"b{i}")) for i in range(3)])
    like = pds_client.create_record(erin, LIKE, like_record(p1))
    erin = pds_client.update_handle(erin, "erin2-" + erin.handle.split("-", 1)[1])
    pds_client.deactivate(erin)
    pds_client.activate(erin)
    pds_client.takedown(frank.did)

    def frank_taken_down(header: dict[str, Any], body: dict[str, Any]) -> bool:
        return header["t"] == "#account" and body["did"] == frank.did and body.get("status") == "takendown"

    frames = read_firehose(pds_client.subscribe_url(cursor=0), until=frank_taken_down)
    seqs = [body["seq"] for _, body in frames]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

    # dave: one #commit per write, chained by since -> rev, ops matching what the PDS answered.
    commits = [b for h, b in frames if h["t"] == "#commit" and b["repo"] == dave.did and b["ops"]]
    ops = [[(op["action"], op["path"], op["cid"] and cid_to_str(op["cid"])) for op in c["ops"]] for c in commits]
    assert ops == [
        [("create", f"{POST}/{p1.rkey}", p1.cid)],
        [("create", f"{POST}/{p2.rkey}", p2.cid)],
        [("delete", f"{POST}/{p2.rkey}", None)],
        [("create", r["uri"].split("/", 3)[3], r["cid"]) for r in results],
    ]
    assert [c["rev"] for c in commits] == [p1.commit.rev, p2.commit.rev, gone.rev, batch.rev]
    assert [cid_to_str(c["commit"]) for c in commits] == [p1.commit.cid, p2.commit.cid, gone.cid, batch.cid]
    assert [c["since"] for c in commits[1:]] == [c["rev"] for c in commits[:-1]]
    assert cid_to_str(commits[2]["ops"][0]["prev"]) == p2.cid  # sync 1.1: deletes carry prev
    # the CAR slice carries the signed commit and the new record blocks
    roots, blocks = read_car(commits[3]["blocks"])
    assert cid_to_str(roots[0]) == batch.cid
    assert {cid_to_str(c) for c in blocks} >= {r["cid"] for r in results}
    _, first_blocks = read_car(commits[0]["blocks"])
    record = libipld.decode_dag_cbor(first_blocks[commits[0]["ops"][0]["cid"]])
    assert record["text"] == "first"

    # erin: the like, then the handle change, deactivation and reactivation, in that order.
    erin_events = [(h["t"], b) for h, b in frames if b.get("repo", b.get("did")) == erin.did]
    like_commit = next(b for t, b in erin_events if t == "#commit" and b["ops"])
    assert like_commit["ops"][0]["path"] == f"{LIKE}/{like.rkey}"
    after_like = [(t, b.get("handle"), b.get("active"), b.get("status")) for t, b in erin_events
                  if b["seq"] > like_commit["seq"]]
    assert ("#identity", erin.handle, None, None) in after_like
    accounts = [e[2:] for e in after_like if e[0] == "#account"]
    assert accounts == [(False, "deactivated"), (True, None)]

    # frank: created (active), then taken down.
    frank_accounts = [(b["active"], b.get("status")) for h, b in frames
                      if h["t"] == "#account" and b["did"] == frank.did]
    assert frank_accounts[0] == (True, None) and frank_accounts[-1] == (False, "takendown")
