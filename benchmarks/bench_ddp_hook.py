"""DDP step time: the lowband comm hook (q8, over a ZeroMQ group) against DDP's default hook.

    python benchmarks/bench_ddp_hook.py [--width 2048] [--layers 8] [--batch 256] [--steps 8]
                                        [--codec q8] [--bucket-mb 25] [--repeat 3]

Two processes on this machine; DDP's process group is gloo in both arms. The model is an MLP
of ``--layers`` square ``--width`` x ``--width`` linear layers (default: 8 x 2048^2 = 33.6M
parameters, 128 MiB of fp32 gradients, so about five 25 MiB buckets: each bucket's
communication can overlap the backward pass of the layers before it). One arm: DDP with its
default (gloo all-reduce) hook. The other: DDP with ``lowband.optim.ddp_comm_hook(group,
codec)`` over a ``lowband.init_group(backend="zmq")`` group on loopback, whose future the
transport completes. Arms alternate round by round (``--repeat`` rounds of ``--steps`` timed
steps after two warm-up steps); the best mean step time of each is reported, with the ratio
lowband / default. Every step, both ranks' gradients are hashed: they must be identical.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _worker(rank: int, store: str, coord: str, args: argparse.Namespace, q: Any) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import lowband
    from lowband.optim import ddp_comm_hook

    host, port = store.rsplit(":", 1)
    tcp = dist.TCPStore(host, int(port), None, False, datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=tcp, rank=rank, world_size=2)
    group = lowband.init_group(rank, 2, store=coord, backend="zmq", group_name="bench-ddp", peer_timeout=120)
    try:
        def model() -> torch.nn.Module:
            torch.manual_seed(0)
            layers: list[torch.nn.Module] = []
            for _ in range(args.layers):
                layers += [torch.nn.Linear(args.width, args.width), torch.nn.ReLU()]
            return torch.nn.Sequential(*layers)

        arms = {}
        for arm in ("default", "lowband"):
            ddp = DistributedDataParallel(model(), bucket_cap_mb=args.bucket_mb)
            if arm == "lowband":
                ddp.register_comm_hook(None, ddp_comm_hook(group, args.codec))
            arms[arm] = (ddp, torch.optim.SGD(ddp.parameters(), lr=1e-3))
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(args.batch, args.width, generator=g)

        def step(arm: str) -> str:
            ddp, opt = arms[arm]
            opt.zero_grad()
            ddp(x).square().mean().backward()
            h = hashlib.sha256()
            for p in ddp.parameters():
                h.update(p.grad.numpy().tobytes())
            opt.step()
            return h.hexdigest()

        for arm in arms:
            for _ in range(2):
                step(arm)
        for k in range(args.repeat):
            for arm in arms:
                dist.barrier()
                hashes = []
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    hashes.append(step(arm))
                q.put((k, arm, rank, (time.perf_counter() - t0) / args.steps, hashes))
    finally:
        group.close()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--codec", default="q8")
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    args = ap.parse_args(argv)
    from lowband.testing import start_store
    from lowband.transport.coordinator import start_coordinator

    n = args.layers * (args.width * args.width + args.width)
    print(f"DDP, 2 gloo processes, MLP {args.layers} x {args.width}^2 ({n / 1e6:.1f}M params, "
          f"{n * 4 / 2**20:.0f} MiB of gradients), batch {args.batch}, buckets {args.bucket_mb} MB, "
          f"lowband hook codec {args.codec}")
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    store, addr = start_store()
    best = {"default": float("inf"), "lowband": float("inf")}
    identical = True
    with start_coordinator() as co:
        procs = [ctx.Process(target=_worker, args=(r, addr, co.address, args, q)) for r in range(2)]
        for p in procs:
            p.start()
        try:
            rows: dict[tuple[int, str], list[Any]] = {}
            for _ in range(2 * 2 * args.repeat):
                k, arm, rank, t, hashes = q.get(timeout=1800)
                rows.setdefault((k, arm), []).append((t, hashes))
            for (k, arm), got in sorted(rows.items()):
                t = max(r[0] for r in got)
                same = got[0][1] == got[1][1]
                identical &= same
                best[arm] = min(best[arm], t)
                print(f"  round {k} {arm:8s} {t * 1e3:8.1f} ms/step (grads identical across ranks: {same})")
        finally:
            for p in procs:
                p.join(120)
                if p.is_alive():
                    p.kill()
    del store
    print(f"best: default {best['default'] * 1e3:.1f} ms/step, lowband {best['lowband'] * 1e3:.1f} ms/step, "
          f"ratio {best['lowband'] / best['default']:.2f}x; gradients identical across ranks: {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
