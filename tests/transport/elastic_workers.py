"""Worker functions for tests/transport/test_elastic.py (module level, so spawned processes
can import them)."""

from __future__ import annotations

import torch

import lowband
from lowband.testing import kill_self


def one_run(rank: int, world: int, coord: str, name: str, crash: bool) -> float:
    """Join, all-reduce once, then close (or die with SIGKILL, leaving the run behind)."""
    group = lowband.init_group(rank, world, store=coord, backend="zmq", group_name=name,
                               init_timeout=40, peer_timeout=5.0)
    out = group.all_reduce(torch.full((4,), float(rank + 1)), op="sum").wait()
    if crash:
        kill_self()
    group.close()
    return float(out[0])
