"""The pinned DuckDB (docs/performance.md, "DuckDB version"): its extension wheels match it, and a
store written by a newer DuckDB than the installed one ends in one error naming the conversion.

The fixture is a real skyfill store (4 batches, one compaction) written by `Store` on DuckDB 2.0.1,
gzipped (22 kB): DuckDB 1.5 refuses its storage version.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from skyfill.errors import StorageError
from skyfill.storage import Store
from skyfill.storage.file_version import writer_version

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "store_duckdb_2.0.1.duckdb.gz"
OURS = tuple(int(p) for p in duckdb.__version__.split(".")[:2])


@pytest.fixture
def newer_file(tmp_path: Path) -> Path:
    path = tmp_path / "old.duckdb"
    path.write_bytes(gzip.decompress(FIXTURE.read_bytes()))
    return path


def test_the_extension_wheels_match_the_installed_duckdb() -> None:
    ducklake = pytest.importorskip("duckdb_extension_ducklake")
    postgres = pytest.importorskip("duckdb_extension_postgres")
    for module, name in ((ducklake, "ducklake"), (postgres, "postgres")):
        path = Path(module.__file__).parent / "extensions" / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
        assert path.is_file(), f"{module.__name__} ships no extension for DuckDB {duckdb.__version__}"


def test_the_writer_version_is_read_from_the_header(newer_file: Path, tmp_path: Path) -> None:
    assert writer_version(newer_file) == "v2.0.1"
    ours = tmp_path / "ours.duckdb"
    Store(ours).close()
    assert writer_version(ours) == f"v{duckdb.__version__}"
    (tmp_path / "text").write_text("not a database")
    assert writer_version(tmp_path / "text") is None
    assert writer_version(tmp_path / "missing") is None


@pytest.mark.skipif(OURS >= (2, 0), reason="this DuckDB reads the 2.0.1 file")
def test_a_store_written_by_a_newer_duckdb_names_the_conversion(newer_file: Path) -> None:
    with pytest.raises(StorageError) as info:
        Store(newer_file)
    text = str(info.value)
    assert "DuckDB v2.0.1" in text and f"DuckDB {duckdb.__version__}" in text
    assert "pip install duckdb==2.0.1" in text
    assert f"STORAGE_VERSION 'v{OURS[0]}.{OURS[1]}.0'" in text and "COPY FROM DATABASE old TO new" in text
    assert newer_file.read_bytes() == gzip.decompress(FIXTURE.read_bytes())  # nothing written


@pytest.mark.skipif(OURS >= (2, 0), reason="this DuckDB reads the 2.0.1 file")
def test_the_cli_says_it_in_one_error_line(newer_file: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYFILL_")}
    proc = subprocess.run([sys.executable, "-m", "skyfill.cli", "status", "--db", str(newer_file)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode in (1, 2), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "COPY FROM DATABASE" in errors[0], proc.stderr


@pytest.mark.skipif(OURS < (2, 0), reason="only a DuckDB 2 reads the fixture")
def test_a_duckdb_2_opens_the_fixture(newer_file: Path) -> None:
    with Store(newer_file, read_only=True) as store:
        assert store.fetchall("SELECT count(*) FROM records")[0][0] > 0
