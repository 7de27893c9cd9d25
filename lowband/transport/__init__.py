"""Transport: groups, collectives and byte counters (DESIGN.md, "Layers").

``init_group`` builds a :class:`Group` over a Carrier (ZeroMQ, torch.distributed,
or in-process for tests); the collectives are in ``group.py`` / ``_collectives.py``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lowband.transport._carrier import Carrier, Key
from lowband.transport._stats import CommStats, PeerStats

if TYPE_CHECKING:  # pragma: no cover
    from lowband.transport._init import init_group
    from lowband.transport._start import agree_on_start
    from lowband.transport.coordinator import start_coordinator
    from lowband.transport.group import Group, Work
    from lowband.transport.security import Curve

__all__ = [
    "Carrier", "CommStats", "Curve", "Group", "Key", "PeerStats", "Work", "agree_on_start", "init_group",
    "start_coordinator",
]

# Loaded on first use, so that the coordinator process and `lowband keys` do not import torch.
_LAZY = {
    "Group": "lowband.transport.group",
    "Work": "lowband.transport.group",
    "init_group": "lowband.transport._init",
    "agree_on_start": "lowband.transport._start",
    "Curve": "lowband.transport.security",
    "start_coordinator": "lowband.transport.coordinator",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lowband.transport' has no attribute {name!r}")
