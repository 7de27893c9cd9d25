"""Checksum throughput against a memcpy on the same buffer (issue 14, item 8).

    PYTHONPATH=$PWD python benchmarks/bench_checksum.py [--mib 64]

Prints GiB/s of ``lowband.kernels.checksum`` (XXH3-64), ``zlib.crc32`` and, when they
are installed, the ``crc32c`` package and ``xxhash.xxh64``, beside ``numpy.copyto`` of the
same bytes; best of 9 runs each, one thread, interleaved. A few seconds.
"""

from __future__ import annotations

import argparse
import time
import zlib
from collections.abc import Callable

import numpy as np
import torch

from lowband import kernels


def _best(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    best = {k: float("inf") for k in fns}
    for _ in range(reps):  # interleaved: load drifts hit every candidate alike
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = args.mib << 20
    a = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)
    out = np.empty_like(a)
    mv = memoryview(a)
    fns: dict[str, Callable[[], object]] = {
        "memcpy (numpy.copyto)": lambda: np.copyto(out, a),
        "lowband.kernels.checksum (XXH3-64)": lambda: kernels.checksum(a),
        "zlib.crc32": lambda: zlib.crc32(mv),
    }
    try:
        import crc32c

        fns["crc32c (hardware CRC32C)"] = lambda: crc32c.crc32c(mv)
    except ImportError:
        pass
    try:
        import xxhash

        fns["xxhash.xxh64"] = lambda: xxhash.xxh64_intdigest(mv)
    except ImportError:
        pass
    best = _best(fns, args.reps)
    copy = best["memcpy (numpy.copyto)"]
    for name, t in best.items():
        print(f"{name:36s} {n / t / 2**30:7.2f} GiB/s   {copy / t:5.2f} x memcpy speed")


if __name__ == "__main__":
    main()
