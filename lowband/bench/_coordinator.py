"""``python -m lowband.bench._coordinator --bind HOST:PORT``: the bench's coordinator.

The ``lowband coordinator`` command, with the exposure warning for its emulated hub
address left to the launcher's one note (:mod:`lowband.bench._curve_note`).
"""

from __future__ import annotations

import sys

from lowband.bench._curve_note import quiet_emulated_binds
from lowband.transport.coordinator import main


def _bind_host(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--bind" and i + 1 < len(argv):
            return argv[i + 1].rpartition(":")[0]
        if a.startswith("--bind="):
            return a[len("--bind=") :].rpartition(":")[0]
    return None


if __name__ == "__main__":
    host = _bind_host(sys.argv[1:])
    if host:
        quiet_emulated_binds(host)
    sys.exit(main(sys.argv[1:]))
