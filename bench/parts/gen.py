"""`gen`: how fast the deterministic generator draws frames and whole repos."""

from __future__ import annotations

import random

from tests.support.generate import World, generate_repo, make_identity
from bench.harness import Context, Row, part, timed_rate

# 200,000 frames "well under a minute"; a 300,000-record repo in well under 30 s.
FRAMES_PER_S_TARGET = 4_000.0
REPO_RECORDS_PER_S_TARGET = 15_000.0


@part("gen", order=10)
def gen(ctx: Context) -> list[Row]:
    sizes = ctx.sizes
    world = World(ctx.seed, n_dids=sizes.n_dids, retain_blocks=False)
    total = 0

    def draw() -> None:
        nonlocal total
        for frame in world.frames(sizes.gen_frames):
            total += len(frame)

    rate, seconds = timed_rate(sizes.gen_frames, draw)
    ident = make_identity(random.Random(ctx.seed))
    car = b""

    def build() -> None:
        nonlocal car
        car = generate_repo(ctx.seed, did=ident.did, key=ident.secret, n_records=sizes.repo_records)

    repo_rate, repo_seconds = timed_rate(sizes.repo_records, build)
    ctx.memo("repo", lambda: (ident, car))
    return [
        Row.at_least("gen.frames", rate, "frames/s", None if sizes.smoke else FRAMES_PER_S_TARGET),
        Row(f"gen.frames.{sizes.gen_frames}.seconds", seconds, "s"),
        Row("gen.frames.mean_size", total / max(1, sizes.gen_frames), "bytes"),
        Row.at_least("gen.repo", repo_rate, "records/s", None if sizes.smoke else REPO_RECORDS_PER_S_TARGET),
        Row(f"gen.repo.{sizes.repo_records}.seconds", repo_seconds, "s"),
        Row("gen.repo.car_size", len(car) / 1e6, "MB"),
    ]
