"""atproto signing keys and commit signature checks (K-256 and P-256 ECDSA over sha256).

Key forms accepted by `parse_public_key`:
    Multikey  `z` + base58btc(multicodec varint + 33-byte compressed point)
              0xe7 0x01 = secp256k1-pub, 0x80 0x24 = p256-pub
    did:key   `did:key:` + a Multikey value
    legacy    `EcdsaSecp256k1VerificationKey2019` / `EcdsaSecp256r1VerificationKey2019` documents
              carry the bare point with no multicodec: 65 bytes uncompressed (the curve is found
              by checking which curve the point lies on) or 33 bytes compressed (ambiguous, so the
              caller must pass `key_type`).

Signatures are the 64-byte compact form r||s. atproto accepts only low-S signatures
(s <= n/2); DER-encoded and high-S signatures are refused even though ECDSA would accept them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final, Literal

import coincurve
import libipld
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from skyfill.errors import IdentityError

__all__ = ["PublicKey", "Curve", "parse_public_key", "verify_signature", "atproto_key_from_did_doc"]

Curve = Literal["k256", "p256"]

_MULTICODEC: Final[dict[bytes, Curve]] = {b"\xe7\x01": "k256", b"\x80\x24": "p256"}
_LEGACY_TYPES: Final[dict[str, Curve]] = {
    "EcdsaSecp256k1VerificationKey2019": "k256",
    "EcdsaSecp256r1VerificationKey2019": "p256",
}

# Curve parameters: field prime p, group order n, and y^2 = x^3 + a*x + b.
_K256_P: Final = 2**256 - 2**32 - 977
_K256_N: Final = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_P256_P: Final = 2**256 - 2**224 + 2**192 + 2**96 - 1
_P256_N: Final = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_P256_B: Final = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
_ORDER: Final[dict[str, int]] = {"k256": _K256_N, "p256": _P256_N}


@dataclass(frozen=True, slots=True)
class PublicKey:
    curve: Curve
    compressed: bytes   # 33 bytes: 0x02/0x03 + x

    def did_key(self) -> str:
        """The `did:key:z...` form of this key."""
        prefix = b"\xe7\x01" if self.curve == "k256" else b"\x80\x24"
        return "did:key:" + libipld.encode_multibase("z", prefix + self.compressed)


def _on_curve(curve: Curve, x: int, y: int) -> bool:
    if curve == "k256":
        return x < _K256_P and y < _K256_P and (y * y - (x * x * x + 7)) % _K256_P == 0
    return x < _P256_P and y < _P256_P and (y * y - (x * x * x - 3 * x + _P256_B)) % _P256_P == 0


def _compress(point: bytes) -> bytes:
    return bytes([2 + (point[64] & 1)]) + point[1:33]


@lru_cache(maxsize=4096)
def _k256(compressed: bytes) -> coincurve.PublicKey:
    return coincurve.PublicKey(compressed)


@lru_cache(maxsize=4096)
def _p256(compressed: bytes) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), compressed)


def _checked(curve: Curve, compressed: bytes) -> PublicKey:
    if len(compressed) != 33 or compressed[0] not in (2, 3):
        raise IdentityError(f"{curve} public key is not a 33-byte compressed point")
    try:
        _k256(compressed) if curve == "k256" else _p256(compressed)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{curve} public key is not a point on the curve: {exc}") from exc
    return PublicKey(curve, compressed)


def parse_public_key(multibase: str, *, key_type: str | None = None) -> PublicKey:
    """Parse a `publicKeyMultibase` value or a `did:key:` string into a PublicKey.

    `key_type` is the DID document's verificationMethod `type`; it is needed only for the
    legacy bare compressed form. Raises IdentityError on anything that is not a usable key.
    """
    text = multibase.removeprefix("did:key:")
    if not text.startswith("z"):
        raise IdentityError("public key is not base58btc multibase ('z' prefix)")
    try:
        _base, raw = libipld.decode_multibase(text)
    except ValueError as exc:
        raise IdentityError(f"public key is not valid multibase: {exc}") from exc
    curve = _MULTICODEC.get(raw[:2])
    if curve is not None and len(raw) == 35:
        return _checked(curve, raw[2:])
    if multibase.startswith("did:key:") or key_type == "Multikey":
        raise IdentityError("did:key / Multikey value has an unknown multicodec or length")
    legacy = _LEGACY_TYPES.get(key_type) if key_type is not None else None
    if key_type is not None and legacy is None:
        raise IdentityError(f"unsupported verification method type {key_type!r}")
    if len(raw) == 65 and raw[0] == 4:
        x, y = int.from_bytes(raw[1:33], "big"), int.from_bytes(raw[33:], "big")
        candidates: tuple[Curve, ...] = (legacy,) if legacy else ("k256", "p256")
        for c in candidates:
            if _on_curve(c, x, y):
                return _checked(c, _compress(raw))
        raise IdentityError("uncompressed public key is not on the expected curve")
    if len(raw) == 33 and legacy is not None:
        return _checked(legacy, raw)
    raise IdentityError("public key has no multicodec prefix and its curve cannot be determined")


def atproto_key_from_did_doc(doc: dict[str, Any]) -> PublicKey:
    """The `#atproto` verification method's key of a DID document."""
    did = doc.get("id")
    for method in doc.get("verificationMethod") or ():
        if not isinstance(method, dict):
            continue
        mid = method.get("id")
        if mid == "#atproto" or (isinstance(did, str) and mid == f"{did}#atproto"):
            value = method.get("publicKeyMultibase")
            if not isinstance(value, str):
                break
            try:
                return parse_public_key(value, key_type=method.get("type"))
            except IdentityError as exc:
                raise IdentityError(str(exc), did=did if isinstance(did, str) else None) from exc
    raise IdentityError("DID document has no #atproto verification method", did=did if isinstance(did, str) else None)


def verify_signature(key: PublicKey, message: bytes, sig: bytes) -> bool:
    """True when `sig` (64-byte r||s, low-S) signs sha256(message) under `key`."""
    if len(sig) != 64:
        return False  # DER-encoded or garbage: atproto uses the compact form only
    r = int.from_bytes(sig[:32], "big")
    s = int.from_bytes(sig[32:], "big")
    n = _ORDER[key.curve]
    if not (0 < r < n and 0 < s <= n // 2):
        return False
    der = encode_dss_signature(r, s)
    if key.curve == "k256":
        return bool(_k256(key.compressed).verify(der, message, hasher=_sha256))
    try:
        _p256(key.compressed).verify(der, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
