"""A scripted PLC directory + PDS on one FaultServer: generated identities and signed repo CARs."""

from __future__ import annotations

import random
from typing import Any

import libipld

from tests.support.generate.firehose import World as FirehoseWorld
from tests.support.generate.identity import GeneratedIdentity, did_document, make_identity
from tests.support.generate.repo import generate_repo
from tests.support.faultserver import FaultServer, Reply, Seen, json_reply, xrpc_error

__all__ = ["GET_REPO", "World", "serve_firehose_world", "break_chain"]

GET_REPO = "/xrpc/com.atproto.sync.getRepo"


class World:
    """DIDs, their documents and repos, served by one FaultServer (PLC at /, PDS at /xrpc)."""

    def __init__(self, srv: FaultServer) -> None:
        self.srv = srv
        self.rng = random.Random(7)
        self.docs: dict[str, Any] = {}
        self.repos: dict[str, list[Reply]] = {}
        self.plc_hits: dict[str, int] = {}
        self.repo_hits: dict[str, int] = {}
        srv.script(GET_REPO, self._get_repo)

    def account(self, n_records: int = 20) -> tuple[GeneratedIdentity, bytes]:
        ident = make_identity(self.rng)
        car = generate_repo(self.rng, did=ident.did, key=ident.secret, n_records=n_records)
        self.set_doc(ident.did, did_document(ident, self.srv.url))
        self.repos[ident.did] = [Reply(200, car, {"Content-Type": "application/vnd.ipld.car"})]
        return ident, car

    def set_doc(self, did: str, doc: Any) -> None:
        self.docs[did] = doc
        self.srv.script(f"/{did}", lambda seen: self._plc(did))

    def _plc(self, did: str) -> Reply:
        self.plc_hits[did] = self.plc_hits.get(did, 0) + 1
        return json_reply(self.docs[did])

    def _get_repo(self, seen: Seen) -> Reply:
        did = seen.query.get("did", "")
        self.repo_hits[did] = self.repo_hits.get(did, 0) + 1
        replies = self.repos.get(did)
        if not replies:
            return xrpc_error("RepoNotFound", "no such repo")
        return replies.pop(0) if len(replies) > 1 else replies[0]


def serve_firehose_world(srv: FaultServer, world: FirehoseWorld) -> None:
    """Serve a generated firehose world's DID documents (PLC at /) and repo CARs (getRepo) on `srv`."""
    cars = {did: world.repo_car(did) for did in world.dids}
    for ident in world.identities:
        srv.script(f"/{ident.did}", json_reply(did_document(ident, srv.url)))
    srv.script(GET_REPO, lambda seen: Reply(200, cars[seen.query["did"]]))


def break_chain(frames: list[bytes], did: str) -> list[bytes]:
    """`frames` without `did`'s second #commit: its next commit no longer chains on (a relay that
    lost an event), so a consumer marks the repo desynchronized."""
    commits = [i for i, frame in enumerate(frames) if _commit_repo(frame) == did]
    assert len(commits) >= 3, f"{did} has {len(commits)} commits in these frames; need 3"
    return frames[: commits[1]] + frames[commits[1] + 1 :]


def _commit_repo(frame: bytes) -> str | None:
    header, body = libipld.decode_dag_cbor_multi(frame)
    return body.get("repo") if header.get("t") == "#commit" else None
