"""Fake but well-formed atproto identities: K-256 keys, did:plc DIDs, handles, DID documents."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Final

import coincurve
import libipld

__all__ = ["GeneratedIdentity", "make_identity", "fake_did", "did_document", "multikey"]

_B32: Final = "abcdefghijklmnopqrstuvwxyz234567"
_K256_MULTICODEC: Final = b"\xe7\x01"
_CURVE_ORDER: Final = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_NAMES: Final = (
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
    "mallory", "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter", "yuki",
)


@dataclass(frozen=True, slots=True)
class GeneratedIdentity:
    did: str
    handle: str
    secret: bytes = field(repr=False)  # 32-byte K-256 private key

    @property
    def key(self) -> coincurve.PrivateKey:
        return coincurve.PrivateKey(self.secret)

    @property
    def public_key(self) -> bytes:
        """Compressed SEC1 point (33 bytes)."""
        return self.key.public_key.format(compressed=True)


def fake_did(rng: random.Random) -> str:
    """A syntactically valid did:plc (24 base32 characters) that names nobody."""
    return "did:plc:" + "".join(rng.choice(_B32) for _ in range(24))


def make_identity(rng: random.Random, *, handle_domain: str = "test") -> GeneratedIdentity:
    while True:  # a secret must lie in [1, n-1]; retrying keeps the draw deterministic
        secret = rng.getrandbits(256)
        if 0 < secret < _CURVE_ORDER:
            break
    did = fake_did(rng)
    handle = f"{rng.choice(_NAMES)}{rng.randrange(100_000)}.{handle_domain}"
    return GeneratedIdentity(did=did, handle=handle, secret=secret.to_bytes(32, "big"))


def multikey(public_key: bytes) -> str:
    """`publicKeyMultibase` of a compressed K-256 point: 'z' + base58btc(0xe7 0x01 + point)."""
    return libipld.encode_multibase("z", _K256_MULTICODEC + public_key)


def did_document(identity: GeneratedIdentity, pds_url: str) -> dict[str, Any]:
    """The DID document plc.directory would return for this identity, its PDS at `pds_url`."""
    did = identity.did
    return {
        "@context": [
            "https://www.w3.org/ns/did/v1",
            "https://w3id.org/security/multikey/v1",
            "https://w3id.org/security/suites/secp256k1-2019/v1",
        ],
        "id": did,
        "alsoKnownAs": [f"at://{identity.handle}"],
        "verificationMethod": [
            {
                "id": f"{did}#atproto",
                "type": "Multikey",
                "controller": did,
                "publicKeyMultibase": multikey(identity.public_key),
            }
        ],
        "service": [
            {
                "id": "#atproto_pds",
                "type": "AtprotoPersonalDataServer",
                "serviceEndpoint": pds_url.rstrip("/"),
            }
        ],
    }
