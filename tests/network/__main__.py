"""`python -m tests.network install` installs the pinned PDS + PLC; `... up` runs one until Ctrl-C."""

from __future__ import annotations

import sys

from tests.network._cli import main

sys.exit(main(sys.argv[1:]))
