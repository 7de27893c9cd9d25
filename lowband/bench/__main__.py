"""``python -m lowband.bench``: the same as ``lowband bench``."""

import sys

from lowband.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
