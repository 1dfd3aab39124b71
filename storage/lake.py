"""The store on DuckLake: a catalog database (PostgreSQL for many writers) plus Parquet data files.

`--db ducklake:<catalog>` (e.g. `ducklake:postgres:dbname=mirror host=127.0.0.1 port=5432 user=skyfill`)
with a data path (`--data-path DIR`, carried in the db string as `;data_path=DIR`: `lake_db`) opens the
same tables, views and macros as a DuckDB file, in a lake that several processes write at once.

The connection: an in-memory DuckDB that LOADs the ducklake and postgres extensions from the files
shipped in the `duckdb-extension-ducklake` / `duckdb-extension-postgres` wheels (nothing is
downloaded), ATTACHes the lake as `skyfill_lake` and USEs it (every cursor too: `use_lake`).

The dialect. DuckLake refuses sequences, PRIMARY KEY/UNIQUE constraints (so ON CONFLICT) and
per-column compression; everything else of the schema (macros, views, NOT NULL, DEFAULT, UBIGINT,
JSON, lists, DELETE, UPDATE, ALTER) it takes. So:
    DDL        `run_ddl` runs the file's DDL text with those clauses removed (`lake_ddl`): one schema
    sequences  `next_value(con, name)`: a PostgreSQL sequence in schema `skyfill` of the catalog's
               database (attached as `skyfill_pg`), else DuckDB's `nextval`. Values are unique across
               every writer of the lake and increase in the order writers take them; a writer takes
               its transaction's version `v` before it writes and may commit after a writer that took
               a later one, so one key's versions are ordered by the repo's rev, then v (records.py)
    upserts    the few small keyed tables (cursors, identities, the sink's marks) are appended on the
               lake, ON CONFLICT on the file (`upsert`, the one switch); readers take each key's
               newest row, and the compactor (holding the lake's lease, storage/lease.py) prunes the
               older ones. Writers never DELETE on the lake: only the compactor does
A catalog other than PostgreSQL (a DuckDB or SQLite file: one writer) takes versions from the clock
(`_clock_value`: microseconds, strictly increasing in the process).

Transaction conflicts (two writers changing the same catalog entries or rows at once) fail at COMMIT
with a DuckLake "Transaction conflict" error; `is_conflict` recognises them so `StoreBase._txn`
retries the transaction (bounded, counted in skyfill_store_txn_retries_total).
"""

from __future__ import annotations

import importlib.util
import os
import re
import threading
import time
from pathlib import Path
from typing import Final

import duckdb

from skyfill.errors import StorageError

__all__ = ["LAKE_PREFIX", "LAKE_ALIAS", "is_lake", "lake_db", "LakeTarget", "parse_lake", "connect_lake", "use_lake",
           "on_lake", "lake_ddl", "run_ddl", "next_value", "is_conflict", "upsert", "has_postgres", "postgres_query",
           "postgres_execute", "quote"]

LAKE_PREFIX: Final = "ducklake:"
LAKE_ALIAS: Final = "skyfill_lake"
_PG_ALIAS: Final = "skyfill_pg"
_DATA_PATH_SEP: Final = ";data_path="
_SEQUENCES: Final = ("write_version", "coverage_id", "listing_seq")
# the compaction lease (storage/lease.py): one row per lease
_LEASES_DDL: Final = ("CREATE TABLE IF NOT EXISTS skyfill.leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, "
                      "expires_at TIMESTAMPTZ NOT NULL);")


def is_lake(db: str) -> bool:
    return str(db).startswith(LAKE_PREFIX)


def lake_db(catalog: str, data_path: str | Path | None) -> str:
    """The db string of a lake: `catalog` (ducklake:...) and, when given, its data path."""
    return catalog if data_path is None else f"{catalog}{_DATA_PATH_SEP}{data_path}"


