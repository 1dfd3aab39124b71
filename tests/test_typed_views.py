"""The typed views (storage/views.sql) over records written through the real Store API: every
typed column equals the value in the record itself."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import cbrrr
import pytest

from skyfill.storage import TYPED_VIEWS, Batch, Store

from .support.generate import RecordMaker, fake_did, iso_time, tid
from .support.generate.mst import RAW_PREFIX
from .support.records import BASE_MICROS, StoredRecord, encode_record, generated_records, write_records

POST, LIKE, REPOST = "app.bsky.feed.post", "app.bsky.feed.like", "app.bsky.feed.repost"
FOLLOW, BLOCK, PROFILE = "app.bsky.graph.follow", "app.bsky.graph.block", "app.bsky.actor.profile"
LIST, LISTITEM = "app.bsky.graph.list", "app.bsky.graph.listitem"
VIEW_OF = {POST: "posts", LIKE: "likes", REPOST: "reposts", FOLLOW: "follows", BLOCK: "blocks",
           PROFILE: "profiles", LIST: "lists", LISTITEM: "list_items"}


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def _uri(r: StoredRecord) -> str:
    return f"at://{r.did}/{r.collection}/{r.rkey}"


def _quote(b: dict[str, Any]) -> Any:
    return _get(b, "embed", "record", "uri") or _get(b, "embed", "record", "record", "uri")


def _subject_did(uri: str | None) -> str | None:
    return uri.split("/")[2] if uri else None


def expected(r: StoredRecord) -> dict[str, Any]:
    """The typed columns of `r`, read from the record's own JSON (times are checked apart)."""
    b = r.body
    if r.collection == POST:
        return {"did": r.did, "rkey": r.rkey, "uri": _uri(r), "cid": r.cid, "text": b.get("text"),
                "langs": b.get("langs"), "reply_parent_uri": _get(b, "reply", "parent", "uri"),
                "reply_root_uri": _get(b, "reply", "root", "uri"), "quote_uri": _quote(b),
                "embed_type": _get(b, "embed", "$type")}
    if r.collection in (LIKE, REPOST):
        return {"did": r.did, "rkey": r.rkey, "uri": _uri(r), "subject_uri": b["subject"]["uri"],
                "subject_cid": b["subject"]["cid"], "subject_did": _subject_did(b["subject"]["uri"])}
    if r.collection in (FOLLOW, BLOCK):
        return {"did": r.did, "rkey": r.rkey, "uri": _uri(r), "subject_did": b["subject"]}
    if r.collection == PROFILE:
        return {"did": r.did, "cid": r.cid, "display_name": b.get("displayName"), "description": b.get("description"),
                "avatar_cid": _get(b, "avatar", "ref", "$link"), "banner_cid": _get(b, "banner", "ref", "$link"),
                "pinned_post_uri": _get(b, "pinnedPost", "uri")}
    if r.collection == LIST:
        return {"did": r.did, "rkey": r.rkey, "uri": _uri(r), "name": b["name"], "purpose": b["purpose"],
                "description": b.get("description")}
    assert r.collection == LISTITEM
    return {"did": r.did, "rkey": r.rkey, "uri": _uri(r), "list_uri": b["list"], "subject_did": b["subject"]}


def _blob(rng: random.Random) -> dict[str, Any]:
    return {"$type": "blob", "ref": cbrrr.CID(RAW_PREFIX + rng.randbytes(32)), "mimeType": "image/png", "size": 1234}


def crafted() -> list[StoredRecord]:
    """One record of each shape the views must take apart."""
    rng = random.Random(7)
    alice, bob, carol = (fake_did(rng) for _ in range(3))
    t = BASE_MICROS
    created = iso_time(t)
    target = encode_record(bob, POST, tid(t - 10**9, 1), {"$type": POST, "createdAt": created, "text": "root post",
                                                         "langs": ["en"]})
    ref = {"uri": _uri(target), "cid": target.cid}
    other = {"uri": f"at://{carol}/{POST}/{tid(t - 5 * 10**8, 2)}", "cid": target.cid}
    reply_quote = encode_record(alice, POST, tid(t, 1), {
        "$type": POST, "createdAt": created, "text": "replying and quoting 🦋", "langs": ["en", "fr"],
        "reply": {"root": ref, "parent": other},
        "embed": {"$type": "app.bsky.embed.record", "record": other}})
    with_media = encode_record(alice, POST, tid(t + 1, 1), {
        "$type": POST, "createdAt": created, "text": "look",
        "embed": {"$type": "app.bsky.embed.recordWithMedia", "record": {"$type": "app.bsky.embed.record", "record": ref},
                  "media": {"$type": "app.bsky.embed.images", "images": [{"alt": "", "image": _blob(rng)}]}}})
    bare = encode_record(carol, POST, tid(t + 2, 1), {"$type": POST, "createdAt": "not a date", "text": ""})
    list_rec = encode_record(alice, LIST, tid(t + 3, 1), {"$type": LIST, "createdAt": created, "name": "friends",
                                                          "purpose": "app.bsky.graph.defs#curatelist"})
    return [
        target, reply_quote, with_media, bare, list_rec,
        encode_record(bob, LIKE, tid(t + 4, 1), {"$type": LIKE, "createdAt": created, "subject": ref}),
        encode_record(carol, REPOST, tid(t + 5, 1), {"$type": REPOST, "createdAt": created, "subject": ref}),
        encode_record(alice, FOLLOW, tid(t + 6, 1), {"$type": FOLLOW, "createdAt": created, "subject": bob}),
        encode_record(bob, BLOCK, tid(t + 7, 1), {"$type": BLOCK, "createdAt": created, "subject": carol}),
        encode_record(alice, PROFILE, "self", {"$type": PROFILE, "displayName": "Alice", "description": "hi",
                                               "avatar": _blob(rng), "pinnedPost": ref}),
        encode_record(alice, LISTITEM, tid(t + 8, 1), {"$type": LISTITEM, "createdAt": created,
                                                       "list": _uri(list_rec), "subject": carol}),
    ]


