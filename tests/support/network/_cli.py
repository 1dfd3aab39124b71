"""`python -m tests.support.network install|up`."""

from __future__ import annotations

import json
import signal
import threading

from tests.support.network._install import main_install
from tests.support.network._network import LocalNetwork

_USAGE = """usage: python -m tests.support.network COMMAND
  install   install the pinned PDS + PLC + Node 22 into .cache/pds-network (idempotent)
  up [N]    run a fresh network (N PDSes on one PLC, default 1) in the foreground; prints its URLs
            as JSON; Ctrl-C stops it"""


def _up(pds_count: int = 1) -> int:
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with LocalNetwork(pds_count=pds_count) as net:
        info = {
            "pds_url": net.pds_url,
            "pds_urls": [pds.url for pds in net.pdses],
            "plc_url": net.plc_url,
            "admin_password": net.admin_password,
            "firehose": f"{net.pds_ws_url}/xrpc/com.atproto.sync.subscribeRepos?cursor=0",
            "start_seconds": round(net.start_seconds or 0.0, 2),
        }
        print(json.dumps(info), flush=True)
        try:
            done.wait()
        except KeyboardInterrupt:
            pass
    return 0


def main(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    if command == "install":
        return main_install()
    if command == "up":
        if len(argv) > 1 and not argv[1].isdigit():
            print(_USAGE)
            return 2
        return _up(int(argv[1]) if len(argv) > 1 else 1)
    print(_USAGE)
    return 2
