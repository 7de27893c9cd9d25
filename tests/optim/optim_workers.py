"""Functions that run in the spawned worker processes of the multi-process tests."""

from __future__ import annotations

import datetime
from typing import Any

import torch

import lowband
from lowband.optim import CompressedGradients, DiLoCo, ddp_comm_hook, sparseloco


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(32, 8, generator=g)
    w = torch.linspace(-1, 1, 32).view(8, 4)  # the same target map on every peer
    return x, torch.tanh(x @ w)


def _held_out_loss(model: torch.nn.Module) -> float:
    x, y = _batch(99, 0)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), y))


def train(
    rank: int,
    world: int,
    store: str,
    backend: str,
    name: str,
    method: str,
    steps: int,
) -> dict[str, Any]:
    group = lowband.init_group(
        rank, world, store=store, backend=backend, group_name=name, peer_timeout=60.0
    )
    try:
        model = _model()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if method == "diloco":
            opt: Any = DiLoCo(inner, group=group, sync_every=10, codec="q4")
        elif method == "sparseloco":
            opt = sparseloco(inner, group=group, sync_every=10)
        elif method == "streaming":
            opt = DiLoCo(inner, group=group, sync_every=12, fragments=2, overlap=1, codec="q8")
        else:
            opt = CompressedGradients(inner, group=group, codec="q4")
        start = _held_out_loss(model)
        for t in range(steps):
            x, y = _batch(rank, t)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return {
            "start": start,
            "end": _held_out_loss(model),
            "params": [p.detach().clone() for p in model.parameters()],
            "syncs": opt.stats.syncs,
            "bytes_sent": opt.stats.bytes_sent,
        }
    finally:
        group.close()  # waits until the peers have what was sent to them


def ddp_train(
    rank: int, world: int, store: str, name: str, over: str, steps: int
) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    host, port = store.rsplit(":", 1)
    tcp = dist.TCPStore(host, int(port), None, False, datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=dist.PrefixStore(name, tcp), rank=rank, world_size=world)
    group = None
    try:
        if over == "lowband":
            group = lowband.init_group(
                rank, world, store=store, backend="torch", group_name=name + "-lb"
            )
        model = _model()
        ddp = DistributedDataParallel(model)
        hook = ddp_comm_hook(group if group is not None else dist.group.WORLD, "q8")
        ddp.register_comm_hook(None, hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.2)
        start = _held_out_loss(model)
        for t in range(steps):
            x, y = _batch(rank, t)
            opt.zero_grad()
            torch.nn.functional.mse_loss(ddp(x), y).backward()
            opt.step()
        return {
            "start": start,
            "end": _held_out_loss(model),
            "params": [p.detach().clone() for p in model.parameters()],
            "syncs": hook.stats.syncs,
            "bytes_sent": hook.stats.bytes_sent,
            "residual_keys": len(hook.error_feedback.residuals),
        }
    finally:
        if group is not None:
            group.close()
        dist.destroy_process_group()


def ddp_overlap_train(
    rank: int, world: int, store: str, coordinator: str, name: str, wait_in_hook: bool, steps: int
) -> dict[str, Any]:
    """DDP (gloo) whose buckets go through the lowband hook over a ZeroMQ group (issue 17.3).

    Small buckets, so several are in flight during one backward pass. ``wait_in_hook``
    waits on each bucket's future inside the hook (the old, sequential behaviour): the
    parameters must come out bit-identical to the overlapped run, since the same
    collectives and error-feedback updates happen in the same order."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    host, port = store.rsplit(":", 1)
    tcp = dist.TCPStore(host, int(port), None, False, datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=dist.PrefixStore(name, tcp), rank=rank, world_size=world)
    group = lowband.init_group(rank, world, store=coordinator, backend="zmq", group_name=name + "-lb")
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(6)), torch.nn.Linear(64, 4))
        ddp = DistributedDataParallel(model, bucket_cap_mb=0.02)
        hook = ddp_comm_hook(group, "q8")
        pending: list[bool] = []

        def run_hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks real annotations only
            fut = hook(state, bucket)
            pending.append(not fut.done())
            if wait_in_hook:
                fut.wait()
            return fut

        run_hook.__name__ = run_hook.__qualname__ = "lowband_ddp_comm_hook"
        ddp.register_comm_hook(None, run_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        grads = []
        for t in range(steps):
            g = torch.Generator().manual_seed(1000 * rank + t)
            x = torch.randn(16, 64, generator=g)
            opt.zero_grad()
            ddp(x).pow(2).mean().backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
            opt.step()
        return {
            "params": [p.detach().clone() for p in model.parameters()],
            "grads": grads,
            "buckets": len(pending),
            "pending": sum(pending),
            "residual_keys": len(hook.error_feedback.residuals),
        }
    finally:
        group.close()
        dist.destroy_process_group()
