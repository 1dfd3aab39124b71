"""`ingest`: firehose frames -> `consumer.Daemon` -> a DuckDB file, end to end, three processes.

A relay process streams pre-generated frames (tests.support.generate.World: many DIDs, chains intact)
over a real WebSocket; a consumer process runs the real daemon from cursor 0 and stops when
the last seq is committed (decoded, tracked, written, cursor stored). The verified run does
the same with every commit signature checked, its keys resolved from a PLC process serving the
World's DID documents. The SDK path runs in this process over the first frames of the same stream.

Cold cache (`ingest.verified.cold`): the first 20,000 frames of the stream, consumed with
`--verify` by a fresh process into a fresh file, so none of the ~1,000 DIDs has a key yet: the
figure a restart with an empty identities table, or a day of new DIDs, sees. The same frames
unverified (`ingest.cold`) give the ratio. The per-frame costs of the two checks are timed
alone in this process (`ingest.verify_signature.cost`, `ingest.verify_inversion.cost`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tests.support.generate import World
from bench.harness import Context, Row, part, timed_rate
from bench.progress import step

from ._workers import read_frames, run_json, spawn, write_frames

FRAMES_PER_S_TARGET = 50_000.0
VERIFIED_PER_S_TARGET = 20_000.0
SDK_RATIO_TARGET = 2.5
PEAK_RSS_MB_TARGET = 300.0


def ingest_frames(ctx: Context) -> int:
    return 2_000 if ctx.sizes.smoke else 200_000


def cold_frames(ctx: Context) -> int:
    return 1_000 if ctx.sizes.smoke else 20_000


def sdk_frames_rate(data: list[bytes]) -> float:
    """The atproto SDK's documented firehose loop (parse, CAR, record models), writing nothing."""
    from atproto import CAR, firehose_models, models, parse_subscribe_repos_message

    commit_type = models.ComAtprotoSyncSubscribeRepos.Commit

    def frames_path(data: list[bytes] = data) -> None:
        for f in data:
            message = parse_subscribe_repos_message(firehose_models.Frame.from_bytes(f))
            if not isinstance(message, commit_type):
                continue
            car = CAR.from_bytes(message.blocks)
            for op in message.ops:
                if op.cid is not None:
                    models.get_or_create(car.blocks.get(op.cid), strict=False)

    frames_path(data[:200])  # warm-up: the SDK imports its models lazily
    rate, _ = timed_rate(len(data), frames_path)
    return rate


def verify_seconds_per_frame(ctx: Context, data: list[bytes]) -> float:
    """What an opt-in commit signature check would add per frame: decode the commit block,
    re-encode it without `sig`, verify against the DID's key (keys already resolved)."""
    import libipld

    from skyfill.protocol.events import Commit
    from skyfill.protocol.frames import parse_frame
    from skyfill.protocol.crypto import PublicKey, verify_signature

    world = World(ctx.seed, n_dids=ctx.sizes.n_dids, retain_blocks=False)
    keys = {i.did: PublicKey("k256", i.public_key) for i in world.identities}
    commits = [e for e in map(parse_frame, data) if isinstance(e, Commit) and e.commit_block is not None]
    decode, encode = libipld.decode_dag_cbor, libipld.encode_dag_cbor

    def check() -> None:
        for e in commits:
            commit = decode(e.commit_block)
            sig = commit.pop("sig")
            if not verify_signature(keys[e.did], encode(commit), sig):
                raise AssertionError(f"signature of {e.did} rev {e.rev} does not verify")

    _rate, seconds = timed_rate(len(commits), check)
    return seconds / len(data)


def inversion_seconds_per_frame(data: list[bytes]) -> float:
    """What the sync 1.1 proof adds per frame under --verify: decode the frame again, split its
    CAR, undo the ops on the partial MST (skyfill.mst.invert_commit), compare with prevData."""
    import libipld

    from skyfill.protocol.car import read_car
    from skyfill.protocol.mst import invert_commit

    decode_multi, decode = libipld.decode_dag_cbor_multi, libipld.decode_dag_cbor

    def check() -> None:
        for f in data:
            header, body = decode_multi(f)
            if header.get("t") != "#commit":
                continue
            blocks = read_car(body["blocks"])[1]
            ops = [(o["action"], o["path"], o.get("cid"), o.get("prev")) for o in body["ops"]]
            invert_commit(decode(blocks[body["commit"]])["data"], body["prevData"], ops, blocks)

    _rate, seconds = timed_rate(len(data), check)
    return seconds / len(data)


