"""skyfill.crypto against the atproto interop crypto fixtures and keys made on the spot."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import coincurve
import libipld
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from skyfill.protocol.crypto import PublicKey, atproto_key_from_did_doc, parse_public_key, verify_signature
from skyfill.errors import IdentityError

CRYPTO = Path(__file__).parent / "vectors" / "interop" / "crypto"
TESTING = Path(__file__).parent / "vectors" / "indigo" / "testing-testdata"
K256_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


SIGNATURE_FIXTURES: list[dict[str, Any]] = json.loads((CRYPTO / "signature-fixtures.json").read_text())


@pytest.mark.parametrize("case", SIGNATURE_FIXTURES, ids=lambda c: f"{c['algorithm']}-{'-'.join(c['tags']) or 'valid'}")
def test_signature_fixtures(case: dict[str, Any]) -> None:
    key = parse_public_key(case["publicKeyDid"])
    assert key.curve == {"ES256K": "k256", "ES256": "p256"}[case["algorithm"]]
    # the fixture's publicKeyMultibase is the legacy bare compressed point: the suite names the curve
    assert parse_public_key(case["publicKeyMultibase"], key_type=case["didDocSuite"]) == key
    assert key.did_key() == case["publicKeyDid"]
    message, sig = _b64(case["messageBase64"]), _b64(case["signatureBase64"])
    assert verify_signature(key, message, sig) is case["validSignature"]


def test_fixtures_cover_both_curves_and_both_refusals() -> None:
    tags = {(c["algorithm"], tuple(c["tags"]), c["validSignature"]) for c in SIGNATURE_FIXTURES}
    for alg in ("ES256K", "ES256"):
        assert {(alg, (), True), (alg, ("high-s",), False), (alg, ("der-encoded",), False)} <= tags


def test_high_s_fixture_is_the_low_s_signature_mirrored() -> None:
    # Proves the refusal is the low-S rule, not a corrupted signature: s' = n - s.
    for valid, high in ((SIGNATURE_FIXTURES[0], SIGNATURE_FIXTURES[2]), (SIGNATURE_FIXTURES[1], SIGNATURE_FIXTURES[3])):
        n = P256_N if valid["algorithm"] == "ES256" else K256_N
        a, b = _b64(valid["signatureBase64"]), _b64(high["signatureBase64"])
        assert a[:32] == b[:32]
        assert int.from_bytes(a[32:], "big") + int.from_bytes(b[32:], "big") == n


@pytest.mark.parametrize("case", json.loads((CRYPTO / "w3c_didkey_K256.json").read_text()))
def test_w3c_did_key_k256(case: dict[str, str]) -> None:
    priv = coincurve.PrivateKey(bytes.fromhex(case["privateKeyBytesHex"]))
    key = parse_public_key(case["publicDidKey"])
    assert key == PublicKey("k256", priv.public_key.format(compressed=True))
    assert key.did_key() == case["publicDidKey"]


@pytest.mark.parametrize("case", json.loads((CRYPTO / "w3c_didkey_P256.json").read_text()))
def test_w3c_did_key_p256(case: dict[str, str]) -> None:
    secret = libipld.decode_multibase("z" + case["privateKeyBytesBase58"])[1]
    priv = ec.derive_private_key(int.from_bytes(secret, "big"), ec.SECP256R1())
    key = parse_public_key(case["publicDidKey"])
    assert key == PublicKey("p256", priv.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint))
    assert key.did_key() == case["publicDidKey"]


def _k256_sign(priv: coincurve.PrivateKey, msg: bytes) -> bytes:
    r, s = decode_dss_signature(priv.sign(msg, hasher=lambda m: hashlib.sha256(m).digest()))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _p256_sign(priv: ec.EllipticCurvePrivateKey, msg: bytes) -> bytes:
    r, s = decode_dss_signature(priv.sign(msg, ec.ECDSA(hashes.SHA256())))
    s = min(s, P256_N - s)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _mirror(sig: bytes, n: int) -> bytes:
    return sig[:32] + (n - int.from_bytes(sig[32:], "big")).to_bytes(32, "big")


def test_fresh_k256_signatures() -> None:
    priv = coincurve.PrivateKey(b"\x11" * 32)
    key = parse_public_key(PublicKey("k256", priv.public_key.format()).did_key())
    for i in range(20):
        msg = f"message {i}".encode()
        sig = _k256_sign(priv, msg)
        assert verify_signature(key, msg, sig)
        assert not verify_signature(key, msg + b"!", sig)
        assert not verify_signature(key, msg, _mirror(sig, K256_N))  # high-S twin
        assert not verify_signature(key, msg, sig[:63])
    assert not verify_signature(key, b"m", bytes(64))  # r = s = 0


def test_fresh_p256_signatures() -> None:
    priv = ec.derive_private_key(0xABCDEF, ec.SECP256R1())
    key = PublicKey("p256", priv.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint))
    other = PublicKey("k256", coincurve.PrivateKey(b"\x22" * 32).public_key.format())
    for i in range(20):
        msg = f"message {i}".encode()
        sig = _p256_sign(priv, msg)
        assert verify_signature(key, msg, sig)
        assert not verify_signature(key, msg + b"!", sig)
        assert not verify_signature(key, msg, _mirror(sig, P256_N))
        assert not verify_signature(other, msg, sig)


def test_legacy_uncompressed_keys_from_did_docs() -> None:
    # These documents use the 2019 suites with bare 65-byte uncompressed points.
    for name, curve in (("greenground.didDoc.json", "k256"), ("fakermaker.didDoc.json", "p256"),
                        ("did_plc_z5vnbioquyhivxirw3bbljmu.didDoc.json", "k256")):
        doc = json.loads((TESTING / name).read_text())
        method = doc["verificationMethod"][0]
        point = libipld.decode_multibase(method["publicKeyMultibase"])[1]
        assert len(point) == 65
        key = atproto_key_from_did_doc(doc)
        assert key.curve == curve
        assert key.compressed == bytes([2 + point[64] % 2]) + point[1:33]
        # without the suite name the curve is found from the point itself
        assert parse_public_key(method["publicKeyMultibase"]) == key


def test_multikey_did_doc() -> None:
    priv = coincurve.PrivateKey(b"\x33" * 32)
    multikey = PublicKey("k256", priv.public_key.format()).did_key().removeprefix("did:key:")
    did = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
    doc = {
        "id": did,
        "verificationMethod": [
            {"id": f"{did}#other", "type": "Multikey", "controller": did,
             "publicKeyMultibase": PublicKey("p256", bytes(33)).did_key()[8:]},
            {"id": f"{did}#atproto", "type": "Multikey", "controller": did, "publicKeyMultibase": multikey},
        ],
    }
    assert atproto_key_from_did_doc(doc).compressed == priv.public_key.format()


@pytest.mark.parametrize(
    ("value", "key_type"),
    [
        ("did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK", None),  # ed25519: not atproto
        ("zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMd", None),            # truncated
        ("mAQIDBA", None),                                                    # not base58btc
        ("zxdM8dSstjrpZaRUwBmDvjGXweKuEMVN95A9oJBFjkWMh", None),            # bare compressed, curve unknown
        ("zxdM8dSstjrpZaRUwBmDvjGXweKuEMVN95A9oJBFjkWMh", "Ed25519VerificationKey2020"),
        ("z" + "1" * 10, None),
    ],
)
def test_bad_keys_are_refused(value: str, key_type: str | None) -> None:
    with pytest.raises(IdentityError):
        parse_public_key(value, key_type=key_type)


def test_point_not_on_curve_is_refused() -> None:
    bogus = PublicKey("k256", b"\x02" + b"\x00" * 31 + b"\x05").did_key()  # x=5: x^3+7 is no square
    with pytest.raises(IdentityError):
        parse_public_key(bogus)
    off_curve = libipld.encode_multibase("z", b"\x04" + b"\x01" * 64)
    with pytest.raises(IdentityError):
        parse_public_key(off_curve)


def test_did_doc_without_atproto_key_is_refused() -> None:
    with pytest.raises(IdentityError) as info:
        atproto_key_from_did_doc({"id": "did:plc:abc", "verificationMethod": [{"id": "#other"}]})
    assert info.value.did == "did:plc:abc"
