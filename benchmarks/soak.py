"""Soak: DiLoCo training over the ZeroMQ group under seeded faults (issues 9 and 16).

    python benchmarks/soak.py --minutes 10 --world 8      # the issue's figure (about 25 min)
    python benchmarks/soak.py --minutes 1 --world 4        # a short run (about 4 min)

The engine is :mod:`lowband.bench.soak` (its docstring says what runs and what is printed).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from lowband.bench.soak import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
