"""Resolver: did:plc and did:web against a real local server, the DuckDB cache, bad documents."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import coincurve
import libipld
import pytest

from skyfill.protocol.syntax import is_did
from skyfill.net.http import Transfer
from skyfill.net.identity import ResolvedIdentity, Resolver
from skyfill.net.pds import PdsClient
from tests.support.faultserver import FaultServer, Reply, json_reply
from skyfill.protocol.crypto import parse_public_key
from skyfill.errors import IdentityError, UnsafeHostError
from skyfill.storage import Store

VECTORS = Path(__file__).parent / "vectors/indigo/testing-testdata"
PLC_DID = "did:plc:wqgdnqlv2mwiio6pfchwtrff"  # greenground's DID document (legacy key type)
KEY = coincurve.PrivateKey(b"\x01" * 32)
MULTIKEY = libipld.encode_multibase("z", b"\xe7\x01" + KEY.public_key.format(compressed=True))


def make_doc(did: str, *, pds: str = "https://pds.example.com", **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "@context": ["https://www.w3.org/ns/did/v1"],
        "id": did,
        "alsoKnownAs": ["at://Alice.Example.com"],
        "verificationMethod": [
            {"id": f"{did}#atproto", "type": "Multikey", "controller": did, "publicKeyMultibase": MULTIKEY}
        ],
        "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": pds}],
    }
    doc.update(overrides)
    return doc


@pytest.fixture
async def client() -> AsyncIterator[PdsClient]:
    async with PdsClient(
        allow_private_hosts=True, transfer=Transfer(connect_timeout=0.5, read_timeout=0.5), max_retries=1,
        backoff_base=0.01
    ) as c:
        yield c


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "skyfill.duckdb") as s:
        yield s


async def test_resolves_plc_with_legacy_key(server: FaultServer, client: PdsClient) -> None:
    doc = json.loads((VECTORS / "greenground.didDoc.json").read_text())
    server.script(f"/{PLC_DID}", json_reply(doc))
    async with Resolver(plc_url=server.url, client=client) as resolver:
        ident = await resolver.resolve(PLC_DID)
    assert ident.did == PLC_DID and ident.pds == "https://bsky.social"
    assert ident.handle == "greenground.bsky.social" and ident.doc == doc
    # Normalised to Multikey: the verifier needs no key type, and it is the same point.
    legacy = parse_public_key(doc["verificationMethod"][0]["publicKeyMultibase"], key_type="EcdsaSecp256k1VerificationKey2019")
    assert ident.signing_key.startswith("zQ3s") and parse_public_key(ident.signing_key) == legacy


async def test_resolves_did_web_with_port(server: FaultServer, client: PdsClient) -> None:
    did = f"did:web:localhost%3A{server.port}"
    server.script("/.well-known/did.json", json_reply(make_doc(did, pds="https://pds.example.com/")))
    async with Resolver(plc_url=server.url, client=client) as resolver:
        ident = await resolver.resolve(did)
    assert ident == ResolvedIdentity(did, "https://pds.example.com", MULTIKEY, "alice.example.com", ident.doc)
    assert server.count("/.well-known/did.json") == 1


async def test_own_client_resolves_and_closes(server: FaultServer) -> None:
    did = "did:plc:" + "a" * 24
    server.script(f"/{did}", json_reply(make_doc(did)))
    async with Resolver(plc_url=server.url, allow_private_hosts=True) as resolver:
        assert (await resolver.resolve(did)).signing_key == MULTIKEY


async def test_plc_host_is_trusted_but_did_web_private_host_is_refused(server: FaultServer) -> None:
    did = "did:plc:" + "b" * 24
    server.script(f"/{did}", json_reply(make_doc(did)))
    async with Resolver(plc_url=server.url) as resolver:  # no allow_private_hosts
        assert (await resolver.resolve(did)).did == did  # operator-chosen PLC on 127.0.0.1 is fine
        web = f"did:web:localhost%3A{server.port}"
        with pytest.raises(IdentityError) as info:
            await resolver.resolve(web)
        assert info.value.terminal
    assert server.count("/.well-known/did.json") == 0


async def test_memory_cache_and_fresh(server: FaultServer, client: PdsClient) -> None:
    did = "did:plc:" + "c" * 24
    server.script(f"/{did}", json_reply(make_doc(did)))
    async with Resolver(plc_url=server.url, client=client) as resolver:
        first = await resolver.resolve(did)
        assert await resolver.resolve(did) == first
        assert server.count(f"/{did}") == 1
        new_key = coincurve.PrivateKey(b"\x02" * 32).public_key.format(compressed=True)
        rotated = libipld.encode_multibase("z", b"\xe7\x01" + new_key)
        doc = make_doc(did)
        doc["verificationMethod"][0]["publicKeyMultibase"] = rotated
        server.script(f"/{did}", json_reply(doc))
        assert (await resolver.resolve(did)).signing_key == MULTIKEY  # still cached
        assert (await resolver.resolve(did, fresh=True)).signing_key == rotated
        assert (await resolver.resolve(did)).signing_key == rotated  # fresh result replaces the cache
    assert server.count(f"/{did}") == 2


async def test_duckdb_cache_survives_a_new_resolver_and_expires(
    server: FaultServer, client: PdsClient, store: Store
) -> None:
    did = "did:plc:" + "d" * 24
    server.script(f"/{did}", json_reply(make_doc(did)))
    async with Resolver(plc_url=server.url, client=client, store=store) as resolver:
        first = await resolver.resolve(did)
    rows = store.fetchall("SELECT pds, signing_key, handle, error FROM identities WHERE did = ?", [did])
    assert rows == [("https://pds.example.com", MULTIKEY, "alice.example.com", None)]

    async with Resolver(plc_url=server.url, client=client, store=store) as again:
        assert await again.resolve(did) == first
    assert server.count(f"/{did}") == 1  # served from DuckDB

    async with Resolver(plc_url=server.url, client=client, store=store, ttl=0) as expired:
        assert await expired.resolve(did) == first
    assert server.count(f"/{did}") == 2  # older than the TTL: fetched again


BAD_DOCS = {
    "id differs": lambda did: make_doc(did, id="did:plc:" + "z" * 24),
    "no pds service": lambda did: make_doc(did, service=[]),
    "wrong service id": lambda did: make_doc(
        did, service=[{"id": "#bsky_fg", "type": "x", "serviceEndpoint": "https://x.example"}]
    ),
    "no atproto key": lambda did: make_doc(did, verificationMethod=[]),
    "garbage key": lambda did: make_doc(
        did, verificationMethod=[{"id": "#atproto", "type": "Multikey", "publicKeyMultibase": "zzzz"}]
    ),
    "ftp endpoint": lambda did: make_doc(did, pds="ftp://pds.example.com"),
    "endpoint without host": lambda did: make_doc(did, pds="https://"),
    "endpoint with path": lambda did: make_doc(did, pds="https://pds.example.com/evil?x=1"),
    "endpoint with credentials": lambda did: make_doc(did, pds="https://u:p@pds.example.com"),
    "endpoint not a string": lambda did: make_doc(did, pds=["https://pds.example.com"]),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("case", sorted(BAD_DOCS))
async def test_invalid_documents_are_terminal(
    server: FaultServer, client: PdsClient, store: Store, case: str
) -> None:
    did = "did:plc:" + "e" * 24
    server.script(f"/{did}", json_reply(BAD_DOCS[case](did)))
    async with Resolver(plc_url=server.url, client=client, store=store) as resolver:
        with pytest.raises(IdentityError) as info:
            await resolver.resolve(did)
        assert info.value.terminal and info.value.did == did
        with pytest.raises(IdentityError):  # a failure is never served from the cache
            await resolver.resolve(did)
    assert server.count(f"/{did}") == 2
    (error,) = store.fetchall("SELECT error FROM identities WHERE did = ?", [did])[0]
    assert error  # recorded for diagnosis


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b"x" * (1024 * 1024 + 1)])
async def test_unparseable_documents_are_terminal(server: FaultServer, client: PdsClient, body: bytes) -> None:
    did = "did:plc:" + "f" * 24
    server.script(f"/{did}", Reply(200, body))
    async with Resolver(plc_url=server.url, client=client) as resolver:
        with pytest.raises(IdentityError) as info:
            await resolver.resolve(did)
    assert info.value.terminal


@pytest.mark.parametrize(
    "did",
    ["did:plc:short", "did:plc:" + "A" * 24, "DID:plc:" + "a" * 24, "did:key:zQ3shabc", "did:web:", "did:web:example.com:user:alice",
     "did:web:exa_mple.com", "did:web:example.com%3A99999", "not a did", "did:web:localhost%3A1%3A2"],
)
async def test_bad_dids_are_terminal_without_a_request(server: FaultServer, client: PdsClient, did: str) -> None:
    async with Resolver(plc_url=server.url, client=client) as resolver:
        with pytest.raises(IdentityError) as info:
            await resolver.resolve(did)
    assert info.value.terminal
    assert server.requests == []


async def test_not_found_is_terminal_and_server_errors_are_not(server: FaultServer, client: PdsClient) -> None:
    gone, flaky = "did:plc:" + "g" * 24, "did:plc:" + "h" * 24
    server.script(f"/{gone}", Reply(404, b'{"message":"DID not registered"}'))
    server.script(f"/{flaky}", Reply(500))
    async with Resolver(plc_url=server.url, client=client) as resolver:
        with pytest.raises(IdentityError) as info:
            await resolver.resolve(gone)
        assert info.value.terminal
        with pytest.raises(IdentityError) as info:
            await resolver.resolve(flaky)
        assert not info.value.terminal
    assert server.count(f"/{flaky}") == 1 + client.max_retries


async def test_network_failure_is_not_terminal(client: PdsClient) -> None:
    with FaultServer() as srv:
        url = srv.url
    # nothing listens on that port any more: connection refused
    async with Resolver(plc_url=url, client=client) as resolver:
        with pytest.raises(IdentityError) as info:
            await resolver.resolve("did:plc:" + "i" * 24)
    assert not info.value.terminal


def test_did_syntax_vectors() -> None:
    base = Path(__file__).parent / "vectors/interop/syntax"
    for name, expected in (("did_syntax_valid.txt", True), ("did_syntax_invalid.txt", False)):
        for line in (base / name).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                assert is_did(line) is expected, line


async def test_memory_cache_is_bounded(server: FaultServer, client: PdsClient) -> None:
    dids = ["did:plc:" + c * 24 for c in "jkl"]
    for did in dids:
        server.script(f"/{did}", json_reply(make_doc(did)))
    async with Resolver(plc_url=server.url, client=client, memory_entries=2) as resolver:
        for did in dids:
            await resolver.resolve(did)
        await resolver.resolve(dids[2])  # still held
        await resolver.resolve(dids[0])  # evicted first: fetched again
    assert [server.count(f"/{d}") for d in dids] == [2, 1, 1]


# -- issue 9: the PLC is trusted by exact origin, endpoints are checked when parsed ----------


async def test_did_web_on_the_plc_host_is_not_trusted() -> None:
    """Before: the PLC's host was trusted by NAME on any port, so a did:web naming the PLC's
    address on another port was connected to."""
    with FaultServer("127.0.0.2") as plc, FaultServer("127.0.0.2") as victim:
        victim.script("/.well-known/did.json", json_reply(make_doc("did:web:x")))
        did = "did:plc:" + "j" * 24
        plc.script(f"/{did}", json_reply(make_doc(did)))
        async with Resolver(plc_url=plc.url) as resolver:  # no allow_private_hosts
            assert (await resolver.resolve(did)).did == did
            with pytest.raises(IdentityError) as info:
                await resolver.resolve(f"did:web:127.0.0.2%3A{victim.port}")
        assert info.value.terminal and isinstance(info.value.__cause__, UnsafeHostError)
        assert victim.connections_made() == 0


@pytest.mark.parametrize(
    "endpoint",
    ["http://0177.0.0.1:80", "http://127.1", "http://2130706433", "http://0x7f.1", "http://127.0.0.1.",
     "http://[fec0::1", "http://pds.example.com:99999", "https://" + "a." * 35_000 + "com"],
    ids=["octal", "short", "integer", "hex", "trailing-dot", "unclosed-ipv6", "bad-port", "70k"],
)
async def test_unsafe_endpoint_is_refused_when_the_document_is_parsed(
    server: FaultServer, client: PdsClient, endpoint: str
) -> None:
    """Refused at parse time (terminal, caused by UnsafeHostError so the backfiller records
    UnsafeHost), never handed to httpx (before: httpx.InvalidURL crashed the backfill)."""
    did = "did:plc:" + "k" * 24
    server.script(f"/{did}", json_reply(make_doc(did, pds=endpoint)))
    async with Resolver(plc_url=server.url, client=client) as resolver:
        with pytest.raises(IdentityError) as info:
            await resolver.resolve(did)
    assert info.value.terminal and isinstance(info.value.__cause__, UnsafeHostError)


@pytest.mark.parametrize(
    "endpoint, expected",
    [("https://PDS.example.com/", "https://pds.example.com"), ("https://pds.example.com:443", "https://pds.example.com"),
     ("http://[2606:4700::1]:8080", "http://[2606:4700::1]:8080"), ("https://10.0.0.1", "https://10.0.0.1")],
)
async def test_endpoints_are_normalised(server: FaultServer, client: PdsClient, endpoint: str, expected: str) -> None:
    did = "did:plc:" + "l" * 24
    server.script(f"/{did}", json_reply(make_doc(did, pds=endpoint)))
    async with Resolver(plc_url=server.url, client=client) as resolver:
        assert (await resolver.resolve(did)).pds == expected
