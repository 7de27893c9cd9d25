"""Transport: groups, collectives and byte counters (DESIGN.md, "Layers").

``init_group`` builds a :class:`Group` over a Carrier (ZeroMQ, torch.distributed,
or in-process for tests); the collectives are in ``group.py`` / ``_collectives.py``.
"""

from __future__ import annotations

from typing import Any

from lowband.transport._carrier import Carrier, Key
from lowband.transport._stats import CommStats, PeerStats
from lowband.transport.group import Group, Work

__all__ = ["Carrier", "CommStats", "Group", "Key", "PeerStats", "Work", "init_group"]


def __getattr__(name: str) -> Any:
    if name == "init_group":
        from lowband.transport._init import init_group

        return init_group
    raise AttributeError(f"module 'lowband.transport' has no attribute {name!r}")
