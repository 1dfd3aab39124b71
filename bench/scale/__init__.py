"""Benchmarks of the store at scale (issue 11): JSONBench's queries on the mirror (`jsonbench`)."""

__all__: list[str] = []
