"""The truth oracle: what the PDS serves (com.atproto.sync.getRepo) versus what skyfill stored.

Independent of the code under test on purpose: the CAR is read with the atproto SDK
(`atproto_core.car.CAR`) and the MST is walked here, not by backfill/repo.py or skyfill/car.py.

    diff = mirror_diff(con, client, dids)      # [] when equal, else readable lines
    assert_mirror_equals(con, client, dids)    # raises with the whole diff

Per DID, the truth is getRepo's signed commit (rev) and its MST ((collection, rkey) -> CID):
- the repo is served: the `records` rows of the DID must be exactly that set (none missing,
  none extra, no stale CID) and `repos.rev` must equal the commit's rev;
- RepoNotFound (deleted account): the DID must have no `records` rows;
- RepoDeactivated / RepoTakendown / RepoSuspended: no repo to compare; the caller checks the
  status columns (or passes a `Truth` taken before the account went away).

Also here: `commit_seq` finds the firehose seq of a known commit (the exact way to say "the
consumer has caught up to this write"), and `head_seq` the PDS's current firehose head.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import duckdb
import libipld
from atproto_core.car import CAR
from atproto_core.cid import CID
from websockets.sync.client import connect

from tests.support.network import PdsAccount, PdsClient, XrpcError, post_record

__all__ = [
    "Truth",
    "repo_truth",
    "fetch_truth",
    "mirror_diff",
    "assert_mirror_equals",
    "commit_seq",
    "head_seq",
]

Key = tuple[str, str]  # (collection, rkey)


@dataclass(frozen=True)
class Truth:
    did: str
    rev: str | None = None
    records: Mapping[Key, str] = field(default_factory=dict)
    error: str | None = None  # the PDS's XRPC error name when getRepo refused (RepoNotFound, ...)


def _cid(link: Any) -> str:
    return str(link) if isinstance(link, CID) else str(CID.from_decoded_bytes(link))


def repo_truth(did: str, car_bytes: bytes) -> Truth:
    """Walk a getRepo CAR from its root commit. Unreachable blocks are ignored by construction."""
    car = CAR.from_bytes(car_bytes)
    blocks = {str(cid): block for cid, block in car.blocks.items()}
    commit = blocks[str(car.root)]
    if commit["did"] != did:
        raise AssertionError(f"getRepo({did}) returned a commit for {commit['did']}")
    records: dict[Key, str] = {}
    stack = [_cid(commit["data"])]
    while stack:
        node = blocks[stack.pop()]  # a KeyError here = a truncated CAR: the oracle must not guess
        if node.get("l") is not None:
            stack.append(_cid(node["l"]))
        key = b""
        for entry in node["e"]:
            key = key[: entry["p"]] + entry["k"]
            collection, rkey = key.decode().split("/", 1)
            records[(collection, rkey)] = _cid(entry["v"])
            if entry.get("t") is not None:
                stack.append(_cid(entry["t"]))
    return Truth(did=did, rev=commit.get("rev"), records=records)


def fetch_truth(client: PdsClient, did: str) -> Truth:
    try:
        car = client.get_repo(did)
    except XrpcError as exc:
        if exc.status == 400 and exc.error:
            return Truth(did=did, error=exc.error)
        raise
    return repo_truth(did, car)


def rows_of(con: Any, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
    """Rows of `sql` from a raw DuckDB connection, or a skyfill Store or one of its `read()` cursors."""
    if isinstance(con, duckdb.DuckDBPyConnection):
        return con.execute(sql, list(params)).fetchall()
    return con.fetchall(sql, params)  # type: ignore[no-any-return]


def _held(con: Any, did: str) -> tuple[dict[Key, str], tuple[Any, ...] | None]:
    rows = rows_of(con, "SELECT collection, rkey, cid FROM records WHERE did = ?", [did])
    repo = rows_of(con, "SELECT rev, status, active, sync_state FROM repos WHERE did = ?", [did])
    return {(c, k): cid for c, k, cid in rows}, (repo[0] if repo else None)


def _diff_one(con: Any, truth: Truth) -> list[str]:
    held, repo = _held(con, truth.did)
    did = truth.did
    if truth.error == "RepoNotFound":
        return [f"{did}: deleted at the PDS but {len(held)} records are still stored"] if held else []
    if truth.error is not None:
        return []  # deactivated / taken down: nothing served to compare against
    out: list[str] = []
    if repo is None:
        out.append(f"{did}: no repos row")
    elif repo[0] != truth.rev:
        out.append(f"{did}: rev stored {repo[0]} != PDS {truth.rev}")
    for key in sorted(truth.records.keys() - held.keys()):
        out.append(f"{did}: missing {key[0]}/{key[1]} {truth.records[key]}")
    for key in sorted(held.keys() - truth.records.keys()):
        out.append(f"{did}: extra   {key[0]}/{key[1]} {held[key]}")
    for key in sorted(held.keys() & truth.records.keys()):
        if held[key] != truth.records[key]:
            out.append(f"{did}: stale   {key[0]}/{key[1]} stored {held[key]} != PDS {truth.records[key]}")
    return out


def mirror_diff(
    con: Any,
    client: PdsClient,
    dids: Iterable[str],
    *,
    truths: Mapping[str, Truth] | None = None,
    exhaustive: bool = True,
) -> list[str]:
    """Readable differences between the store (`con`: see `rows_of`) and the PDS.

    `truths` overrides the live fetch for some DIDs (e.g. a snapshot taken before deactivation).
    With `exhaustive`, records of any DID outside `dids` are reported as extra too.
    """
    wanted = list(dict.fromkeys(dids))
    out: list[str] = []
    for did in wanted:
        truth = (truths or {}).get(did) or fetch_truth(client, did)
        out.extend(_diff_one(con, truth))
    if exhaustive:
        others = rows_of(
            con, "SELECT did, collection, rkey, cid FROM records WHERE did NOT IN (SELECT unnest(?::VARCHAR[])) "
            "ORDER BY ALL", [wanted]
        )
        out.extend(f"{d}: extra   {c}/{k} {cid} (a DID outside the scenario)" for d, c, k, cid in others)
    return out


def assert_mirror_equals(con: Any, client: PdsClient, dids: Iterable[str], **kw: Any) -> None:
    diff = mirror_diff(con, client, dids, **kw)
    if diff:
        shown = "\n  ".join(diff[:60])
        raise AssertionError(f"the mirror differs from the PDS ({len(diff)} lines):\n  {shown}")


# -- firehose positions --------------------------------------------------------------------

_known_seq: dict[str, int] = {}  # per PDS: the highest seq found, a lower bound for any NEW write


def commit_seq(client: PdsClient, did: str, rev: str, *, since: int = 0, timeout: float = 30.0) -> int:
    """The firehose seq of `did`'s commit `rev`, read back from the PDS's own subscribeRepos.

    Replays from `since` (a seq known to precede the commit, e.g. a `head_seq` taken before the
    write; 0 replays everything): a cursor replay has no start-up race, unlike a live
    subscription opened just before a write.
    """
    with connect(client.subscribe_url(cursor=since), max_size=None, open_timeout=10) as ws:
        while True:
            message = ws.recv(timeout=timeout)
            assert isinstance(message, bytes)
            header, body = libipld.decode_dag_cbor_multi(message)
            if header.get("op") != 1:
                raise AssertionError(f"firehose error frame: {body}")
            if header.get("t") == "#commit" and body["repo"] == did and body["rev"] == rev:
                _known_seq[client.base_url] = max(_known_seq.get(client.base_url, 0), body["seq"])
                return int(body["seq"])


_clocks: dict[str, PdsAccount] = {}


def head_seq(client: PdsClient) -> int:
    """The PDS's current firehose head: the seq of a fresh write by a dedicated `clock` account.

    A consumer started with `cursor=head_seq(...)` starts exactly at the live head (every later
    event, none before), without the race of a cursor-less subscription against our next write.
    The clock account only ever writes here, so a consumer started this way never sees it.
    """
    clock = _clocks.get(client.base_url)
    if clock is None:
        clock = _clocks[client.base_url] = client.create_account(f"clock-{secrets.token_hex(3)}.test")
    ref = client.create_record(clock, "app.bsky.feed.post", post_record("tick"))
    # every earlier head precedes this fresh write, so the search may start there
    return commit_seq(client, clock.did, ref.commit.rev, since=_known_seq.get(client.base_url, 0))