class LakeTarget:
    """A parsed lake db string: `catalog` (after ducklake:), `data_path` (None: the catalog's own)."""

    def __init__(self, catalog: str, data_path: str | None) -> None:
        self.catalog = catalog
        self.data_path = data_path

    @property
    def postgres_dsn(self) -> str | None:
        return self.catalog[len("postgres:"):] if self.catalog.startswith("postgres:") else None

    def __str__(self) -> str:
        return LAKE_PREFIX + self.catalog


def parse_lake(db: str) -> LakeTarget:
    rest = db[len(LAKE_PREFIX):]
    data_path: str | None = None
    if _DATA_PATH_SEP in rest:
        rest, data_path = rest.split(_DATA_PATH_SEP, 1)
    if not rest:
        raise StorageError(f"{db!r}: no catalog after {LAKE_PREFIX!r} (e.g. ducklake:postgres:dbname=x host=...)")
    return LakeTarget(rest, data_path or None)


# -- the extensions, from the wheels ------------------------------------------------------------

def _wheel_extension(package: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise StorageError(f"the DuckLake store needs the Python package {package.replace('_', '-')}=="
                           f"{duckdb.__version__} (pip install it; nothing is downloaded at run time)")
    path = Path(next(iter(spec.submodule_search_locations))) / "extensions" / f"v{duckdb.__version__}" / name
    if not path.exists():
        raise StorageError(f"{path} is missing: install {package.replace('_', '-')}=={duckdb.__version__}")
    return path


def _postgres_extension() -> Path:
    """DuckDB takes an extension's name from its file name, and the postgres one must be loaded as
    `postgres_scanner`: a link of that name beside a per-user cache, made once."""
    source = _wheel_extension("duckdb_extension_postgres", "postgres.duckdb_extension")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "skyfill" / "duckdb" / f"v{duckdb.__version__}"
    link = cache / "postgres_scanner.duckdb_extension"
    if not (link.is_symlink() and link.resolve() == source.resolve()):
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".postgres_scanner.{os.getpid()}.{threading.get_ident()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(source)
        os.replace(tmp, link)
    return link


def quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def connect_lake(db: str, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the lake `db` attached and in use (and its Postgres for sequences)."""
    target = parse_lake(db)
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False,
                                             "autoload_known_extensions": False})
    try:
        con.execute(f"LOAD {quote(str(_wheel_extension('duckdb_extension_ducklake', 'ducklake.duckdb_extension')))}")
        con.execute(f"LOAD {quote(str(_postgres_extension()))}")
        options = []
        if target.data_path is not None:
            if not read_only:
                Path(target.data_path).mkdir(parents=True, exist_ok=True)
            options.append(f"DATA_PATH {quote(str(target.data_path))}")
        if read_only:
            options.append("READ_ONLY")
        attach = f"ATTACH {quote(LAKE_PREFIX + target.catalog)} AS {LAKE_ALIAS}"
        con.execute(attach + (f" ({', '.join(options)})" if options else ""))
        dsn = target.postgres_dsn
        if dsn is not None:
            con.execute(f"ATTACH {quote(dsn)} AS {_PG_ALIAS} (TYPE postgres)")
            if not read_only:
                ddl = "CREATE SCHEMA IF NOT EXISTS skyfill; " + " ".join(
                    f"CREATE SEQUENCE IF NOT EXISTS skyfill.{name};" for name in _SEQUENCES) + _LEASES_DDL
                postgres_execute(con, ddl)
        use_lake(con)
    except BaseException:
        con.close()
        raise
    return con


def use_lake(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """Make the lake the default catalog of `con` (a cursor starts in the in-memory one)."""
    con.execute(f"USE {LAKE_ALIAS}")
    con.execute("SET enable_progress_bar = false")  # a per-connection setting; catalog round trips are slow
    return con


def on_lake(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether `con`'s default catalog is a DuckLake (the dialect switch; a local, cheap read)."""
    rows = con.execute("SELECT type FROM duckdb_databases() WHERE database_name = current_database()").fetchall()
    return bool(rows) and rows[0][0] == "ducklake"


# -- the dialect ------------------------------------------------------------------------------

_DDL_RULES: Final = (
    (re.compile(r"CREATE SEQUENCE[^;]*;", re.I), ""),
    (re.compile(r",\s*PRIMARY KEY\s*\([^)]*\)", re.I), ""),      # a table constraint
    (re.compile(r"\s+PRIMARY KEY\b", re.I), " NOT NULL"),        # a column constraint
    (re.compile(r"\s+USING COMPRESSION\s+\w+", re.I), ""),
    (re.compile(r"\s+DEFAULT\s+nextval\('[^']*'\)", re.I), ""),  # the writer gives the value (next_value)
)


def lake_ddl(sql: str) -> str:
    """The file's DDL text as DuckLake takes it (see the module docstring)."""
    sql = "\n".join(line.split("--", 1)[0] if "--" in line and "'" not in line.split("--", 1)[0] else line
                    for line in sql.splitlines())
    for pattern, replacement in _DDL_RULES:
        sql = pattern.sub(replacement, sql)
    return sql


def run_ddl(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Run schema text on the file, or in the lake's dialect."""
    con.execute(lake_ddl(sql) if on_lake(con) else sql)


_clock_lock = threading.Lock()
_clock_last = [0]


def _clock_value() -> int:
    with _clock_lock:
        _clock_last[0] = max(_clock_last[0] + 1, time.time_ns() // 1000)
        return _clock_last[0]


def has_postgres(con: duckdb.DuckDBPyConnection) -> bool:
    return bool(con.execute("SELECT 1 FROM duckdb_databases() WHERE database_name = ?", [_PG_ALIAS]).fetchall())


def next_value(con: duckdb.DuckDBPyConnection, name: str, count: int = 1) -> list[int]:
    """`count` new values of the sequence `name` (write_version, coverage_id, listing_seq), increasing."""
    if not on_lake(con):
        rows = con.execute(f"SELECT nextval('{name}') FROM range(?)", [count]).fetchall()
        return [int(r[0]) for r in rows]
    if name not in _SEQUENCES:
        raise StorageError(f"no sequence {name!r}")
    if not has_postgres(con):
        return [_clock_value() for _ in range(count)]
    rows = postgres_query(con, f"SELECT nextval('skyfill.{name}') FROM generate_series(1, {int(count)})")
    return sorted(int(r[0]) for r in rows)


def postgres_query(con: duckdb.DuckDBPyConnection, sql: str) -> list[tuple[object, ...]]:
    """The rows of `sql` run in the catalog's PostgreSQL (inside a DuckDB transaction: its snapshot)."""
    return con.execute(f"SELECT * FROM postgres_query('{_PG_ALIAS}', {quote(sql)})").fetchall()


def postgres_execute(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Run `sql` (no result) in the catalog's PostgreSQL."""
    con.execute(f"CALL postgres_execute('{_PG_ALIAS}', {quote(sql)})")


def upsert(con: duckdb.DuckDBPyConnection, insert: str, on_conflict: str, params: list[object] | None = None) -> None:
    """Write keyed rows, newest wins: `insert` (INSERT INTO t ... ) `on_conflict` (ON CONFLICT (keys)
    DO UPDATE ...) on a file, which has the primary key; on the lake `insert` alone, appended, and the
    readers take each key's newest row (by the table's time or rev column) until the compactor prunes
    the older ones (storage/compaction.py `prune`). Never a DELETE: on the lake a DELETE conflicts with
    every insert another writer commits into the table meanwhile (storage/lease.py)."""
    con.execute(insert if on_lake(con) else f"{insert} {on_conflict}", params)


def is_conflict(exc: BaseException) -> bool:
    """A DuckLake/DuckDB transaction conflict: the transaction can be retried from the start."""
    # DuckLake: "Failed to commit DuckLake transaction. Transaction conflict - attempting to delete from
    # table ... but another transaction has inserted into it"; DuckDB's own: "Conflict on tuple deletion"
    return isinstance(exc, duckdb.Error) and "conflict" in str(exc).lower()
