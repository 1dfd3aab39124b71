"""`floor`: libipld alone on the generated data, the ceiling any Python decoder can reach."""

from __future__ import annotations

import libipld

from bench.harness import Context, Row, part, timed_rate
from skyfill.protocol.car import read_car

from ._shared import frames, repo, walk_records


def lean_decode(data: list[bytes]) -> None:
    """The floor: what a lean consumer must decode (body, CAR split, commit block, op record blocks)."""
    decode_multi, decode = libipld.decode_dag_cbor_multi, libipld.decode_dag_cbor
    for f in data:
        header, body = decode_multi(f)
        if header["t"] != "#commit":
            continue
        _roots, blocks = read_car(body["blocks"])
        decode(blocks[body["commit"]])
        for op in body["ops"]:
            cid = op["cid"]
            if cid is not None:
                decode(blocks[cid])


@part("floor", order=20)
def floor(ctx: Context) -> list[Row]:
    data = frames(ctx)
    decode_multi = libipld.decode_dag_cbor_multi

    def frames_only() -> None:
        for f in data:
            decode_multi(f)

    def frames_and_records() -> None:
        lean_decode(data)

    frame_rate, _ = timed_rate(len(data), frames_only)
    record_rate, _ = timed_rate(len(data), frames_and_records)

    _ident, car = repo(ctx)
    count = 0

    def repo_walk() -> None:
        nonlocal count
        header, nodes = libipld.decode_car(car)
        commit = nodes[header["roots"][0]]
        count = sum(1 for _ in walk_records(nodes, commit["data"]))

    repo_rate, _ = timed_rate(ctx.sizes.repo_records, repo_walk)
    if count != ctx.sizes.repo_records:
        raise AssertionError(f"walked {count} records, expected {ctx.sizes.repo_records}")
    return [
        Row("floor.frames.decode_multi", frame_rate, "frames/s"),
        Row("floor.frames.decode_commit_and_records", record_rate, "frames/s"),
        Row("floor.repo.decode_car_walk", repo_rate, "records/s"),
    ]
