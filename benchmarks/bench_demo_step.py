"""Compute cost of one ``DeMo.step`` beside the forward and backward pass that feeds it.

One process, one peer (``lowband.testing.ThreadGroup(1)``: the all-gather is a local
hand-off, so what is timed is DeMo's own compute), ``torch.set_num_threads(1)`` (as a
bench worker on a shared machine). The model is ``lowband bench``'s
``base:block_size=64`` (834K parameters, 206 DCT tiles of 64 x 64). Rounds interleave:
a forward + backward pass (the baseline: it sets the gradients), then ``opt.step()``;
each is timed per round and the best and median are printed. Also timed, interleaved
in the same rounds, as a yardstick: one 2-D DCT of 206 tiles of 64 x 64.

    python benchmarks/bench_demo_step.py [--model base:block_size=64] [--batch 16] [--rounds 30]
        [--device cuda]

Also timed on the same gradients: ``torch.optim.AdamW.step`` on a twin of the model, the
step that DeMo replaces.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lowband import kernels
from lowband.bench.model import CharTransformer, model_config
from lowband.distro import DeMo
from lowband.testing import ThreadGroup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="base:block_size=64")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--overlap", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    cfg = model_config(args.model)
    model = CharTransformer(cfg).to(dev)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size), generator=g).to(dev)
    y = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size), generator=g).to(dev)
    tiles = torch.randn(206, 64, 64, generator=g).to(dev)
    # the optimizer DeMo replaces, on a copy of the same model and gradients (same device)
    twin = CharTransformer(cfg).to(dev)
    adamw = torch.optim.AdamW(twin.parameters(), lr=1e-3)

    def now() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    with ThreadGroup(1) as tg:
        opt = DeMo(
            model.parameters(),
            lr=2e-3,
            group=tg.groups[0],
            topk=8,
            chunk=64,
            decay=0.99,
            overlap=args.overlap,
        )
        times: dict[str, list[float]] = {
            "fwd+bwd": [],
            "DeMo.step": [],
            "AdamW.step": [],
            "dct 206x64x64": [],
        }
        for r in range(args.rounds + 2):  # two warm-up rounds
            t0 = now()
            opt.zero_grad(set_to_none=False)
            _, loss = model(x, y)
            loss.backward()
            t1 = now()
            opt.step()
            t2 = now()
            for p, q in zip(model.parameters(), twin.parameters()):
                q.grad = p.grad
            t3 = now()
            adamw.step()
            t4 = now()
            kernels.dct_tiles(tiles)
            t5 = now()
            if r >= 2:
                times["fwd+bwd"].append(t1 - t0)
                times["DeMo.step"].append(t2 - t1)
                times["AdamW.step"].append(t4 - t3)
                times["dct 206x64x64"].append(t5 - t4)
        opt.flush()

    n = sum(p.numel() for p in model.parameters())
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{args.threads} thread(s)"
    print(
        f"model {args.model} ({n:,} params), batch {args.batch}, {where}, "
        f"overlap={args.overlap}, {args.rounds} rounds"
    )
    print(f"{'':16s} {'best ms':>9s} {'median ms':>10s}")
    for k, v in times.items():
        print(f"{k:16s} {1e3 * min(v):9.2f} {1e3 * statistics.median(v):10.2f}")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"DeMo.step / fwd+bwd (medians): {med['DeMo.step'] / med['fwd+bwd']:.3f}")
    print(f"DeMo.step / AdamW.step (medians): {med['DeMo.step'] / med['AdamW.step']:.3f}")


if __name__ == "__main__":
    main()
