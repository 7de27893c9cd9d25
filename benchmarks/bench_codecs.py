"""Encode/decode throughput and wire bytes per element of every codec (issue 2).

Run as pytest-benchmark cases (``pytest benchmarks/bench_codecs.py``) or as a
table (``python benchmarks/bench_codecs.py [--n 16777216]``): GB/s of fp32 input
and bytes per element on the wire, beside a plain tensor copy of the same input
measured in the same run, interleaved, best of several.
"""

from __future__ import annotations

import argparse
import sys

import pytest
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import copy_baseline, interleaved_best  # noqa: E402

from lowband.compress import ErrorFeedback, Payload, parse  # noqa: E402

SPECS = ["fp16", "bf16", "q8", "q4", "q2", "q1", "sign", "topk:k=64,tile=4096+q2", "topk:density=0.01", "q8+lz4",
         "dct:chunk=64+topk:k=8,tile=4096+sign"]
N = 16 * 2**20


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(0))


def test_copy_baseline(benchmark, x: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    benchmark.extra_info["GB/s"] = None
    benchmark(copy_baseline(x))


@pytest.mark.parametrize("spec", SPECS)
def test_encode(benchmark, x: torch.Tensor, spec: str) -> None:  # type: ignore[no-untyped-def]
    codec = parse(spec)
    p = benchmark(codec.encode, x)
    benchmark.extra_info["wire_bytes_per_element"] = p.nbytes / x.numel()


@pytest.mark.parametrize("spec", SPECS)
def test_decode(benchmark, x: torch.Tensor, spec: str) -> None:  # type: ignore[no-untyped-def]
    codec = parse(spec)
    p = Payload.from_frames(codec.encode(x).to_frames())
    out = torch.zeros(x.numel())
    benchmark(codec.decode_into, p, out, accumulate=False)


def is_q1(codec) -> bool:
    return str(codec.value).split(":")[0] == "q1"


def table(n: int, repeats: int, specs: list[str]) -> list[dict[str, object]]:
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    out = torch.zeros(n)
    rows = []
    for spec in specs:
        codec = parse(spec)
        # error feedback refuses q1 (its +-absmax grid is not a contraction): no encode+ef row
        ef = ErrorFeedback(codec) if codec.dct is None and not is_q1(codec) else None
        p = codec.encode(x)
        fns = {
            "copy": copy_baseline(x),
            "encode": lambda c=codec: c.encode(x).to_frames(),
            "decode": lambda c=codec, p=p: c.decode_into(Payload.from_frames(p.to_frames()), out, accumulate=False),
        }
        if ef is not None:
            fns["encode+ef"] = lambda e=ef: e.encode(x, key="x").to_frames()
        t = interleaved_best(fns, repeats=repeats)
        gb = x.numel() * 4 / 1e9
        rows.append({
            "codec": spec,
            "bytes/elem": p.nbytes / n,
            "copy GB/s": gb / t["copy"],
            "encode GB/s": gb / t["encode"],
            "encode/copy": t["copy"] / t["encode"],
            "encode+ef/copy": t["copy"] / t["encode+ef"] if "encode+ef" in t else float("nan"),
            "decode GB/s": gb / t["decode"],
            "decode/copy": t["copy"] / t["decode"],
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=N, help="elements (default 16M)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--codec", action="append", help="a codec spec (repeat the flag; default: a representative set)")
    args = ap.parse_args(argv)
    specs = args.codec or SPECS
    from lowband import kernels

    print(f"{args.n} fp32 elements, {torch.get_num_threads()} threads, kernel backends: {kernels.available_backends('cpu')}")
    rows = table(args.n, args.repeats, specs)
    cols = list(rows[0])
    print("  ".join(f"{c:>14}" if i else f"{c:<38}" for i, c in enumerate(cols)))
    for r in rows:
        print("  ".join((f"{v:>14.3f}" if isinstance(v, float) else f"{v:<38}") for v in r.values()))
    q8 = [r for r in rows if r["codec"] == "q8"]
    if q8:
        import os

        r = q8[0]
        print(f"\nissue 17 (done when), q8 on {args.n} values, load average {os.getloadavg()[0]:.2f}:")
        for name, col, target in (("decode", "decode/copy", 0.6), ("encode+ef", "encode+ef/copy", 0.8)):
            v = float(r[col])  # type: ignore[arg-type]
            print(f"  q8 {name} / tensor copy: {v:.2f} (target >= {target}) {'MET' if v >= target else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
