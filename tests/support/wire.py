"""Wire helpers: atproto JSON -> DAG-CBOR values, frames and CARs built from parts, and the derived
firehose vectors (tests/vectors/derived/firehose)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import libipld

from skyfill.protocol.car import cid_from_str, read_varint
from skyfill.protocol.car import encode_varint as varint  # the name the tests use

__all__ = ["VECTORS", "FIREHOSE", "from_json", "encode_frame", "varint", "read_varint", "encode_car", "load"]

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
FIREHOSE = VECTORS / "derived" / "firehose"


def from_json(value: Any) -> Any:
    """atproto JSON form -> the values libipld encodes: {"$bytes"} -> bytes, {"$link"} -> CID bytes."""
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            text = value["$bytes"]
            return base64.b64decode(text + "=" * (-len(text) % 4))
        if set(value) == {"$link"}:
            return cid_from_str(value["$link"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def encode_frame(header: dict[str, Any], body: Any) -> bytes:
    return libipld.encode_dag_cbor(header) + libipld.encode_dag_cbor(body)


def encode_car(roots: list[bytes], blocks: dict[bytes, bytes]) -> bytes:
    header = libipld.encode_dag_cbor({"version": 1, "roots": roots})
    parts = [varint(len(header)), header]
    for cid, data in blocks.items():
        parts += [varint(len(cid) + len(data)), cid, data]
    return b"".join(parts)


def load(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """One derived firehose frame by file name, as (header, body)."""
    header, body = libipld.decode_dag_cbor_multi((FIREHOSE / name).read_bytes())
    return header, body
