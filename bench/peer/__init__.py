"""@atproto/sync, the reference TypeScript firehose consumer, as a benchmark peer.

The pinned npm package (package.json + package-lock.json here) is installed into
`.cache/sync-peer/` by `python -m bench.peer install` (`make bench-peer-install`, run by
`make bench` and `make test`) through the PDS network's installer, so it runs on the same
Node 22. `peer.mjs` is the driver; `bench/parts/peer.py` runs it next to skyfill.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tests.support.network import install_package, package_installed
from tests.support.network import installed as network_installed

__all__ = ["PeerInstall", "install", "installed", "PACKAGE_DIR", "CACHE_DIR", "SCRIPT"]

PACKAGE_DIR: Final = Path(__file__).resolve().parent
CACHE_DIR: Final = PACKAGE_DIR.parents[1] / ".cache" / "sync-peer"
SCRIPT: Final = "peer.mjs"


@dataclass(frozen=True, slots=True)
class PeerInstall:
    node: Path    # Node 22, the PDS network's
    script: Path  # peer.mjs, next to its node_modules


def installed(*, root: Path = CACHE_DIR) -> PeerInstall | None:
    """The install at `root` if it is complete and matches the pinned manifests (no side effects)."""
    network = network_installed()
    if network is None or not package_installed(PACKAGE_DIR, root) or not (root / SCRIPT).exists():
        return None
    return PeerInstall(node=network.node, script=root / SCRIPT)


def install(*, root: Path = CACHE_DIR, force: bool = False) -> PeerInstall:
    """Install (or confirm) the peer under `root`; refreshes peer.mjs; fast when already done."""
    network = install_package(PACKAGE_DIR, root, files=(SCRIPT,), force=force)
    return PeerInstall(node=network.node, script=root / SCRIPT)
