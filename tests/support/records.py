"""Generated records written through the real Store API, for tests of what reads `records`
(typed views, Parquet export, JSONBench queries)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import cbrrr
import libipld
import orjson

from skyfill.protocol.records import record_json
from skyfill.storage import Batch, RecordPut, Store

from .generate import RecordMaker, fake_did, tid
from .generate.mst import cid_for

__all__ = ["StoredRecord", "encode_record", "write_records", "generated_records", "DAY_MICROS", "BASE_MICROS"]

DAY_MICROS = 86_400_000_000
BASE_MICROS = 1_735_689_600_000_000  # 2025-01-01T00:00:00Z


@dataclass(frozen=True, slots=True)
class StoredRecord:
    did: str
    collection: str
    rkey: str
    cid: str
    json: str                   # the atproto JSON form, as the store keeps it
    created_at: str | None      # the valid createdAt, as the store's created_at

    @property
    def body(self) -> dict[str, Any]:
        parsed: dict[str, Any] = orjson.loads(self.json)
        return parsed


def encode_record(did: str, collection: str, rkey: str, record: dict[str, Any]) -> StoredRecord:
    """A record dict (cbrrr values: CIDs as cbrrr.CID) as the store would hold it."""
    block = cbrrr.encode_dag_cbor(record)
    text, created = record_json(block)
    return StoredRecord(did, collection, rkey, libipld.encode_cid(cid_for(block)), text, created)


def write_records(store: Store, records: list[StoredRecord], *, rev: str = "3laaaaaaaaaaa", chunk: int = 5000) -> None:
    """Write through `Store.apply`, `chunk` records per transaction."""
    for i in range(0, len(records), chunk):
        batch = Batch()
        for r in records[i:i + chunk]:
            batch.put_record(r.did, r.collection, r.rkey, RecordPut(r.cid, rev, r.json, r.created_at))
        store.apply(batch)


def generated_records(n: int, *, seed: int = 1, days: int = 5, n_dids: int = 50) -> list[StoredRecord]:
    """`n` records in the network's mix from `n_dids` accounts, created over `days` days from
    BASE_MICROS; rkeys are TIDs of the creation time (profiles: 'self', one per DID)."""
    rng = random.Random(seed)
    dids = [fake_did(rng) for _ in range(n_dids)]
    maker = RecordMaker(rng, peers=dids)
    out: dict[tuple[str, str, str], StoredRecord] = {}
    while len(out) < n:
        did = rng.choice(dids)
        collection = maker.collection()
        micros = BASE_MICROS + rng.randrange(days * DAY_MICROS)
        rkey = "self" if collection == "app.bsky.actor.profile" else tid(micros, rng.randrange(1024))
        out[(did, collection, rkey)] = encode_record(did, collection, rkey, maker.record(collection, micros))
    return list(out.values())
