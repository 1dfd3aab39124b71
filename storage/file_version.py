"""A DuckDB file written by a newer DuckDB than the one installed: say so, and how to convert it.

skyfill pins DuckDB 1.5.5 (the DuckLake and Postgres extensions ship as wheels for it only;
docs/performance.md, "DuckDB version"). A file written by DuckDB 2.x carries a storage version
1.5 cannot read, and DuckDB's own error names neither the writer nor a way out. The writer's
version is in the file's main header; the way out is a copy made once by that DuckDB into the
storage version of ours (`ATTACH ... (STORAGE_VERSION ...)` + `COPY FROM DATABASE`), which keeps
every table, view, macro and sequence value and leaves the original file as it is.
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb

from skyfill.errors import StorageError

__all__ = ["newer_file_error", "writer_version"]

# DuckDB's main header: checksum (8 bytes), b"DUCK", version number (8), flags (4 x 8), then the
# writing library's version text (32 bytes, NUL-padded), e.g. b"v2.0.1".
_MAGIC_AT = 8
_WRITER_AT = 52
_WRITER_LEN = 32


def writer_version(path: str | Path) -> str | None:
    """The DuckDB version that wrote the file (\"v2.0.1\"), or None when the header does not say."""
    try:
        with open(path, "rb") as f:
            head = f.read(_WRITER_AT + _WRITER_LEN)
    except OSError:
        return None
    if head[_MAGIC_AT:_MAGIC_AT + 4] != b"DUCK":
        return None
    text = head[_WRITER_AT:_WRITER_AT + _WRITER_LEN].split(b"\0", 1)[0].decode("ascii", "replace")
    return text if re.fullmatch(r"v\d+\.\d+\.\d+\S*", text) else None


def newer_file_error(path: str, exc: duckdb.Error) -> StorageError | None:
    """A StorageError naming the conversion when `exc` is DuckDB refusing a file of a newer
    storage version; None for any other failure."""
    if "newer version of DuckDB" not in str(exc):
        return None
    ours = duckdb.__version__
    writer = writer_version(path) or "a newer DuckDB"
    pin = writer.lstrip("v") if writer.startswith("v") else "<that version>"
    major, minor = ours.split(".")[:2]
    new = f"{path.removesuffix('.duckdb')}-{major}.{minor}.duckdb"
    return StorageError(
        f"cannot open {path}: it was written by DuckDB {writer} and this skyfill runs DuckDB {ours}, "
        f"which cannot read files of a newer DuckDB. Convert it once with the DuckDB that wrote it "
        f"(e.g. `pip install duckdb=={pin}` in another venv; the original is left as it is): "
        f"ATTACH '{path}' AS old (READ_ONLY); ATTACH '{new}' AS new (STORAGE_VERSION 'v{major}.{minor}.0'); "
        f"COPY FROM DATABASE old TO new; then run skyfill with --db {new}"
    )
