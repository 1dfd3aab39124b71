"""Benchmarks for skyfill and the deterministic atproto data they run on.

`python -m bench [--smoke] [parts...]` runs registered parts (see `bench.harness`); the data
generator lives in `tests.support.generate`, local firehose/PDS/PLC servers in `bench.servers`.
"""

from .harness import Row, Sizes, part, registry

__all__ = ["Row", "Sizes", "part", "registry"]
