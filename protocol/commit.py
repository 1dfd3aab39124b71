"""The signed commit's signature: one check for whole repos (repo.py) and firehose frames.

A commit's signature covers the DAG-CBOR encoding of the commit map without its `sig` field.
The commit arrives decoded (libipld turns CID links into 36-byte strings); libipld re-encodes
36-byte CID-shaped byte strings as CID links, which is exactly what `data` and `prev` are, so
re-encoding the decoded map gives back the signed bytes.
"""

from __future__ import annotations

from typing import Any

import libipld

from .crypto import PublicKey, verify_signature

__all__ = ["commit_signature_valid"]


def commit_signature_valid(commit: dict[str, Any], key: PublicKey) -> bool:
    """True when `commit["sig"]` is bytes and signs the commit without `sig` under `key`.

    Raises ValueError, TypeError, OverflowError or RecursionError when the rest of the commit
    cannot be re-encoded as DAG-CBOR (a caller with untrusted input turns these into its own
    error).
    """
    sig = commit.get("sig")
    if type(sig) is not bytes:
        return False
    unsigned = libipld.encode_dag_cbor({k: v for k, v in commit.items() if k != "sig"})
    return verify_signature(key, unsigned, sig)
