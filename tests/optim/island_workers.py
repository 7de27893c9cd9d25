"""Workers of tests/optim/test_islands.py: islands of gloo processes (FSDP2, DDP or a plain
model inside each) joined by lowband, and the flat run (one replica per thread) they must equal."""

from __future__ import annotations

import datetime
import io
import threading
import time
from typing import Any

import torch

import lowband
from lowband.optim import CompressedGradients, DiLoCo


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 31 and 5 rows: FSDP2's dim-0 shards are uneven on 2 ranks (16 + 15, 3 + 2)
    return torch.nn.Sequential(torch.nn.Linear(8, 31), torch.nn.Tanh(), torch.nn.Linear(31, 5))


def batch(replica: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replica ``replica``'s batch at ``step`` (the same for a flat peer and an island)."""
    g = torch.Generator().manual_seed(1000 * replica + step)
    x = torch.randn(16, 8, generator=g)
    return x, torch.tanh(x @ torch.linspace(-1, 1, 40).view(8, 5))


def build_optimizer(method: str, params: Any, group: Any, codec: Any) -> Any:
    if method == "demo":
        return lowband.DeMo(params, lr=1e-2, group=group, topk=4, chunk=8, overlap=True)
    inner = torch.optim.AdamW(params, lr=1e-2)
    if method == "compressed":
        return CompressedGradients(inner, group=group, codec=codec)
    if method == "sparseloco":
        from lowband.optim import sparseloco

        return sparseloco(inner, group=group, sync_every=3, codec="topk:k=8,tile=64+q2")
    if method == "streaming":
        return DiLoCo(inner, group=group, sync_every=4, fragments=2, overlap=1, codec=codec)
    return DiLoCo(inner, group=group, sync_every=3, codec=codec)


def train_steps(net: torch.nn.Module, opt: Any, replica: int, steps: range, part: tuple[int, int] | None) -> None:
    for t in steps:
        x, y = batch(replica, t)
        if part is not None:  # this rank's share of its island's batch
            x, y = x.chunk(part[1])[part[0]], y.chunk(part[1])[part[0]]
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()


_init_lock = threading.Lock()
#: payload bytes each flat rank's optimizer sent in the last flat run (by rank)
flat_bytes: dict[int, int] = {}


def flat(group: Any, method: str, steps: int, codec: Any) -> list[torch.Tensor]:
    """One whole replica per rank of a plain lowband group (a ThreadGroup: one thread each)."""
    torch.set_num_threads(1)
    with _init_lock:  # model() seeds torch's global generator: one thread at a time
        net = model()
    opt = build_optimizer(method, net.parameters(), group, codec)
    train_steps(net, opt, group.rank, range(steps), None)
    flat_bytes[group.rank] = opt.stats.bytes_sent
    return [p.detach().clone() for p in net.parameters()]


def _locate(rank: int, sizes: list[int]) -> tuple[int, int]:
    for k, n in enumerate(sizes):
        if rank < n:
            return k, rank
        rank -= n
    raise ValueError(rank)


def _full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def island(
    rank: int,
    world: int,
    sizes: list[int],
    store: str,
    coordinator: str,
    name: str,
    *,
    wrap: list[str],
    method: str = "diloco",
    steps: int = 9,
    codec: Any = None,
    split: bool = False,
    resume_at: int | None = None,
    die: int | None = None,
    on_failure: str = "raise",
) -> dict[str, Any]:
    """One rank of island ``k``: ``wrap[k]`` is "fsdp", "ddp" or "plain" for island k.

    ``split``: the island's batch is cut between its ranks (else each rank sees all of it,
    so the island's averaged gradient is bit-identical to one process's).
    ``resume_at``: also save at that step, rebuild everything, load and finish again.
    ``die``: island ``die`` kills itself after its first sync (the others continue).
    """
    import torch.distributed as dist

    torch.set_num_threads(1)
    k, local = _locate(rank, sizes)
    L = sizes[k]
    host, port = store.rsplit(":", 1)
    tcp = dist.TCPStore(host, int(port), None, False, datetime.timedelta(seconds=60))
    dist.init_process_group(
        "gloo", store=dist.PrefixStore(f"{name}/island{k}", tcp), rank=local, world_size=L
    )
    group = None
    try:
        group = lowband.init_group(
            island=dist.group.WORLD, island_id=k, islands=len(sizes), store=coordinator,
            group_name=name, peer_timeout=5.0 if die is not None else 60.0, on_failure=on_failure,
        )

        def build() -> tuple[torch.nn.Module, Any]:
            net = model()
            if wrap[k] in ("fsdp", "hsdp"):
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard

                # hsdp: 2 replicas of 2 shards each (placements Replicate, Shard(0))
                shape = (L // 2, 2) if wrap[k] == "hsdp" else (L,)
                mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard")[-len(shape):])
                for layer in (net[0], net[2]):
                    fully_shard(layer, mesh=mesh)
                fully_shard(net, mesh=mesh)
            elif wrap[k] == "ddp":
                net = torch.nn.parallel.DistributedDataParallel(net)
            return net, build_optimizer(method, net.parameters(), group, codec)

        net, opt = build()
        part = (local, L) if split else None
        out: dict[str, Any] = {"island": k, "local": local}
        if die is not None:
            train_steps(net, opt, k, range(3), part)
            if k == die:
                from lowband.testing import kill_self

                kill_self()
            train_steps(net, opt, k, range(3, steps), part)
        elif resume_at is None:
            train_steps(net, opt, k, range(steps), part)
        else:
            train_steps(net, opt, k, range(resume_at), part)
            saved = io.BytesIO()
            torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, saved)
            train_steps(net, opt, k, range(resume_at, steps), part)
            out["straight"] = [_full(p) for p in net.parameters()]
            net, opt = build()
            saved.seek(0)
            ckpt = torch.load(saved, weights_only=False)
            net.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            train_steps(net, opt, k, range(resume_at, steps), part)
        out["params"] = [_full(p) for p in net.parameters()]
        st = opt.stats
        out.update(bytes_sent=st.bytes_sent, syncs=st.syncs, flows=st.flows,
                   island_flows=group.island_flows,
                   outer_bytes=sum(g.numel() * 4 for g in getattr(opt, "_global", [])))
        return out
    finally:
        if group is not None:
            group.close()  # waits until the peers have what was sent to them
        dist.destroy_process_group()


def _touch(path: str) -> None:
    with open(path, "w"):
        pass


def _wait_waiting(coordinator: str, flows: dict[str, Any], island_id: int, timeout: float = 90.0) -> None:
    """Until island ``island_id`` waits to join every flow of ``flows`` (coordinator status),
    or is in (admitted at an earlier sync: a quick restart can be let in at the very sync
    that dropped its old incarnation)."""
    import zmq

    from lowband.transport._coord_client import CoordinatorClient

    ctx = zmq.Context()
    client = CoordinatorClient(ctx, coordinator)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(island_id in g.participants for g in flows.values()):
                return
            reps = [client.ask({"op": "status", "group": f}, timeout=5.0) for f in flows]
            if all(r is not None and island_id in r.get("waiting", ()) for r in reps):
                return
            time.sleep(0.05)
        raise TimeoutError(f"island {island_id} did not wait on {flows} within {timeout}s")
    finally:
        client.close()
        ctx.term()


#: elastic_island's schedule: DiLoCo syncs every H steps; the victim island blocks (to be
#: SIGKILLed) before step KILL_AT, the survivors hold at WAIT_AT until it waits again
H, KILL_AT, WAIT_AT = 3, 4, 7


def elastic_island(
    rank: int, world: int, sizes: list[int], store: str, coordinator: str, name: str,
    steps: int, victim: int, on_failure: str, out: str,
) -> dict[str, Any]:
    """One rank of islands ``sizes`` (DDP inside an island of 2, a plain model in one of 1)
    under DiLoCo, run by :class:`lowband.testing.Launcher`: the same function at a first
    start and at a restart. The ranks of island ``victim`` (first incarnation) stop before
    step KILL_AT and tell the test (a file each), which SIGKILLs them all. In drop mode the
    survivors hold at step WAIT_AT until the restarted island waits on all their flows
    (so the test does not depend on how fast a restart is), then train on: it is admitted
    after the next sync. Returns the canonical buckets' fingerprints after each sync."""
    import hashlib
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    if os.environ.get("LOWBAND_TEST_LOG"):
        import logging

        logging.basicConfig(level=logging.INFO, format=f"%(relativeCreated)d r{rank} %(name)s: %(message)s")
    k, local = _locate(rank, sizes)
    L = sizes[k]
    host, port = store.rsplit(":", 1)
    tcp = dist.TCPStore(host, int(port), None, False, datetime.timedelta(seconds=60))
    # torchrun's restart count: each incarnation of the island has its own gloo rendezvous
    attempt = (tcp.add(f"{name}/starts{k}", 1) - 1) // L
    dist.init_process_group(
        "gloo", store=dist.PrefixStore(f"{name}/island{k}/{attempt}", tcp), rank=local, world_size=L
    )
    group = None
    try:
        group = lowband.init_group(
            island=dist.group.WORLD, island_id=k, islands=len(sizes), store=coordinator,
            group_name=name, peer_timeout=20.0, on_failure=on_failure,
        )
        joined = group.joined_at is not None
        net = model()
        if L > 1:
            net = torch.nn.parallel.DistributedDataParallel(net)
        opt = DiLoCo(torch.optim.AdamW(net.parameters(), lr=1e-2), group=group, sync_every=H)
        fps: dict[int, dict[int, str]] = {}
        first_step = opt.step_count
        while opt.step_count < steps:
            t = opt.step_count
            if k == victim and attempt == 0 and t == KILL_AT:
                _touch(os.path.join(out, f"doomed{rank}"))
                time.sleep(600)  # SIGKILLed here, between two syncs
            if k != victim and on_failure == "drop" and t == WAIT_AT:
                _wait_waiting(coordinator, {f"{name}/seg{s}": g for s, g in group.flows.items()}, victim)
            x, y = batch(k, t)
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
            if opt.step_count % H == 0 and not opt._joining:
                fps[opt.step_count] = {
                    b.key: hashlib.sha256(opt._global[b.index].numpy().tobytes()).hexdigest()
                    for b in opt._buckets
                }
        opt.flush()
        return {
            "island": k, "local": local, "attempt": attempt, "joined": joined, "first": first_step,
            "fps": fps, "params": [_full(p) for p in (net.module if L > 1 else net).parameters()],
            "participants": [g.participants for _, g in sorted(group.flows.items())],
        }
    finally:
        if group is not None:
            group.close()  # waits until the peers have what was sent to them
        dist.destroy_process_group()
