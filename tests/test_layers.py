"""The house rules of issue 10, checked on what a user installs.

`pip install .` into an empty venv must leave one import name, `skyfill`, and a working `skyfill`
command. On that installed copy import-linter checks the layers declared in pyproject.toml
(each imports only those below it; consumer, backfill and publish never import each other).
The source checks below keep the other rules: no import inside a function, no module reaching
into another object's private attributes, no package module over 400 lines.
"""

from __future__ import annotations

import ast
import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# pyproject.toml maps each of these folders to skyfill.<name>; skyfill/ is the package root.
PACKAGE_DIRS = ("skyfill", "protocol", "net", "storage", "consumer", "backfill", "publish", "app", "cli")
MAX_LINES = 400


@dataclass(frozen=True)
class Installed:
    venv: Path
    site: Path


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Iterator[Installed]:
    """`pip install --no-deps .` into a new, empty venv (the dependencies are this venv's), once
    per run: under pytest-xdist the first worker builds it and the others wait on the lock. From
    a copy of the tree: pip builds in place, and a build/ left in the checkout would carry deleted
    modules into the next wheel."""
    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent  # the run's workers share this folder
    venv = root / "installed" / "venv"
    with open(root / "installed.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "installed" / "done").exists():
            source = root / "installed" / "source"
            shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
                ".git", ".venv", ".cache", "build", "node_modules", "__pycache__", "*.egg-info", "data", "results"))
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
            done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(source)],
                                  capture_output=True, text=True, cwd=venv)
            assert done.returncode == 0, done.stderr[-3000:]
            (root / "installed" / "done").touch()
    site = Path(subprocess.check_output(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    yield Installed(venv=venv, site=site)


def _run_installed(installed: Installed, *args: str) -> subprocess.CompletedProcess[str]:
    # The installed skyfill with this venv's dependencies behind it. PYTHONPATH entries do not
    # run .pth files, so this venv's editable install of skyfill stays out of the way.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(_dependencies())}
    return subprocess.run(list(args), capture_output=True, text=True, env=env, cwd=installed.venv)


def _dependencies() -> list[str]:
    return [p for p in sys.path if p.endswith("site-packages")]


def test_pip_install_leaves_only_skyfill_importable(installed: Installed) -> None:
    names = {p.name for p in installed.site.iterdir()}
    ours = {n for n in names if n.startswith("skyfill")}
    assert {n for n in ours if not n.endswith(".dist-info")} == {"skyfill"}
    for generic in ("consumer", "backfill", "storage", "publish", "bench", "tests", "protocol", "net", "app", "cli"):
        assert generic not in names
    top = (installed.site / "skyfill-0.1.0.dist-info" / "top_level.txt")
    if top.exists():
        assert top.read_text().split() == ["skyfill"]


def test_installed_command_runs_from_the_installed_copy(installed: Installed) -> None:
    helped = _run_installed(installed, str(installed.venv / "bin" / "skyfill"), "--help")
    assert helped.returncode == 0, helped.stderr
    for command in ("consume", "backfill", "gaps", "status", "sink", "backfill-worker"):
        assert command in helped.stdout
    where = _run_installed(installed, str(installed.venv / "bin" / "python"), "-c",
                           "import skyfill.consumer.daemon as d, skyfill; print(d.__file__); print(sorted(skyfill.__all__))")
    assert where.returncode == 0, where.stderr
    assert where.stdout.splitlines()[0].startswith(str(installed.site))


def test_layers_point_one_way(installed: Installed) -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    # import-linter finds `skyfill` on PYTHONPATH first: the installed copy, whole.
    checked = subprocess.run([str(lint), str(ROOT / "pyproject.toml"), "--no-cache"],
                             capture_output=True, text=True, cwd=installed.venv,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join([str(installed.site), *_dependencies()])})
    assert checked.returncode == 0, checked.stdout[-4000:] + checked.stderr[-2000:]
    assert "Contracts: 1 kept, 0 broken" in checked.stdout


def _package_files() -> list[Path]:
    return sorted(p for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def test_no_import_inside_a_function() -> None:
    found = []
    for path in _package_files():
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                found += [f"{path.relative_to(ROOT)}:{n.lineno}" for n in ast.walk(fn)
                          if isinstance(n, ast.Import | ast.ImportFrom)]
    assert found == []


def test_no_module_touches_another_objects_private_attributes() -> None:
    found = []
    for path in _package_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert found == []


def test_no_package_module_over_400_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _package_files() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
