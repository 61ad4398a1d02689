"""``python -m fmsring.bench``: the benchmark's command line; the code is :mod:`fmsring.harness.bench`."""

import sys

from fmsring.allocator import configure_allocator
from fmsring.harness.bench import main

if __name__ == "__main__":
    configure_allocator()
    sys.exit(main())
