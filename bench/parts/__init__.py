"""Benchmark parts. Every module here is imported by the harness and registers its parts
with `@bench.harness.part(name)`; add a module to add a benchmark."""
