"""RL weight sync: bytes and wall time of one exact sparse sync against a dense send (issue 8).

A bf16 model of ``--params`` values (default 100M) in ``--tensors`` tensors
(default 200); each round changes ``--fraction`` (default 1%) of the positions,
chosen uniformly at random, by flipping a mantissa bit (so every chosen position
really changes). One subscriber runs in its own process on loopback. Measured,
round by round and interleaved, best of ``--repeats``:

- ``sparse``: ``publish()`` (diff, encode, fingerprint) + transfer + the subscriber's
  ``update()`` (decode, apply, fingerprint check), until its acknowledgement arrives;
- ``dense``: the same path when every position changed, so every chunk travels dense
  over the same PUB socket, applied and fingerprinted the same way;
- ``snapshot``: a fresh subscriber in the same child process fetching the whole model
  (manifest, all chunks over the ROUTER/DEALER socket, fingerprint).

Pass when sparse payload bytes <= 3% of dense bf16 and the sparse sync takes less
than a quarter of the dense size's time at 1 Gbit/s.

    python benchmarks/bench_sync.py [--params 100000000 --tensors 200 --repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from multiprocessing.connection import Connection

import numpy as np
import torch


def _model(params: int, tensors: int) -> dict[str, torch.Tensor]:
    n = params // tensors
    g = torch.Generator().manual_seed(0)
    return {
        f"layer{i}.weight": torch.randn(n, generator=g).to(torch.bfloat16) for i in range(tensors)
    }


def _subscriber(addr: str, params: int, tensors: int, threads: int, conn: Connection) -> None:
    from lowband.sync import WeightSubscriber

    torch.set_num_threads(threads)
    model = {k: torch.zeros_like(v) for k, v in _model(params, tensors).items()}
    with WeightSubscriber(model, connect=addr) as sub:
        while True:
            cmd = conn.recv()
            if cmd == "stop":
                return
            if cmd == "update":
                v = sub.update(block=True, timeout=120)
                conn.send((v, sub.fingerprint, sub.snapshots))
            elif cmd == "snapshot":  # a fresh subscriber: the dense path over the snapshot socket
                fresh = {k: torch.zeros_like(v) for k, v in model.items()}
                t = time.perf_counter()
                with WeightSubscriber(fresh, connect=addr) as s2:
                    v = s2.update(block=True, timeout=120)
                    conn.send((v, s2.fingerprint, time.perf_counter() - t))


def _perturb(model: dict[str, torch.Tensor], fraction: float, rng: np.random.Generator) -> None:
    for t in model.values():
        bits = t.view(torch.int16).numpy()
        k = int(round(fraction * bits.size))
        idx = rng.choice(bits.size, size=k, replace=False) if fraction < 1 else np.arange(bits.size)
        bits[idx] ^= 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=int, default=100_000_000)
    ap.add_argument("--tensors", type=int, default=200)
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch/OpenMP threads per process (two processes)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lowband.sync import WeightPublisher

    model = _model(args.params, args.tensors)
    dense_bytes = sum(t.numel() * t.element_size() for t in model.values())
    rng = np.random.default_rng(1)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    with WeightPublisher(model, codec="exact", streams=args.streams) as pub:
        proc = ctx.Process(
            target=_subscriber,
            args=(pub.address, args.params, args.tensors, args.threads, child),
            daemon=True,
        )
        proc.start()
        try:
            pub.publish()
            parent.send("update")
            v, fp, _ = parent.recv()
            assert v == pub.version and fp == pub.fingerprint, "initial snapshot does not match"
            best: dict[str, float] = {
                "sparse": float("inf"),
                "dense": float("inf"),
                "snapshot": float("inf"),
            }
            sizes: dict[str, int] = {}
            publish_s: dict[str, float] = {"sparse": float("inf"), "dense": float("inf")}
            for _ in range(args.repeats):
                for kind, frac in (("sparse", args.fraction), ("dense", 1.0)):
                    _perturb(model, frac, rng)
                    parent.send("update")  # the subscriber waits for the version before we start
                    time.sleep(0.2)
                    t = time.perf_counter()
                    st = pub.publish()
                    v, fp, snaps = parent.recv()
                    dt = time.perf_counter() - t
                    if v != st.version or fp != st.fingerprint or snaps != 1:
                        raise SystemExit(
                            f"{kind}: subscriber at {v} ({fp}), publisher at {st.version} ({st.fingerprint})"
                        )
                    best[kind] = min(best[kind], dt)
                    publish_s[kind] = min(publish_s[kind], st.seconds)
                    sizes[kind] = st.payload_bytes
                    if kind == "sparse":
                        sizes["positions"] = st.positions_changed
                parent.send("snapshot")
                v, fp, dt = parent.recv()
                if v != pub.version or fp != pub.fingerprint:
                    raise SystemExit("snapshot does not match the publisher")
                best["snapshot"] = min(best["snapshot"], dt)
            parent.send("stop")
        finally:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    gbit = dense_bytes * 8 / 1e9
    print(
        f"model: {args.params / 1e6:.0f}M bf16 values in {args.tensors} tensors ({dense_bytes / 1e6:.1f} MB); "
        f"{sizes['positions']} positions changed ({sizes['positions'] / args.params:.2%}); "
        f"torch threads {torch.get_num_threads()}; best of {args.repeats}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"{'sync':>10} {'payload MB':>11} {'% dense':>8} {'seconds':>8} {'publish s':>10}")
    for kind in ("sparse", "dense"):
        print(
            f"{kind:>10} {sizes[kind] / 1e6:11.2f} {sizes[kind] / dense_bytes:8.2%} {best[kind]:8.3f} {publish_s[kind]:10.3f}"
        )
    print(f"{'snapshot':>10} {dense_bytes / 1e6:11.2f} {1:8.2%} {best['snapshot']:8.3f}")
    print(f"dense size at 1 Gbit/s: {gbit:.3f} s; a quarter: {gbit / 4:.3f} s")
    ok_bytes = sizes["sparse"] <= 0.03 * dense_bytes
    ok_time = best["sparse"] < gbit / 4
    print(
        f"bytes <= 3% of dense: {'PASS' if ok_bytes else 'FAIL'}; "
        f"sync < 1/4 of dense at 1 Gbit/s: {'PASS' if ok_time else 'FAIL'} "
        f"({best['sparse']:.3f} s vs {gbit / 4:.3f} s; {best['dense'] / best['sparse']:.1f}x faster than dense over loopback)"
    )
    return 0 if ok_bytes and ok_time else 1


if __name__ == "__main__":
    raise SystemExit(main())
