"""`sdk`: the atproto Python SDK on the same frames and repo: the baseline skyfill is compared with."""

from __future__ import annotations

from bench.harness import Context, Row, part, timed_rate

from ._shared import frames, repo


@part("sdk", order=30)
def sdk(ctx: Context) -> list[Row]:
    from atproto import CAR, CID

    from .ingest import sdk_frames_rate

    rate = sdk_frames_rate(frames(ctx))

    _ident, car_bytes = repo(ctx)

    def repo_path() -> None:
        # the SDK has no MST walker: nested links are raw bytes, blocks are keyed by CID objects
        car = CAR.from_bytes(car_bytes)
        blocks = car.blocks
        link = CID.from_decoded_bytes
        commit = blocks[car.root]
        stack = [commit["data"]]
        found = 0
        while stack:
            node = blocks[link(stack.pop())]
            if node["l"] is not None:
                stack.append(node["l"])
            for e in node["e"]:
                blocks[link(e["v"])]
                found += 1
                if e["t"] is not None:
                    stack.append(e["t"])
        if found != ctx.sizes.repo_records:
            raise AssertionError(f"walked {found} records, expected {ctx.sizes.repo_records}")

    repo_rate, _ = timed_rate(ctx.sizes.repo_records, repo_path)
    return [
        Row("sdk.frames", rate, "frames/s"),
        Row("sdk.repo.car_from_bytes_walk", repo_rate, "records/s"),
    ]
