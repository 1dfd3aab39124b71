"""`python -m tests.support.network install` installs the pinned PDS + PLC; `... up` runs one until Ctrl-C."""

from __future__ import annotations

import sys

from tests.support.network._cli import main

sys.exit(main(sys.argv[1:]))
