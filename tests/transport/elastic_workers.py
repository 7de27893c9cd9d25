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
    try:
        out = group.all_reduce(torch.full((4,), float(rank + 1)), op="sum").wait()
    finally:
        if crash:  # (the other rank may see this one gone before its last chunk arrived)
            kill_self()
    group.close()
    return float(out[0])


def elastic_train(rank: int, world: int, coord: str, name: str, steps: int, H: int, pause: float,
                  marks: str) -> dict:
    """The same script for a first start and a restart: DiLoCo over a drop-mode group."""
    import os
    import time

    from lowband.transport._join import fingerprint

    group = lowband.init_group(rank, world, store=coord, backend="zmq", group_name=name, on_failure="drop",
                               peer_timeout=10.0, init_timeout=60)
    torch.manual_seed(rank)  # every process starts from other weights: the start (or a heal) equalises them
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = lowband.DiLoCo(torch.optim.AdamW(model.parameters(), lr=1e-2), group=group, sync_every=H)
    joined = group.joined_at is not None
    first = None
    while opt.step_count < steps:
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(rank * 100_000 + opt.step_count))
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), x[:, :1].sin()).backward()
        opt.step()
        if first is None:
            first = opt.step_count  # on a joiner: the members' count when it was let in
            open(os.path.join(marks, f"rank{rank}"), "w").close()  # this rank trains
        time.sleep(pause)
    opt.flush()
    out = {"fp": fingerprint(opt._global), "joined": joined, "first": first, "step": opt.step_count,
           "participants": group.participants}
    group.close()
    return out


def through_coordinator_restart(rank: int, world: int, coord: str, name: str, rounds: int) -> object:
    """Drop-mode all-reduces, one every 0.1 s, while the test restarts (or ends) the coordinator."""
    import time

    group = lowband.init_group(rank, world, store=coord, backend="zmq", group_name=name, on_failure="drop",
                               peer_timeout=3.0, init_timeout=40)
    try:
        for i in range(rounds):
            out = group.all_reduce(torch.full((4,), float(rank + i)), op="sum").wait()
            assert float(out[0]) == sum(r + i for r in range(world)), out
            time.sleep(0.1)
        return group.participants
    except Exception as e:  # the test reads the message
        return f"{type(e).__name__}: {e}"
    finally:
        group.close()
