"""CAR v1 reading without decoding: split a CAR into raw blocks keyed by CID bytes.

Hot path for the firehose: a `#commit` carries a CAR slice of ~5-10 blocks and skyfill needs
only the commit block and the op record blocks, so blocks are sliced, not decoded. CIDs stay
as their binary form (bytes) until something needs the string.

Layout: varint(header length) | DAG-CBOR header {version: 1, roots: [cid]} |
        repeated: varint(len(cid) + len(data)) | cid | data

Any bytes end in (roots, blocks) or a CarError, never another exception: varints are at most
10 bytes, the header at most 64 KiB with at most 64 roots (atproto writes one), CID digests at
most 64 bytes, and nesting too deep for the decoder (libipld stops at ~2,000 levels with a
RecursionError) is a CarError of kind `car_too_deep`. Work and memory are linear in the input.
"""

from __future__ import annotations

import hashlib
from typing import Final

import libipld

from skyfill.errors import RepoError

__all__ = ["read_car", "read_header", "read_varint", "encode_varint", "cid_to_str", "cid_from_str", "verify_block", "CarError",
           "DAG_CBOR_CID_PREFIX", "CID_LEN"]

# CIDv1 prefixes of the two codecs atproto uses, both sha2-256 (0x12) with 32-byte digests:
# CIDv1, dag-cbor (0x71), sha2-256, 32 bytes is the form of every repo CID (commit, MST node,
# record); CID_LEN is the length of either form.
DAG_CBOR_CID_PREFIX: Final = b"\x01\x71\x12\x20"
_RAW_PREFIX: Final = b"\x01\x55\x12\x20"
CID_LEN: Final = 36
_MAX_HEADER: Final = 1 << 16
_MAX_ROOTS: Final = 64
_MAX_ROOT_LEN: Final = 128  # a CID: version + codec + hash code + digest length + <= 64-byte digest
_MAX_DIGEST: Final = 64


class CarError(RepoError):
    kind = "car"


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the unsigned LEB128 varint at `pos`; CarError past 10 bytes or the end."""
    result = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise CarError("truncated varint", kind="car_truncated")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise CarError("varint too long", kind="car_malformed")


def _cid_len(data: bytes, pos: int) -> int:
    """Length of the binary CID starting at `pos` (fast path for the common 36-byte form)."""
    prefix = data[pos : pos + 4]
    if prefix == DAG_CBOR_CID_PREFIX or prefix == _RAW_PREFIX:
        return CID_LEN
    if data[pos : pos + 2] == b"\x12\x20":  # CIDv0: a bare sha2-256 multihash
        return 34
    start = pos
    version, pos = read_varint(data, pos)
    if version != 1:
        raise CarError(f"unsupported CID version {version}", kind="car_malformed")
    _codec, pos = read_varint(data, pos)
    _mh_code, pos = read_varint(data, pos)
    digest_len, pos = read_varint(data, pos)
    if digest_len > _MAX_DIGEST:
        raise CarError(f"CID digest of {digest_len} bytes", kind="car_malformed")
    return pos + digest_len - start


def _root_ok(root: object) -> bool:
    return type(root) is bytes and 2 <= len(root) <= _MAX_ROOT_LEN


def read_header(data: bytes) -> tuple[list[bytes], int]:
    """(roots, offset of the first block section) of a CAR v1; CarError if malformed."""
    header_len, pos = read_varint(data, 0)
    end = pos + header_len
    if header_len == 0 or end > len(data):
        raise CarError("truncated CAR header", kind="car_truncated")
    if header_len > _MAX_HEADER:
        raise CarError(f"CAR header of {header_len} bytes", kind="car_malformed")
    try:
        header = libipld.decode_dag_cbor(data[pos:end])
    except ValueError as exc:
        raise CarError(f"bad CAR header: {exc}", kind="car_malformed") from exc
    except RecursionError as exc:
        raise CarError("CAR header is nested too deeply", kind="car_too_deep") from exc
    if type(header) is not dict or type(header.get("version")) is not int or header["version"] != 1:
        raise CarError("not a CAR v1 header", kind="car_malformed")
    roots = header.get("roots")
    if type(roots) is not list or len(roots) > _MAX_ROOTS or not all(map(_root_ok, roots)):
        raise CarError("CAR header roots are not a list of CIDs", kind="car_malformed")
    return roots, end


def read_car(data: bytes) -> tuple[list[bytes], dict[bytes, bytes]]:
    """Split a CAR v1 into (roots, {cid bytes: raw block bytes}) without decoding blocks.

    Raises CarError on a malformed or truncated CAR. A CAR truncated exactly at a block
    boundary parses; callers find the hole when a needed block is missing. Blocks are NOT
    checked against their CIDs here (see `verify_block`): callers hash what they use.
    """
    roots, end = read_header(data)
    blocks: dict[bytes, bytes] = {}
    pos = end
    size = len(data)
    while pos < size:
        # Fast paths (hot for the firehose): 1- and 2-byte length varints, 36-byte CIDv1 sha2-256.
        b0 = data[pos]
        if b0 < 0x80:
            length = b0
            pos += 1
        elif pos + 1 < size and data[pos + 1] < 0x80:
            length = (b0 & 0x7F) | (data[pos + 1] << 7)
            pos += 2
        else:
            length, pos = read_varint(data, pos)
        block_end = pos + length
        if block_end > size:
            raise CarError("truncated CAR block", kind="car_truncated")
        prefix = data[pos : pos + 4]
        clen = CID_LEN if prefix == DAG_CBOR_CID_PREFIX or prefix == _RAW_PREFIX else _cid_len(data, pos)
        if clen >= length:
            raise CarError("CAR block shorter than its CID", kind="car_malformed")
        blocks[data[pos : pos + clen]] = data[pos + clen : block_end]
        pos = block_end
    return roots, blocks


def verify_block(cid: bytes, block: bytes) -> bool:
    """True when `block` hashes to `cid`: a CIDv1 (one-byte codec) or CIDv0 naming a sha2-256
    digest. Any other hash function or shape is refused (False)."""
    if len(cid) == CID_LEN and cid[0] == 1 and cid[1] < 0x80 and cid[2:4] == b"\x12\x20":
        return hashlib.sha256(block).digest() == cid[4:]
    if len(cid) == 34 and cid[:2] == b"\x12\x20":
        return hashlib.sha256(block).digest() == cid[2:]
    return False


def cid_to_str(cid: bytes) -> str:
    """Binary CID -> its canonical string (base32 `bafy...` for CIDv1)."""
    return libipld.encode_cid(cid)


def cid_from_str(cid: str) -> bytes:
    """String CID -> binary CID (CIDv1 only)."""
    info = libipld.decode_cid(cid)
    digest: bytes = info["hash"]["digest"]
    return (
        encode_varint(info["version"])
        + encode_varint(info["codec"])
        + encode_varint(info["hash"]["code"])
        + encode_varint(len(digest))
        + digest
    )


def encode_varint(n: int) -> bytes:
    """`n` (>= 0) as an unsigned LEB128 varint, as CARs frame their sections and CIDs their fields."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)
