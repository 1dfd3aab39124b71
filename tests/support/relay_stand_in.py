"""A relay STAND-IN on 127.0.0.1 over local PDSes: no real relay lists the hosts of a local network.

    with FaultServer() as relay:
        serve_relay(relay, {"localhost:PORT": "http://127.0.0.1:PORT", ...})

- `com.atproto.sync.listHosts`: the given hostnames (as a relay names them), all active;
- `com.atproto.sync.listRepos`: the union of the hosts' own listRepos (one page);
- `com.atproto.sync.listReposByCollection`: computed from the hosts' real repos (each listed
  DID whose listRecords of that collection is not empty), since the reference PDS does not
  serve it. One page, no cursor.
Each value is the URL the stand-in asks for that host's data (the PDS itself); the hostname is
what the relay tells its clients, who then ask that host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from tests.support.faultserver import FaultServer, Reply, Seen, json_reply

__all__ = ["serve_relay"]

_LIST_HOSTS = "/xrpc/com.atproto.sync.listHosts"
_LIST_REPOS = "/xrpc/com.atproto.sync.listRepos"
_BY_COLLECTION = "/xrpc/com.atproto.sync.listReposByCollection"


def _repos(http: httpx.Client, url: str) -> list[dict[str, Any]]:
    repos: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
        body = http.get(f"{url}{_LIST_REPOS}", params=params).raise_for_status().json()
        repos += body.get("repos", [])
        cursor = body.get("cursor")
        if not cursor or not body.get("repos"):
            return repos


def serve_relay(relay: FaultServer, hosts: Mapping[str, str], *, also_list: Sequence[str] = ()) -> None:
    """Script `relay` as a relay over `hosts` ({hostname as listed: URL to ask}); `also_list` names
    more hosts in listHosts only (e.g. a hostile one the test scripts itself)."""
    relay.script(_LIST_HOSTS, json_reply({"hosts": [
        {"hostname": name, "status": "active"} for name in [*hosts, *also_list]]}))

    def list_repos(seen: Seen) -> Reply:
        with httpx.Client(timeout=30) as http:
            return json_reply({"repos": [r for url in hosts.values() for r in _repos(http, url)]})

    def by_collection(seen: Seen) -> Reply:
        collection = seen.query["collection"]
        dids = []
        with httpx.Client(timeout=30) as http:
            for url in hosts.values():
                for repo in _repos(http, url):
                    records = http.get(f"{url}/xrpc/com.atproto.repo.listRecords", params={
                        "repo": repo["did"], "collection": collection, "limit": 1}).json().get("records")
                    if records:
                        dids.append(repo["did"])
        return json_reply({"repos": [{"did": d} for d in dids]})

    relay.script(_LIST_REPOS, list_repos)
    relay.script(_BY_COLLECTION, by_collection)
