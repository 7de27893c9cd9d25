"""How many cases each fuzz test runs: 2,000 in the normal suite.

The long run (issue 9): ``LOWBAND_FUZZ_EXAMPLES=100000 python -m pytest tests/fuzz -p no:cacheprovider``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

FUZZ_EXAMPLES = int(os.environ.get("LOWBAND_FUZZ_EXAMPLES", "2000"))

#: Settings for every fuzz test: no deadline (the machine is shared), no database writes.
fuzz_settings = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
