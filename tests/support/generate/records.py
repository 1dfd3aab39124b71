"""Realistic app.bsky records, TIDs and timestamps.

Proportions follow the live network's write mix (creates): likes ~55%, follows ~15%,
posts ~15%, reposts ~10%, profile/blocks/lists ~5%. Deletes are chosen by the caller.
Strong refs carry their CID as a string (lexicon `com.atproto.repo.strongRef`); blob refs
carry a real `$link` (a raw-codec CID), as on the network.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Final

import cbrrr
import libipld

from .mst import RAW_PREFIX, cid_for

__all__ = [
    "RecordMaker",
    "tid",
    "iso_time",
    "micros_of",
    "PROFILE_KEY",
    "COLLECTION_WEIGHTS",
]

_S32: Final = "234567abcdefghijklmnopqrstuvwxyz"
PROFILE_KEY: Final = b"app.bsky.actor.profile/self"

COLLECTION_WEIGHTS: Final[dict[str, float]] = {
    "app.bsky.feed.like": 55.0,
    "app.bsky.graph.follow": 15.0,
    "app.bsky.feed.post": 15.0,
    "app.bsky.feed.repost": 10.0,
    "app.bsky.actor.profile": 1.5,
    "app.bsky.graph.block": 1.5,
    "app.bsky.graph.listitem": 1.5,
    "app.bsky.graph.list": 0.5,
}
_COLLECTIONS: Final = tuple(COLLECTION_WEIGHTS)
_CUM_WEIGHTS: Final = tuple(
    sum(list(COLLECTION_WEIGHTS.values())[: i + 1]) for i in range(len(COLLECTION_WEIGHTS))
)

_WORDS: Final = (
    "the a to and of is in that it for you on with this was just my so be not are have but "
    "like what about all out can when get one more today people time new think good really "
    "know now day love great post bluesky here how see want go first year thread world "
    "still right art book music game photo cat dog coffee morning night weekend news data "
    "open source code python rust protocol feed sky"
).split()
_EXTRA: Final = ("🦋", "✨", "😂", "❤️", "café", "naïve", "日本語", "¿qué?", "→", "—")
_LANGS: Final = (["en"],) * 14 + (["ja"], ["ja"], ["pt"], ["de"], ["es"], ["en", "fr"])


def tid(micros: int, clock_id: int) -> str:
    """13-char base32-sortable TID of a microsecond timestamp and a 10-bit clock id."""
    v = (micros << 10) | (clock_id & 0x3FF)
    return "".join(_S32[(v >> s) & 31] for s in range(60, -1, -5))


def iso_time(micros: int) -> str:
    dt = datetime.fromtimestamp(micros // 1_000_000, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{micros // 1000 % 1000:03d}Z"


def micros_of(iso: str) -> int:
    dt = datetime.strptime(iso[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return int(dt.timestamp()) * 1_000_000


class RecordMaker:
    """Draws collections and builds record bodies from one Random; `peers` are other DIDs."""

    __slots__ = ("_rng", "_peers")

    def __init__(self, rng: random.Random, *, peers: Sequence[str]) -> None:
        if not peers:
            raise ValueError("peers must not be empty")
        self._rng = rng
        self._peers = peers

    def collection(self) -> str:
        return self._rng.choices(_COLLECTIONS, cum_weights=_CUM_WEIGHTS)[0]

    def record(self, collection: str, micros: int) -> dict[str, Any]:
        created = iso_time(micros)
        maker = _MAKERS[collection]
        return maker(self, created, micros)

    def encode(self, collection: str, micros: int) -> tuple[bytes, bytes]:
        """(block, cid) of a fresh record."""
        block = cbrrr.encode_dag_cbor(self.record(collection, micros))
        return block, cid_for(block)

    # -- pieces -----------------------------------------------------------------------------

    def _peer(self) -> str:
        return self._rng.choice(self._peers)

    def _strong_ref(self, micros: int, collection: str = "app.bsky.feed.post") -> dict[str, str]:
        rng = self._rng
        past = micros - rng.randrange(1, 7 * 86_400_000_000)
        uri = f"at://{self._peer()}/{collection}/{tid(past, rng.randrange(1024))}"
        cid = libipld.encode_cid(cid_for(rng.randbytes(16)))
        return {"cid": cid, "uri": uri}

    def _text(self, max_len: int) -> str:
        rng = self._rng
        if rng.random() < 0.05:
            return ""
        target = min(max_len, int(rng.expovariate(1 / 90)) + 1)
        words: list[str] = []
        length = -1
        while length < target:
            w = rng.choice(_EXTRA) if rng.random() < 0.04 else rng.choice(_WORDS)
            words.append(w)
            length += len(w) + 1
        text = " ".join(words)
        return text[:max_len].rstrip()

    def _blob(self, mime: str = "image/jpeg") -> dict[str, Any]:
        rng = self._rng
        return {
            "$type": "blob",
            "ref": cbrrr.CID(RAW_PREFIX + hashlib.sha256(rng.randbytes(8)).digest()),
            "mimeType": mime,
            "size": rng.randrange(20_000, 1_000_000),
        }

    def _post(self, created: str, micros: int) -> dict[str, Any]:
        rng = self._rng
        text = self._text(240)
        facets: list[dict[str, Any]] = []
        r = rng.random()
        if r < 0.2:  # a facet appended to the text; offsets are UTF-8 byte offsets
            start = len(text.encode()) + (1 if text else 0)
            if r < 0.08:
                peer = self._peer()
                token = f"@{peer[8:16]}.test"
                feature: dict[str, Any] = {"$type": "app.bsky.richtext.facet#mention", "did": peer}
            elif r < 0.15:
                token = f"https://example.com/{rng.choice(_WORDS)}/{rng.randrange(10**6)}"
                feature = {"$type": "app.bsky.richtext.facet#link", "uri": token}
            else:
                tag = rng.choice(_WORDS)
                token = f"#{tag}"
                feature = {"$type": "app.bsky.richtext.facet#tag", "tag": tag}
            text = f"{text} {token}" if text else token
            end = start + len(token.encode())
            facets.append({"features": [feature], "index": {"byteEnd": end, "byteStart": start}})
        record: dict[str, Any] = {
            "$type": "app.bsky.feed.post",
            "createdAt": created,
            "langs": rng.choice(_LANGS),
            "text": text,
        }
        if facets:
            record["facets"] = facets
        if rng.random() < 0.3:
            root = self._strong_ref(micros)
            parent = root if rng.random() < 0.5 else self._strong_ref(micros)
            record["reply"] = {"parent": parent, "root": root}
        e = rng.random()
        if e < 0.2:
            record["embed"] = {
                "$type": "app.bsky.embed.images",
                "images": [
                    {
                        "alt": self._text(80) if rng.random() < 0.4 else "",
                        "aspectRatio": {"height": rng.randrange(300, 2000), "width": rng.randrange(300, 2000)},
                        "image": self._blob(),
                    }
                    for _ in range(rng.choice((1, 1, 1, 2, 3, 4)))
                ],
            }
        elif e < 0.25:
            record["embed"] = {
                "$type": "app.bsky.embed.external",
                "external": {
                    "description": self._text(150),
                    "title": self._text(60),
                    "uri": f"https://news.example.org/{rng.randrange(10**8)}",
                },
            }
        elif e < 0.3:
            record["embed"] = {"$type": "app.bsky.embed.record", "record": self._strong_ref(micros)}
        return record

    def _like(self, created: str, micros: int) -> dict[str, Any]:
        return {"$type": "app.bsky.feed.like", "createdAt": created, "subject": self._strong_ref(micros)}

    def _repost(self, created: str, micros: int) -> dict[str, Any]:
        return {"$type": "app.bsky.feed.repost", "createdAt": created, "subject": self._strong_ref(micros)}

    def _follow(self, created: str, micros: int) -> dict[str, Any]:
        return {"$type": "app.bsky.graph.follow", "createdAt": created, "subject": self._peer()}

    def _block(self, created: str, micros: int) -> dict[str, Any]:
        return {"$type": "app.bsky.graph.block", "createdAt": created, "subject": self._peer()}

    def _listitem(self, created: str, micros: int) -> dict[str, Any]:
        lst = f"at://{self._peer()}/app.bsky.graph.list/{tid(micros - 86_400_000_000, 0)}"
        return {"$type": "app.bsky.graph.listitem", "createdAt": created, "list": lst, "subject": self._peer()}

    def _list(self, created: str, micros: int) -> dict[str, Any]:
        return {
            "$type": "app.bsky.graph.list",
            "createdAt": created,
            "description": self._text(120),
            "name": self._text(30) or "list",
            "purpose": self._rng.choice(("app.bsky.graph.defs#curatelist", "app.bsky.graph.defs#modlist")),
        }

    def _profile(self, created: str, micros: int) -> dict[str, Any]:
        rng = self._rng
        record: dict[str, Any] = {
            "$type": "app.bsky.actor.profile",
            "createdAt": created,
            "description": self._text(256),
            "displayName": self._text(40),
        }
        if rng.random() < 0.8:
            record["avatar"] = self._blob()
        if rng.random() < 0.5:
            record["banner"] = self._blob()
        return record


_MAKERS: Final = {
    "app.bsky.feed.like": RecordMaker._like,
    "app.bsky.graph.follow": RecordMaker._follow,
    "app.bsky.feed.post": RecordMaker._post,
    "app.bsky.feed.repost": RecordMaker._repost,
    "app.bsky.actor.profile": RecordMaker._profile,
    "app.bsky.graph.block": RecordMaker._block,
    "app.bsky.graph.listitem": RecordMaker._listitem,
    "app.bsky.graph.list": RecordMaker._list,
}
