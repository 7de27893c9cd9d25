"""Compute cost of one ``DeMo.step`` beside the forward and backward pass that feeds it.

One process, one peer (``lowband.testing.ThreadGroup(1)``: the all-gather is a local
hand-off, so what is timed is DeMo's own compute), ``torch.set_num_threads(1)`` (as a
bench worker on a shared machine). The model is ``lowband bench``'s
``base:block_size=64`` (842K parameters, 206 DCT tiles of 64 x 64). Rounds interleave:
a forward + backward pass (the baseline: it sets the gradients), then ``opt.step()``;
each is timed per round and the best and median are printed. Also timed, interleaved
in the same rounds, as a yardstick: one 2-D DCT of 206 tiles of 64 x 64.

    python benchmarks/bench_demo_step.py [--model base:block_size=64] [--batch 16] [--rounds 30]
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = model_config(args.model)
    model = CharTransformer(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size), generator=g)
    y = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size), generator=g)
    tiles = torch.randn(206, 64, 64, generator=g)

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
        times: dict[str, list[float]] = {"fwd+bwd": [], "DeMo.step": [], "dct 206x64x64": []}
        for r in range(args.rounds + 2):  # two warm-up rounds
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=False)
            _, loss = model(x, y)
            loss.backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            kernels.dct_tiles(tiles)
            t3 = time.perf_counter()
            if r >= 2:
                times["fwd+bwd"].append(t1 - t0)
                times["DeMo.step"].append(t2 - t1)
                times["dct 206x64x64"].append(t3 - t2)
        opt.flush()

    n = sum(p.numel() for p in model.parameters())
    print(
        f"model {args.model} ({n:,} params), batch {args.batch}, {args.threads} thread(s), "
        f"overlap={args.overlap}, {args.rounds} rounds"
    )
    print(f"{'':16s} {'best ms':>9s} {'median ms':>10s}")
    for k, v in times.items():
        print(f"{k:16s} {1e3 * min(v):9.2f} {1e3 * statistics.median(v):10.2f}")
    ratio = statistics.median(times["DeMo.step"]) / statistics.median(times["fwd+bwd"])
    print(f"DeMo.step / fwd+bwd (medians): {ratio:.3f}")


if __name__ == "__main__":
    main()