@part("ingest", order=40)
def ingest(ctx: Context) -> list[Row]:
    n = ingest_frames(ctx)
    smoke = ctx.sizes.smoke
    with tempfile.TemporaryDirectory(prefix="skyfill-bench-") as tmp:
        path = Path(tmp) / "frames.bin"
        world = World(ctx.seed, n_dids=ctx.sizes.n_dids, retain_blocks=False)
        step(f"ingest: generating {n:,} frames")
        count, size = write_frames(path, world.frames(n))
        last_seq = world.last_seq
        with spawn("firehose", str(path)) as relay:
            step(f"ingest: the daemon consumes {count:,} frames (1/4: default settings)")
            result = run_json("consume", str(Path(tmp) / "ingest.duckdb"), relay["url"], str(last_seq))
            step("ingest: 2/4 and 3/4: 20,000-event transactions, then a 100MB DuckDB buffer pool")
            # two knobs, each in a fresh run: bigger DuckDB transactions; a capped DuckDB buffer pool
            big = run_json("consume", str(Path(tmp) / "big.duckdb"), relay["url"], str(last_seq), "20000")
            capped = run_json("consume", str(Path(tmp) / "capped.duckdb"), relay["url"], str(last_seq),
                              "5000", "100MB")
            # --verify: every commit's signature and proof checked, keys resolved from a PLC process
            with spawn("plc", str(ctx.seed), str(ctx.sizes.n_dids)) as plc:
                step("ingest: 4/4: --verify (signatures and proofs)")
                checked = run_json("consume", str(Path(tmp) / "verified.duckdb"), relay["url"], str(last_seq),
                                   "--verify", plc["url"])
        cold_path = Path(tmp) / "cold.bin"
        n_cold, _ = write_frames(cold_path, read_frames(path, cold_frames(ctx)))
        cold_seq = _last_seq(cold_path)
        with spawn("firehose", str(cold_path)) as relay, spawn("plc", str(ctx.seed), str(ctx.sizes.n_dids)) as plc:
            step(f"ingest: cold start, {n_cold:,} frames, plain then verified")
            cold = run_json("consume", str(Path(tmp) / "cold.duckdb"), relay["url"], str(cold_seq))
            cold_checked = run_json("consume", str(Path(tmp) / "cold-verified.duckdb"), relay["url"], str(cold_seq),
                                    "--verify", plc["url"])
        prefix = list(read_frames(path, min(n, ctx.sizes.frames)))
    step("ingest: the SDK path, signature and inversion costs in-process")
    rate = count / result["seconds"]
    sdk_rate = sdk_frames_rate(prefix)
    verify_s = verify_seconds_per_frame(ctx, prefix)
    inversion_s = inversion_seconds_per_frame(prefix)
    verified = count / checked["seconds"]
    for run, plain in ((checked, result), (cold_checked, cold)):
        rejected = {k: v for k, v in run["counts"].items() if k.startswith("error:") or k == "unverifiable"}
        if rejected or run["records"] != plain["records"]:
            raise AssertionError(f"verified run rejected events or stored other rows: {rejected}, {run['records']}")
    peak_mb = result["peak_rss"] / 1e6
    if result["records"] <= 0 or result["repos"] <= 0:
        raise AssertionError(f"consumer stored nothing: {result}")
    return [
        Row.at_least("ingest.frames", rate, "frames/s", None if smoke else FRAMES_PER_S_TARGET),
        Row(f"ingest.frames.{count}.seconds", result["seconds"], "s"),
        Row("ingest.frames.mean_size", size / count, "bytes"),
        Row("ingest.records_stored", float(result["records"]), "rows"),
        Row.at_most("ingest.peak_rss", peak_mb, "MB", None if smoke else PEAK_RSS_MB_TARGET),
        Row("ingest.batch_events_20000.frames", count / big["seconds"], "frames/s"),
        Row("ingest.batch_events_20000.peak_rss", big["peak_rss"] / 1e6, "MB"),
        Row("ingest.duckdb_memory_limit_100MB.frames", count / capped["seconds"], "frames/s"),
        Row("ingest.duckdb_memory_limit_100MB.peak_rss", capped["peak_rss"] / 1e6, "MB"),
        Row("ingest.sdk.frames", sdk_rate, "frames/s"),
        Row.at_least("ingest.vs_sdk", rate / sdk_rate, "x", None if smoke else SDK_RATIO_TARGET),
        Row("ingest.verify_signature.cost", 1e6 * verify_s, "µs/frame"),
        Row("ingest.verify_inversion.cost", 1e6 * inversion_s, "µs/frame"),
        Row.at_least("ingest.verified", verified, "frames/s", None if smoke else VERIFIED_PER_S_TARGET),
        Row("ingest.verified.peak_rss", checked["peak_rss"] / 1e6, "MB"),
        Row("ingest.cold", n_cold / cold["seconds"], "frames/s"),
        Row.at_least("ingest.verified.cold", n_cold / cold_checked["seconds"], "frames/s",
                     None if smoke else VERIFIED_PER_S_TARGET),
    ]


def _last_seq(path: Path) -> int:
    import libipld

    last = None
    for last in read_frames(path):
        pass
    assert last is not None
    return int(libipld.decode_dag_cbor_multi(last)[1]["seq"])
