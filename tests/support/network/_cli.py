"""`python -m tests.support.network install|up`."""

from __future__ import annotations

import json
import signal
import threading

from tests.support.network._install import main_install
from tests.support.network._network import LocalNetwork

_USAGE = """usage: python -m tests.support.network COMMAND
  install   install the pinned PDS + PLC + Node 22 into .cache/pds-network (idempotent)
  up        run a fresh network in the foreground; prints its URLs as JSON; Ctrl-C stops it"""


def _up() -> int:
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with LocalNetwork() as net:
        info = {
            "pds_url": net.pds_url,
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
        return _up()
    print(_USAGE)
    return 2
