"""``python -m fmsring.bench``: the benchmark's command line; the code is :mod:`fmsring.harness.bench`."""

import sys

from fmsring.harness.bench import main

if __name__ == "__main__":
    sys.exit(main())
