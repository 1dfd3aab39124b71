"""A throwaway PostgreSQL cluster on a loopback port: the catalog of a DuckLake (`--db ducklake:...`).

    with PostgresCluster() as pg:        # initdb in a temp dir, started, ready when the block starts
        pg.dsn                           # "dbname=skyfill host=127.0.0.1 port=PORT user=postgres"
        pg.create_database("lake2")      # another empty database on the same cluster
        pg.stop()

PostgreSQL refuses to run as root, so when we are root initdb, pg_ctl and the server run as the
`postgres` user (`runuser -u postgres --`) and the data directory is handed to it. Authentication
is `trust` on 127.0.0.1 only (no unix socket outside the data directory).

`python -m tests.support.postgres up|down` starts/stops one under .cache/lake for `make lake-up` /
`make lake-down`, remembering its directory and port in .cache/lake/postgres.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType

from tests.support.wait import free_port, poll

__all__ = ["PostgresCluster", "postgres_bin", "lake_url"]

STATE_DIR = Path(".cache/lake")
STATE_FILE = STATE_DIR / "postgres.json"
_DATABASE = "skyfill"


def postgres_bin() -> Path:
    """The directory of initdb/pg_ctl/pg_isready: the newest /usr/lib/postgresql/N/bin, else PATH."""
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        versions = sorted((p for p in root.iterdir() if (p / "bin" / "initdb").exists()),
                          key=lambda p: int(p.name) if p.name.isdigit() else 0)
        if versions:
            return versions[-1] / "bin"
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise FileNotFoundError("PostgreSQL not found (initdb): install the Debian package postgresql")


def lake_url(dsn: str) -> str:
    """The `--db` value of a lake whose catalog is the Postgres database `dsn`."""
    return f"ducklake:postgres:{dsn}"


def _as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


class PostgresCluster:
    """One PostgreSQL server on 127.0.0.1, its data in `directory` (a temp dir when None)."""

    def __init__(self, directory: Path | None = None, *, port: int | None = None, running: bool = False) -> None:
        self._owned = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="skyfill-pg-")).resolve()
        self.port = port or free_port()
        self._bin = postgres_bin()
        self._started = running  # running: a server an earlier process started here (stop() stops it)

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def dsn_of(self, database: str = _DATABASE) -> str:
        return f"dbname={database} host=127.0.0.1 port={self.port} user=postgres"

    @property
    def dsn(self) -> str:
        return self.dsn_of()

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*_as_postgres(), *args], capture_output=True, text=True, check=False)

    def _check(self, *args: str) -> None:
        done = self._run(*args)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {done.stderr or done.stdout}")

    def start(self, timeout: float = 60.0) -> PostgresCluster:
        self.directory.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
        if not (self.data / "PG_VERSION").exists():
            self._check(str(self._bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                        "--encoding=UTF8", "--no-sync")
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.data} "
                   "-c fsync=off -c max_connections=200")
        # -W: pg_ctl does not wait; readiness is polled with pg_isready below
        self._check(str(self._bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.directory / "postgres.log"),
                    "-o", options, "-W", "start")
        self._started = True
        poll(self.ready, timeout=timeout, what=f"PostgreSQL on 127.0.0.1:{self.port}", interval=0.1)
        self.create_database(_DATABASE)
        return self

    def ready(self) -> bool:
        return self._run(str(self._bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)).returncode == 0

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = self._run(str(self._bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                         "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database, "-c", sql)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr}")
        return done.stdout

    def create_database(self, name: str) -> str:
        """An empty database `name` (created if missing); returns its DSN."""
        if not self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip():
            self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn_of(name)

    def stop(self) -> None:
        if self._started:
            self._run(str(self._bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            self._started = False
        if self._owned:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _up() -> int:
    if STATE_FILE.exists():
        state = json.loads(STATE_FILE.read_text())
        cluster = PostgresCluster(Path(state["directory"]), port=int(state["port"]))
        if cluster.ready():
            print(lake_url(cluster.dsn))
            return 0
    else:
        state = {}
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    cluster = PostgresCluster(STATE_DIR / "postgres", port=int(state.get("port") or free_port())).start()
    STATE_FILE.write_text(json.dumps({"directory": str(cluster.directory), "port": cluster.port}))
    print(lake_url(cluster.dsn), "--data-path", str((STATE_DIR / "data").resolve()))
    return 0


def _down() -> int:
    if not STATE_FILE.exists():
        print("no PostgreSQL recorded in", STATE_FILE)
        return 0
    state = json.loads(STATE_FILE.read_text())
    PostgresCluster(Path(state["directory"]), port=int(state["port"]), running=True).stop()  # its data stays
    STATE_FILE.unlink()
    print(f"stopped PostgreSQL on 127.0.0.1:{state['port']} (data kept in {state['directory']})")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("up", "down"):
        print("usage: python -m tests.support.postgres up|down", file=sys.stderr)
        return 2
    return _up() if argv[0] == "up" else _down()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
