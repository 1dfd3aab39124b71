"""skyfill: a complete, correct, up-to-date copy of AT Protocol data in DuckDB.

The top-level package holds what every part shares: the CLI, the exception tree,
metrics, atproto syntax checks and the DAG-CBOR/CAR primitives. The data flow lives in
``consumer`` (firehose -> events -> per-DID state), ``backfill`` (gaps -> fetch -> verify
-> reconcile) and ``storage`` (the DuckDB schema and its one writer).
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
