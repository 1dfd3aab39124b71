"""`identities sync` against a scripted PLC on 127.0.0.1: export lines parsed like a resolve would
read the document, paging by `after`, resume, newest operation per DID, tombstones, nullified and
hostile lines; and the resolver answering from the bulk table without a request.

The real PLC's /export (the local @did-plc/server) is in tests/test_discover_pds.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import coincurve
import libipld
import pytest

from skyfill.app.network import run_identities_sync
from skyfill.backfill.config import BackfillConfig
from skyfill.net.identity import Resolver
from skyfill.net.plc import parse_export_line
from skyfill.storage import Store
from tests.support.faultserver import FaultServer, Reply, Seen
from tests.support.store import SetupStore

_B32 = "234567abcdefghijklmnopqrstuvwxyz"


def did(n: int) -> str:
    return "did:plc:" + "".join(_B32[(n >> (5 * i)) & 31] for i in range(24))


def key(n: int) -> str:
    point = coincurve.PrivateKey(bytes([n + 1] * 32)).public_key.format(compressed=True)
    return "did:key:" + libipld.encode_multibase("z", b"\xe7\x01" + point)


def op(n: int, at: str, *, handle: str = "a.test", pds: str = "https://pds.example", k: int | None = None,
       nullified: bool = False, kind: str = "plc_operation") -> bytes:
    operation: dict[str, object] = {
        "type": kind, "verificationMethods": {"atproto": key(n if k is None else k)},
        "rotationKeys": [], "alsoKnownAs": [f"at://{handle}"],
        "services": {"atproto_pds": {"type": "AtprotoPersonalDataServer", "endpoint": pds}}, "prev": None, "sig": "x",
    }
    if kind == "plc_tombstone":
        operation = {"type": kind, "prev": "bafy", "sig": "x"}
    return json.dumps({"did": did(n), "operation": operation, "cid": f"bafy{n}", "nullified": nullified,
                       "createdAt": at}).encode()


def at(i: int) -> str:
    return f"2026-01-01T00:00:{i:02d}.000Z"


def test_parse_export_lines() -> None:
    good = parse_export_line(op(1, at(1), handle="Alice.Test"))
    assert good is not None and good.pds == "https://pds.example" and good.handle == "alice.test"
    assert good.signing_key == key(1).removeprefix("did:key:") and good.error is None
    legacy = json.dumps({"did": did(2), "createdAt": at(2), "nullified": False, "operation": {
        "type": "create", "signingKey": key(2), "recoveryKey": key(3), "handle": "old.test",
        "service": "https://old.example", "prev": None, "sig": "x"}}).encode()
    entry = parse_export_line(legacy)
    assert entry is not None and (entry.pds, entry.handle) == ("https://old.example", "old.test")
    tomb = parse_export_line(op(3, at(3), kind="plc_tombstone"))
    assert tomb is not None and tomb.tombstone and tomb.pds is None
    assert parse_export_line(op(4, at(4), nullified=True)) is None
    unsafe = parse_export_line(op(5, at(5), pds="http://0177.0.0.1"))
    assert unsafe is not None and unsafe.pds is None and "host guard" in (unsafe.error or "")
    for bad in (b"{", b"[]", b'{"did": "did:web:x.test", "operation": {}, "createdAt": "2026-01-01T00:00:00Z"}',
                json.dumps({"did": did(6), "operation": {"type": "nonsense"}, "createdAt": at(6)}).encode()):
        with pytest.raises(ValueError):
            parse_export_line(bad)


@pytest.fixture
def plc(server: FaultServer) -> Iterator[tuple[FaultServer, list[bytes]]]:
    """A PLC serving `lines` (sorted by createdAt) from /export like the Postgres-backed one."""
    lines: list[bytes] = []

    def export(seen: Seen) -> Reply:
        after = seen.query.get("after")
        count = int(seen.query.get("count", "1000"))
        rows = [line for line in lines if after is None or _created(line) > after]
        return Reply(200, b"\n".join(rows[:count]), {"Content-Type": "application/jsonlines"})

    server.script("/export", export)
    yield server, lines


def _created(line: bytes) -> str:
    return str(json.loads(line)["createdAt"])


def config(url: str) -> BackfillConfig:
    return BackfillConfig(plc_url=url, allow_private_hosts=True, per_host_rps=500.0, request_retries=0)


def test_sync_pages_resumes_and_keeps_the_newest(tmp_path: Path, plc: tuple[FaultServer, list[bytes]]) -> None:
    server, lines = plc
    lines += [op(1, at(1), handle="one.test"), op(2, at(2)), op(3, at(3)),
              op(1, at(4), handle="one-renamed.test", pds="https://moved.example", k=9),
              op(2, at(5), kind="plc_tombstone"), op(3, at(6), handle="nullified.test", nullified=True)]
    with Store(tmp_path / "p.duckdb") as store:
        # pages of 4 lines; the first run stops after one page (as a killed one would)
        first = asyncio.run(run_identities_sync(store, config=config(server.url), max_pages=1, page_size=4))
        assert (first.pages, first.operations, first.complete) == (1, 4, False)
        # a refused line that still has its place in the stream is counted and passed
        refused = json.dumps({"did": "did:web:evil.test", "operation": {}, "createdAt": "2026-01-01T00:00:07.500Z"})
        lines += [op(4, at(7)), refused.encode(), op(5, at(8))]
        second = asyncio.run(run_identities_sync(store, config=config(server.url), page_size=4))
        assert second.operations == 5 and second.refused == 1 and second.complete and second.error is None
        afters = [s.query.get("after") for s in server.seen("/export")]
        assert afters == [None, at(4), "2026-01-01T00:00:07.500Z"]  # resumed after the first run's page
        one = store.load_identity(did(1), max_age=3600)
        assert one is not None and (one.pds, one.handle) == ("https://moved.example", "one-renamed.test")
        assert one.signing_key == key(9).removeprefix("did:key:")
        assert store.load_identity(did(2), max_age=3600) is None   # tombstoned: a resolve decides
        three = store.load_identity(did(3), max_age=3600)
        assert three is not None and three.handle == "a.test"      # the nullified operation is ignored
        assert store.load_identity(did(4), max_age=3600) is not None
        assert store.fetchall("SELECT count(*) FROM plc_log")[0][0] == 0   # folded
        assert store.fetchall("SELECT count(*) FROM plc_base")[0][0] == 5

        # a backfill's chunk of DIDs in one read: served from it afterwards (unknown/tombstoned: misses)
        assert store.prefetch_identities([did(1), did(2), did(3), did(99)], max_age=3600) == 2
        served = store.load_identity(did(1), max_age=3600)
        assert served is not None and served.pds == "https://moved.example"
        assert store.load_identity(did(2), max_age=3600) is None and store.load_identity(did(99), max_age=3600) is None

        async def resolve() -> str:
            # a PLC that is not there: the answer can only come from the bulk table
            async with Resolver(plc_url="http://127.0.0.1:9", store=store, allow_private_hosts=True) as r:
                return (await r.resolve(did(1))).pds

        assert asyncio.run(resolve()) == "https://moved.example"


def test_a_stuck_export_stops_with_an_error(tmp_path: Path, server: FaultServer) -> None:
    server.script("/export", Reply(200, b"\x00garbage\n" + op(1, at(1))))
    with Store(tmp_path / "p.duckdb") as store:
        summary = asyncio.run(run_identities_sync(store, config=config(server.url)))
        assert summary.error is not None and "does not move" in summary.error and not summary.complete
        assert summary.refused == 1 and summary.stored == 0


def test_a_verifier_seeds_its_keys_from_the_bulk_table_too(
    tmp_path: Path, plc: tuple[FaultServer, list[bytes]]
) -> None:
    """`fresh_signing_keys` (a firehose verifier's start-up seed, through the Resolver): the
    identity cache's keys first, then the bulk table's usable keys, up to the limit; a tombstone,
    a DID with a newer unfolded operation, or a stale export gives none."""
    server, lines = plc
    lines += [op(1, at(1)), op(2, at(2)), op(3, at(3), kind="plc_tombstone"), op(4, at(4))]
    with SetupStore(tmp_path / "seed.duckdb") as store:
        assert asyncio.run(run_identities_sync(store, config=config(server.url))).complete
        assert store.fresh_signing_keys(max_age=3600, limit=10) == {
            did(n): key(n).removeprefix("did:key:") for n in (1, 2, 4)}
        # a newer operation not folded yet: that DID is left to a resolve
        store.save_plc_page(server.url, [parse_export_line(op(4, at(5), k=8))], after=at(5), lines=1, skipped=0,
                            done=False)
        assert set(store.fresh_signing_keys(max_age=3600, limit=10)) == {did(1), did(2)}
        assert len(store.fresh_signing_keys(max_age=3600, limit=1)) == 1

        async def seed() -> dict[str, str]:
            async with Resolver(plc_url="http://127.0.0.1:9", store=store, allow_private_hosts=True) as r:
                return await r.stored_signing_keys(10)

        assert set(asyncio.run(seed())) == {did(1), did(2)}
        store.execute_write("UPDATE enum_cursors SET updated_at = updated_at - INTERVAL 2 HOUR")
        assert store.fresh_signing_keys(max_age=3600, limit=10) == {}  # the export is too old to trust
