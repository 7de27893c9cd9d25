"""Functions that run in the spawned worker processes of the DeMo multi-process tests."""

from __future__ import annotations

from typing import Any

import torch
from _demo_util import batch, make_mlp, train_step

import lowband


def _held_out_loss(model: torch.nn.Module) -> float:
    x, y = batch(99, 0)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), y))


def train_demo(
    rank: int, world: int, store: str, backend: str, name: str, steps: int, overlap: bool
) -> dict[str, Any]:
    torch.set_num_threads(1)
    group = lowband.init_group(
        rank, world, store=store, backend=backend, group_name=name, peer_timeout=60.0
    )
    try:
        model = make_mlp()
        opt = lowband.DeMo(model.parameters(), lr=3e-3, group=group, topk=8, overlap=overlap)
        start = _held_out_loss(model)
        for t in range(steps):
            train_step(model, opt, rank, t)
        opt.state_dict()  # finishes the exchange still in flight (overlap)
        return {
            "start": start,
            "end": _held_out_loss(model),
            "params": [p.detach().clone() for p in model.parameters()],
            "syncs": opt.stats.syncs,
            "bytes_sent": opt.stats.bytes_sent,
            "group_bytes_sent": group.stats.bytes_sent,
        }
    finally:
        group.close()
