"""A small sync XRPC client for driving the local reference PDS from tests.

    client = network.client()
    alice = client.create_account("alice.test")
    post = client.create_record(alice, "app.bsky.feed.post", post_record("hi"))
    client.apply_writes(alice, [Create("app.bsky.feed.post", post_record("a")), Delete(...)])
    car = client.get_repo(alice.did)

Errors come back as `XrpcError(status, error, message)`, e.g. error="RepoDeactivated".
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

import httpx

__all__ = [
    "Commit",
    "Create",
    "Delete",
    "PdsAccount",
    "PdsClient",
    "RecordRef",
    "Update",
    "Write",
    "XrpcError",
    "like_record",
    "now_iso",
    "post_record",
]

JSON = dict[str, Any]
MAX_APPLY_WRITES = 200


class XrpcError(Exception):
    def __init__(self, method: str, status: int, error: str | None, message: str | None) -> None:
        super().__init__(f"{method}: HTTP {status} {error}: {message}")
        self.method = method
        self.status = status
        self.error = error
        self.message = message


@dataclass(frozen=True)
class PdsAccount:
    did: str
    handle: str
    access_jwt: str
    refresh_jwt: str
    password: str
    email: str


@dataclass(frozen=True)
class Commit:
    cid: str
    rev: str


@dataclass(frozen=True)
class RecordRef:
    """One written record (uri, cid) and the commit that wrote it."""

    uri: str
    cid: str
    commit: Commit

    @property
    def collection(self) -> str:
        return self.uri.split("/")[3]

    @property
    def rkey(self) -> str:
        return self.uri.split("/")[4]


@dataclass(frozen=True)
class Create:
    collection: str
    value: JSON
    rkey: str | None = None


@dataclass(frozen=True)
class Update:
    collection: str
    rkey: str
    value: JSON


@dataclass(frozen=True)
class Delete:
    collection: str
    rkey: str


Write = Create | Update | Delete


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def post_record(text: str, *, created_at: str | None = None) -> JSON:
    return {"$type": "app.bsky.feed.post", "text": text, "createdAt": created_at or now_iso()}


def like_record(subject: RecordRef, *, created_at: str | None = None) -> JSON:
    return {
        "$type": "app.bsky.feed.like",
        "subject": {"uri": subject.uri, "cid": subject.cid},
        "createdAt": created_at or now_iso(),
    }


def _commit(body: JSON) -> Commit:
    c = body["commit"]
    return Commit(cid=c["cid"], rev=c["rev"])


class PdsClient:
    """XRPC calls against one PDS. Account calls take the `PdsAccount` to act as."""

    def __init__(self, base_url: str, *, admin_password: str | None = None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._admin = httpx.BasicAuth("admin", admin_password) if admin_password else None
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PdsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        *,
        http_method: str = "GET",
        params: JSON | None = None,
        body: JSON | None = None,
        account: PdsAccount | None = None,
        admin: bool = False,
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {account.access_jwt}"} if account else {}
        auth = self._admin if admin else None
        if admin and auth is None:
            raise ValueError("this client has no admin password")
        # httpx sends a body (and Content-Type) only when json= is given: activateAccount
        # rejects any body, so a POST without one must pass no json at all.
        kwargs: dict[str, Any] = {"params": params, "headers": headers}
        if auth is not None:
            kwargs["auth"] = auth
        if body is not None:
            kwargs["json"] = body
        try:
            resp = self._http.request(http_method, f"/xrpc/{method}", **kwargs)
        except httpx.HTTPError as exc:
            raise XrpcError(method, 0, type(exc).__name__, str(exc)) from exc
        if resp.status_code >= 400:
            try:
                err = resp.json()
            except ValueError:
                err = {"message": resp.text[:500]}
            raise XrpcError(method, resp.status_code, err.get("error"), err.get("message"))
        return resp

    def _post(self, method: str, body: JSON | None = None, **kw: Any) -> JSON:
        resp = self._call(method, http_method="POST", body=body, **kw)
        return resp.json() if resp.content else {}

    def _get(self, method: str, params: JSON | None = None, **kw: Any) -> JSON:
        return self._call(method, params=params, **kw).json()  # type: ignore[no-any-return]

    # -- accounts -------------------------------------------------------------------------

    def create_account(self, handle: str, *, password: str | None = None, email: str | None = None) -> PdsAccount:
        password = password or secrets.token_urlsafe(12)
        email = email or f"{handle.split('.')[0]}-{secrets.token_hex(3)}@example.com"
        out = self._post(
            "com.atproto.server.createAccount", {"handle": handle, "email": email, "password": password}
        )
        return PdsAccount(
            did=out["did"],
            handle=out["handle"],
            access_jwt=out["accessJwt"],
            refresh_jwt=out["refreshJwt"],
            password=password,
            email=email,
        )

    def update_handle(self, account: PdsAccount, handle: str) -> PdsAccount:
        self._post("com.atproto.identity.updateHandle", {"handle": handle}, account=account)
        return replace(account, handle=handle)

    def deactivate(self, account: PdsAccount) -> None:
        self._post("com.atproto.server.deactivateAccount", {}, account=account)

    def activate(self, account: PdsAccount) -> None:
        self._post("com.atproto.server.activateAccount", None, account=account)  # no body!

    def takedown(self, did: str, *, ref: str = "skyfill-test") -> None:
        self._set_takedown(did, {"applied": True, "ref": ref})

    def reverse_takedown(self, did: str) -> None:
        self._set_takedown(did, {"applied": False})

    def _set_takedown(self, did: str, takedown: JSON) -> None:
        subject = {"$type": "com.atproto.admin.defs#repoRef", "did": did}
        self._post("com.atproto.admin.updateSubjectStatus", {"subject": subject, "takedown": takedown}, admin=True)

    def delete_account(self, did: str) -> None:
        self._post("com.atproto.admin.deleteAccount", {"did": did}, admin=True)

    # -- records --------------------------------------------------------------------------

    def create_record(
        self, account: PdsAccount, collection: str, record: JSON, *, rkey: str | None = None
    ) -> RecordRef:
        body: JSON = {"repo": account.did, "collection": collection, "record": record}
        if rkey is not None:
            body["rkey"] = rkey
        out = self._post("com.atproto.repo.createRecord", body, account=account)
        return RecordRef(uri=out["uri"], cid=out["cid"], commit=_commit(out))

    def put_record(self, account: PdsAccount, collection: str, rkey: str, record: JSON) -> RecordRef:
        body = {"repo": account.did, "collection": collection, "rkey": rkey, "record": record}
        out = self._post("com.atproto.repo.putRecord", body, account=account)
        return RecordRef(uri=out["uri"], cid=out["cid"], commit=_commit(out))

    def delete_record(self, account: PdsAccount, collection: str, rkey: str) -> Commit:
        body = {"repo": account.did, "collection": collection, "rkey": rkey}
        return _commit(self._post("com.atproto.repo.deleteRecord", body, account=account))

    def apply_writes(self, account: PdsAccount, writes: Sequence[Write]) -> tuple[Commit, list[JSON]]:
        """All writes in ONE commit (the PDS allows at most 200). Returns the commit and the
        per-write results ({uri, cid} for creates/updates, {} for deletes)."""
        if not 0 < len(writes) <= MAX_APPLY_WRITES:
            raise ValueError(f"applyWrites takes 1..{MAX_APPLY_WRITES} writes, got {len(writes)}")
        ops: list[JSON] = []
        for w in writes:
            if isinstance(w, Create):
                op: JSON = {"$type": "com.atproto.repo.applyWrites#create", "collection": w.collection, "value": w.value}
                if w.rkey is not None:
                    op["rkey"] = w.rkey
            elif isinstance(w, Update):
                op = {"$type": "com.atproto.repo.applyWrites#update", "collection": w.collection, "rkey": w.rkey, "value": w.value}
            else:
                op = {"$type": "com.atproto.repo.applyWrites#delete", "collection": w.collection, "rkey": w.rkey}
            ops.append(op)
        out = self._post("com.atproto.repo.applyWrites", {"repo": account.did, "writes": ops}, account=account)
        return _commit(out), list(out.get("results", []))

    def get_record(self, did: str, collection: str, rkey: str) -> JSON:
        return self._get("com.atproto.repo.getRecord", {"repo": did, "collection": collection, "rkey": rkey})

    # -- sync -----------------------------------------------------------------------------

    def get_repo(self, did: str) -> bytes:
        """The whole repo as CAR bytes (never with `since`: deletions would be invisible)."""
        return self._call("com.atproto.sync.getRepo", params={"did": did}).content

    def get_latest_commit(self, did: str) -> Commit:
        out = self._get("com.atproto.sync.getLatestCommit", {"did": did})
        return Commit(cid=out["cid"], rev=out["rev"])

    def get_repo_status(self, did: str) -> JSON:
        return self._get("com.atproto.sync.getRepoStatus", {"did": did})

    def iter_repos(self, *, page_size: int = 1000) -> Iterator[JSON]:
        """Every entry of listRepos ({did, head, rev, active, status?}), following cursors."""
        cursor: str | None = None
        while True:
            params: JSON = {"limit": page_size}
            if cursor:
                params["cursor"] = cursor
            page = self._get("com.atproto.sync.listRepos", params)
            yield from page.get("repos", [])
            cursor = page.get("cursor")
            if not cursor or not page.get("repos"):
                return

    def list_repos(self) -> dict[str, JSON]:
        return {r["did"]: r for r in self.iter_repos()}

    def subscribe_url(self, *, cursor: int | None = None) -> str:
        url = self.base_url.replace("http://", "ws://", 1) + "/xrpc/com.atproto.sync.subscribeRepos"
        return url if cursor is None else f"{url}?cursor={cursor}"