def _rows(store: Store, view: str, columns: list[str]) -> dict[tuple[str, str], dict[str, Any]]:
    key = "did, 'self'" if view == "profiles" else "did, rkey"
    rows = store.fetchall(f"SELECT {key}, {', '.join(columns)} FROM {view}")
    return {(r[0], r[1]): dict(zip(columns, r[2:], strict=True)) for r in rows}


def _times(store: Store) -> dict[tuple[str, str, str], tuple[Any, Any]]:
    rows = store.fetchall(f"SELECT did, collection, rkey, created_at, event_at FROM records")
    return {(r[0], r[1], r[2]): (r[3], r[4]) for r in rows}


def check_views(store: Store, records: list[StoredRecord]) -> None:
    times = _times(store)
    for collection, view in VIEW_OF.items():
        mine = [r for r in records if r.collection == collection]
        columns = [*expected(mine[0]), "created_at", "event_at"]
        rows = _rows(store, view, columns)
        assert len(rows) == len(mine), view
        for r in mine:
            got = rows[(r.did, r.rkey)]
            assert {k: got[k] for k in expected(r)} == expected(r), (view, r.json)
            assert (got["created_at"], got["event_at"]) == times[(r.did, r.collection, r.rkey)]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    with Store(tmp_path / "views.duckdb") as s:
        yield s


def test_crafted_records(store: Store) -> None:
    records = crafted()
    write_records(store, records)
    check_views(store, records)
    posts = _rows(store, "posts", ["quote_uri", "reply_root_uri", "embed_type", "langs", "created_at"])
    reply_quote, with_media, bare = records[1], records[2], records[3]
    assert posts[(reply_quote.did, reply_quote.rkey)]["quote_uri"] == reply_quote.body["reply"]["parent"]["uri"]
    assert posts[(with_media.did, with_media.rkey)]["quote_uri"] == _uri(records[0])
    assert posts[(with_media.did, with_media.rkey)]["embed_type"] == "app.bsky.embed.recordWithMedia"
    assert posts[(bare.did, bare.rkey)] == {"quote_uri": None, "reply_root_uri": None, "embed_type": None,
                                            "langs": None, "created_at": None}
    like = _rows(store, "likes", ["subject_did", "subject_uri"])[(records[5].did, records[5].rkey)]
    assert like == {"subject_did": records[0].did, "subject_uri": _uri(records[0])}
    profile = _rows(store, "profiles", ["display_name", "avatar_cid", "pinned_post_uri"])[(records[9].did, "self")]
    assert profile["display_name"] == "Alice" and profile["avatar_cid"].startswith("bafkrei")
    assert profile["pinned_post_uri"] == _uri(records[0])
    item = _rows(store, "list_items", ["list_uri"])[(records[10].did, records[10].rkey)]
    assert item["list_uri"] == _uri(records[4])


def test_generated_mix_of_every_collection(store: Store) -> None:
    records = generated_records(1500, seed=3)
    assert {r.collection for r in records} == set(VIEW_OF)
    write_records(store, records, chunk=250)
    check_views(store, records)


def test_views_show_live_records_only(store: Store) -> None:
    records = crafted()
    write_records(store, records)
    batch = Batch()
    gone = records[5]  # the like
    batch.delete_record(gone.did, gone.collection, gone.rkey)
    store.apply(batch)
    profile = records[9]
    renamed = encode_record(profile.did, PROFILE, "self", {"$type": PROFILE, "displayName": "Alice 2"})
    write_records(store, [renamed])
    assert store.fetchall("SELECT count(*) FROM likes") == [(0,)]
    assert store.fetchall("SELECT display_name, avatar_cid FROM profiles") == [("Alice 2", None)]


def test_views_are_listed_and_readable_read_only(tmp_path: Path) -> None:
    path = tmp_path / "ro.duckdb"
    with Store(path) as s:
        write_records(s, crafted())
        names = {r[0] for r in s.fetchall("SELECT view_name FROM duckdb_views() WHERE NOT internal")}
        assert set(TYPED_VIEWS) <= names
    with Store(path, read_only=True) as ro:
        for view in TYPED_VIEWS:
            assert ro.fetchall(f"SELECT count(*) FROM {view}")[0][0] >= 1, view


def test_maker_collections_have_views() -> None:
    rng = random.Random(1)
    maker = RecordMaker(rng, peers=["did:plc:x"])
    assert {maker.collection() for _ in range(2000)} == set(VIEW_OF)


@pytest.mark.parametrize("name", ["r", "records", "posts"])
def test_database_file_names_do_not_shadow_view_columns(tmp_path: Path, name: str) -> None:
    # DuckDB names the catalog after the file: r.duckdb once made `r.reply` a table reference
    records = crafted()
    for _ in range(2):  # created, then re-created on the next open
        with Store(tmp_path / f"{name}.duckdb") as s:
            write_records(s, records)
            check_views(s, records)
