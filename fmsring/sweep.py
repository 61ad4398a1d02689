"""``python -m fmsring.sweep``: the sweep's command line; the code is :mod:`fmsring.harness.sweep`."""

import sys

from fmsring.harness.sweep import main

if __name__ == "__main__":
    sys.exit(main())
