"""A real local atproto network for tests and demos: the reference PDS (`@atproto/pds`) and an
in-memory PLC directory (`@did-plc/server`) on 127.0.0.1, run by Node 22 from npm packages
installed into `.cache/pds-network/` (`python -m tests.support.network install`, done by `make test`).

From a script (the install step runs first if needed):

    python -c "
    from tests.support.network import LocalNetwork, post_record
    with LocalNetwork() as net, net.client() as c:
        alice = c.create_account('alice.test')
        ref = c.create_record(alice, 'app.bsky.feed.post', post_record('hello'))
        print(net.pds_url, alice.did, ref.uri, len(c.get_repo(alice.did)))
    "

`python -m tests.support.network up` runs one in the foreground and prints its URLs until Ctrl-C.
"""

from tests.support.network._client import (
    Commit,
    Create,
    Delete,
    PdsAccount,
    PdsClient,
    RecordRef,
    Update,
    Write,
    XrpcError,
    like_record,
    now_iso,
    post_record,
)
from tests.support.network._install import NetworkInstall, install, install_package, installed, package_installed
from tests.support.network._network import LocalNetwork, LocalPds, NetworkStartError

__all__ = [
    "Commit",
    "Create",
    "Delete",
    "LocalNetwork",
    "LocalPds",
    "NetworkInstall",
    "NetworkStartError",
    "PdsAccount",
    "PdsClient",
    "RecordRef",
    "Update",
    "Write",
    "XrpcError",
    "install",
    "install_package",
    "installed",
    "like_record",
    "now_iso",
    "package_installed",
    "post_record",
]
