"""A deterministic little network: N accounts with signed repos and a firehose of their commits.

Chains are intact: for each DID, frame k's `since` is frame k-1's `rev` and its `prevData` is
frame k-1's MST root (the first frame points at the account's initial repo, which `repo_car`
serves before any frame is drawn). `blocks` holds the signed commit, every MST node that is new
in this commit, the search path of each deleted key (together: enough to invert the ops from
the frame alone) and the new record blocks. The MST is edited in place per commit (no
shortcut). `seq` increases by one per frame across all DIDs.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import cbrrr
import coincurve

from .identity import GeneratedIdentity, make_identity
from .mst import Tree
from .records import PROFILE_KEY, RecordMaker, iso_time, tid
from .repo import REPO_EPOCH_MICROS, car_block, car_header, sign_commit, write_car

__all__ = ["World", "generate_frames", "FIREHOSE_EPOCH_MICROS", "FIRST_SEQ"]

FIREHOSE_EPOCH_MICROS: Final = 1_748_736_000_000_000  # 2025-06-01T00:00:00Z
FIRST_SEQ: Final = 1_000_000
_DELETE_SHARE: Final = 0.06
_IDENTITY_SHARE: Final = 0.003
_ACCOUNT_SHARE: Final = 0.002

_encode = cbrrr.encode_dag_cbor
_CID = cbrrr.CID
_HEADERS: Final = {t: _encode({"op": 1, "t": t}) for t in ("#commit", "#identity", "#account")}


@dataclass(slots=True)
class _Account:
    identity: GeneratedIdentity
    key: coincurve.PrivateKey
    tree: Tree
    cids: dict[bytes, bytes]                 # live record key -> record CID
    keys: list[bytes]                        # the same keys, for O(1) random choice
    pos: dict[bytes, int]                    # key -> index in `keys`
    blocks: dict[bytes, bytes] | None        # record CID -> block, when retained
    rev: str = ""
    data: bytes = b""
    commit: tuple[bytes, bytes] = (b"", b"")
    touched: set[bytes] = field(default_factory=set)

    def add(self, key: bytes, cid: bytes) -> None:
        if key not in self.pos:
            self.pos[key] = len(self.keys)
            self.keys.append(key)
        self.cids[key] = cid

    def remove(self, key: bytes) -> bytes:
        i = self.pos.pop(key)
        last = self.keys.pop()
        if last != key:
            self.keys[i] = last
            self.pos[last] = i
        return self.cids.pop(key)


class World:
    """Accounts, their repos and their firehose, all drawn from one seed.

    `frames()` continues where the previous call stopped; `repo_car(did)` is the repo as of
    the last frame drawn (needs `retain_blocks=True`, the default).
    """

    def __init__(
        self,
        seed: int,
        *,
        n_dids: int,
        initial_records: tuple[int, int] = (0, 40),
        retain_blocks: bool = True,
        handle_domain: str = "test",
    ) -> None:
        if n_dids < 1:
            raise ValueError("n_dids must be >= 1")
        rng = random.Random(seed)
        self._rng = rng
        self.identities: tuple[GeneratedIdentity, ...] = tuple(
            make_identity(rng, handle_domain=handle_domain) for _ in range(n_dids)
        )
        dids = [i.did for i in self.identities]
        self._maker = RecordMaker(rng, peers=dids)
        # activity is skewed: a few accounts write most of the frames
        weights = [rng.paretovariate(1.2) for _ in dids]
        acc = 0.0
        self._cum = []
        for w in weights:
            acc += w
            self._cum.append(acc)
        self._accounts: list[_Account] = []
        self._by_did: dict[str, _Account] = {}
        for ident in self.identities:
            account = self._initial_account(ident, rng.randint(*initial_records), retain_blocks)
            self._accounts.append(account)
            self._by_did[ident.did] = account
        self._micros = FIREHOSE_EPOCH_MICROS
        self._seq = FIRST_SEQ - 1

    @property
    def dids(self) -> list[str]:
        return [i.did for i in self.identities]

    @property
    def last_seq(self) -> int:
        return self._seq

    def _initial_account(self, ident: GeneratedIdentity, n: int, retain: bool) -> _Account:
        account = _Account(
            identity=ident, key=ident.key, tree=Tree(), cids={}, keys=[], pos={},
            blocks={} if retain else None,
        )
        rng = self._rng
        micros = REPO_EPOCH_MICROS + rng.randrange(86_400_000_000 * 300)
        items = []
        for i in range(n):
            micros += rng.randrange(1, 86_400_000_000)
            collection = "app.bsky.actor.profile" if i == 0 else self._maker.collection()
            if collection == "app.bsky.actor.profile" and i:
                collection = "app.bsky.feed.like"
            block, cid = self._maker.encode(collection, micros)
            key = PROFILE_KEY if i == 0 else f"{collection}/{tid(micros, i & 1023)}".encode()
            items.append((key, cid))
            account.add(key, cid)
            if account.blocks is not None:
                account.blocks[cid] = block
        account.tree = Tree.build(sorted(items))
        account.data, _ = account.tree.seal()
        account.rev = tid(micros + 1, 0)
        account.commit = sign_commit(account.key, did=ident.did, data=account.data, rev=account.rev)
        return account

    def repo_car(self, did: str) -> bytes:
        account = self._by_did[did]
        if account.blocks is None:
            raise RuntimeError("World was built with retain_blocks=False")
        commit_cid, commit_block = account.commit
        blocks = [(commit_cid, commit_block), *account.tree.blocks()]
        blocks.extend((cid, account.blocks[cid]) for cid in account.cids.values())
        return write_car(commit_cid, blocks)

    def head(self, did: str) -> tuple[str, bytes, bytes]:
        """(rev, commit cid, data cid) of the account's current commit."""
        account = self._by_did[did]
        return account.rev, account.commit[0], account.data

    def account_frame(self, did: str, *, active: bool, status: str | None = None) -> bytes:
        """One `#account` frame for `did` at the next seq (e.g. active=False, status="deleted")."""
        self._micros += 1000
        self._seq += 1
        body: dict[str, Any] = {"active": active, "did": did, "seq": self._seq, "time": iso_time(self._micros)}
        if status is not None:
            body["status"] = status
        return _HEADERS["#account"] + _encode(body)

    def frames(self, n_frames: int) -> Iterator[bytes]:
        rng = self._rng
        accounts = self._accounts
        cum = self._cum
        total = cum[-1]
        for _ in range(n_frames):
            self._micros += rng.randrange(1, 4000)  # ~500 events/s of simulated time
            self._seq += 1
            account = accounts[_bisect(cum, rng.random() * total)]
            x = rng.random()
            if x < _IDENTITY_SHARE:
                body: dict[str, Any] = {
                    "did": account.identity.did,
                    "handle": account.identity.handle,
                    "seq": self._seq,
                    "time": iso_time(self._micros),
                }
                yield _HEADERS["#identity"] + _encode(body)
            elif x < _IDENTITY_SHARE + _ACCOUNT_SHARE:
                body = {
                    "active": True,
                    "did": account.identity.did,
                    "seq": self._seq,
                    "time": iso_time(self._micros),
                }
                yield _HEADERS["#account"] + _encode(body)
            else:
                yield self._commit_frame(account)

    def _commit_frame(self, account: _Account) -> bytes:
        rng = self._rng
        maker = self._maker
        micros = self._micros
        r = rng.random()
        n_ops = 1 if r < 0.95 else rng.randint(2, 5) if r < 0.99 else rng.randint(6, 12)
        ops: list[dict[str, Any]] = []
        record_blocks: list[tuple[bytes, bytes]] = []
        touched = account.touched
        touched.clear()
        deleted: list[bytes] = []
        tree = account.tree
        for j in range(n_ops):
            if account.keys and rng.random() < _DELETE_SHARE:
                key = account.keys[rng.randrange(len(account.keys))]
                if key not in touched:
                    touched.add(key)
                    prev = account.remove(key)
                    tree.delete(key)
                    deleted.append(key)
                    if account.blocks is not None:
                        account.blocks.pop(prev, None)
                    ops.append({"action": "delete", "cid": None, "path": key.decode(), "prev": _CID(prev)})
                    continue
            collection = maker.collection()
            if collection == "app.bsky.actor.profile":
                key = PROFILE_KEY
                if key in touched:
                    collection, key = "app.bsky.feed.like", None
            else:
                key = None
            if key is None:
                key = f"{collection}/{tid(micros, j)}".encode()
            touched.add(key)
            block, cid = maker.encode(collection, micros)
            prev = account.cids.get(key)
            account.add(key, cid)
            tree.put(key, cid)
            record_blocks.append((cid, block))
            if account.blocks is not None:
                if prev is not None:
                    account.blocks.pop(prev, None)
                account.blocks[cid] = block
            op: dict[str, Any] = {"action": "create" if prev is None else "update", "cid": _CID(cid), "path": key.decode()}
            if prev is not None:
                op["prev"] = _CID(prev)
            ops.append(op)

        prev_rev, prev_data = account.rev, account.data
        data, nodes = tree.seal()
        rev = tid(micros, 0)
        commit_cid, commit_block = sign_commit(account.key, did=account.identity.did, data=data, rev=rev)
        account.rev, account.data, account.commit = rev, data, (commit_cid, commit_block)
        parts = [car_header(commit_cid), car_block(commit_cid, commit_block)]
        parts.extend(car_block(c, b) for c, b in nodes)
        if deleted:  # nodes needed to re-insert deleted keys (inversion), if not new already
            seen = {c for c, _ in nodes}
            for key in deleted:
                for c, b in tree.search_path(key):
                    if c not in seen:
                        seen.add(c)
                        parts.append(car_block(c, b))
        parts.extend(car_block(c, b) for c, b in record_blocks)
        body = {
            "blobs": [],
            "blocks": b"".join(parts),
            "commit": _CID(commit_cid),
            "ops": ops,
            "prevData": _CID(prev_data),
            "rebase": False,
            "repo": account.identity.did,
            "rev": rev,
            "seq": self._seq,
            "since": prev_rev,
            "time": iso_time(micros),
            "tooBig": False,
        }
        return _HEADERS["#commit"] + _encode(body)


def _bisect(cum: Sequence[float], x: float) -> int:
    return min(bisect_right(cum, x), len(cum) - 1)


def generate_frames(seed: int, *, n_dids: int, n_frames: int) -> Iterator[bytes]:
    """`n_frames` firehose frames (header + body DAG-CBOR) from `n_dids` accounts."""
    world = World(seed, n_dids=n_dids, retain_blocks=False)
    return world.frames(n_frames)
