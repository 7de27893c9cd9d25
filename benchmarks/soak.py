"""Soak: DiLoCo training over the ZeroMQ group under seeded faults (issue 9, "Done when").

    python benchmarks/soak.py --minutes 10 --seed 0 --world 8      # the issue's figure
    python benchmarks/soak.py --minutes 1 --world 4                 # a short run

The engine is :mod:`lowband.bench.soak` (its docstring says what runs and what is printed).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from lowband.bench.soak import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
