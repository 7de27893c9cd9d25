"""Kernel throughput as a fraction of a plain tensor copy (issue 3, "Done when").

Run as a script (prints a table)::

    python benchmarks/bench_kernels.py                 # CPU, 16M fp32, best of 7
    python benchmarks/bench_kernels.py --n 4194304 --reps 5 --backend torch

or under pytest-benchmark (``pytest benchmarks/bench_kernels.py``), which times the
same kernels with its own statistics.

Protocol (DESIGN.md, Testing): the baseline is ``y.copy_(x)`` of the same input into a
preallocated tensor, at the same thread count (``torch.get_num_threads()``), timed in
the same run and interleaved with every kernel (copy, kernel, copy, kernel, ...); each
figure is the best of ``--reps``; every kernel writes into preallocated outputs. The
"x copy" column is copy time / kernel time: 1.0 means as fast as a copy of the input;
"bound" is the most a kernel limited only by memory bandwidth could reach (copy moves 8
bytes per value; an EF encode moves 13). The targets are the CPU's (issue 3).
With CUDA present, ``--device cuda`` uses CUDA events over 100 back-to-back launches
at 256M elements, against the device's own copy.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator

import torch

from lowband import kernels

__all__ = ["main", "cases"]

# (name, target as a fraction of copy, or None)
TARGETS = {
    "EF + q8 encode": 0.60,
    "q2 encode": 0.55,
    "q1 encode": 0.55,
    "q8 dequantize-accumulate": 1.0,
    "top-k tile 4096 k 64": 0.30,
    "codec.encode q8 + EF + payload + checksum": 0.35,
}


# bytes a kernel must move per input value (fp32 in; codes, steps, residual, outputs), for
# the "bound" column: copy's 8 bytes per value / these = the fraction of copy a kernel limited
# by memory bandwidth alone can reach (a GPU's ceiling; CPU kernels are compute-bound first)
_STEPS = 4 / 256  # one fp32 step per block of 256
_EF = 8.0  # read and write the fp32 residual
_TOPK = 64 / 4096 * 8  # int32 index + fp32 value per selected value
BYTES_PER_VALUE = {
    "EF + q8 encode": 4 + 1 + _STEPS + _EF,
    "q8 encode": 4 + 1 + _STEPS,
    "q4 encode": 4 + 0.5 + _STEPS,
    "q2 encode": 4 + 0.25 + _STEPS,
    "q1 encode": 4 + 0.125 + _STEPS,
    "EF + q2 encode": 4 + 0.25 + _STEPS + _EF,
    "EF + q1 encode": 4 + 0.125 + _STEPS + _EF,
    "EF + sign encode": 4 + 0.125 + _STEPS + _EF,
    "EF + q8 stochastic encode": 4 + 1 + _STEPS + _EF,
    "q8 dequantize-accumulate": 1 + _STEPS + 8,
    "q2 dequantize-accumulate": 0.25 + _STEPS + 8,
    "top-k tile 4096 k 64": 4 + _TOPK,
    "EF + top-k tile 4096 k 64": 4 + _TOPK + _EF,
}


def cases(n: int, device: str, backend: str | None) -> dict[str, Callable[[], object]]:
    """The kernels to time, each a closure over preallocated inputs and outputs."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, generator=g).to(device)
    res = (torch.randn(n, generator=g) * 0.01).to(device)
    kw = {} if backend is None else {"backend": backend}
    out: dict[str, Callable[[], object]] = {}

    def enc(bits: int, ef: bool, **extra: object) -> Callable[[], object]:
        codes = torch.empty(kernels.packed_size(n, bits), dtype=torch.uint8, device=device)
        steps = torch.empty(-(-n // 256), dtype=torch.float32, device=device)
        use_out = backend != "torch"
        o = {"out": (codes, steps)} if use_out else {}
        r = res.clone() if ef else None
        return lambda: kernels.quantize(x, bits=bits, residual=r, **o, **extra, **kw)

    out["EF + q8 encode"] = enc(8, True)
    out["q8 encode"] = enc(8, False)
    out["q4 encode"] = enc(4, False)
    out["q2 encode"] = enc(2, False)
    out["q1 encode"] = enc(1, False)
    out["EF + q2 encode"] = enc(2, True)
    out["EF + q1 encode"] = enc(1, True)
    out["EF + sign encode"] = enc(1, True, sign=True)
    out["EF + q8 stochastic encode"] = enc(8, True, stochastic=True, seed=1)
    for bits in (8, 2):
        codes, steps = kernels.quantize(x, bits=bits)
        acc = torch.zeros(n, device=device)
        out[f"q{bits} dequantize-accumulate"] = lambda c=codes, s=steps, a=acc, b=bits: (
            kernels.dequantize(c, s, bits=b, n=n, out=a, accumulate=True, **kw)
        )
    m = kernels.topk_count(n, k=64, tile=4096)
    tk_out = (torch.empty(m, dtype=torch.int32, device=device), torch.empty(m, device=device))
    tko = {"out": tk_out} if backend != "torch" else {}
    out["top-k tile 4096 k 64"] = lambda: kernels.topk_tiles(x, k=64, tile=4096, **tko, **kw)
    r2 = res.clone()
    out["EF + top-k tile 4096 k 64"] = lambda: kernels.topk_tiles(
        x, k=64, tile=4096, residual=r2, **tko, **kw
    )
    if device == "cpu":
        raw = x.view(torch.uint8).numpy()
        out["checksum XXH3-64"] = lambda: kernels.checksum(raw)  # one implementation
        try:
            from lowband.compress import ErrorFeedback
        except ImportError:  # the codec layer is not there yet
            pass
        else:
            if backend in (None, "native"):
                ef = ErrorFeedback("q8")
                out["codec.encode q8 + EF + payload + checksum"] = lambda: ef.encode(
                    x, key="b"
                ).to_frames()
    return out


def _time_cpu(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _time_thread_cpu(fn: Callable[[], object]) -> float:
    """CPU seconds of this thread: with one thread, immune to being descheduled on a busy machine."""
    t = time.thread_time()
    fn()
    return time.thread_time() - t


def _time_cuda(fn: Callable[[], object], launches: int = 100) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(launches):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000.0 / launches


def measure(
    n: int,
    reps: int,
    device: str,
    backend: str | None,
    only: list[str] | None = None,
    *,
    thread_cpu: bool = False,
    budget: float = 0.0,
) -> Iterator[tuple[str, float, float]]:
    """Rows of (name, best kernel seconds, best copy seconds measured alongside it), each
    yielded as soon as it is measured.

    Each kernel runs at least ``reps`` times, and on until ``budget`` seconds were spent
    on it and its copies (more samples find the quiet moments of a shared machine).
    """
    todo = cases(n, device, backend)
    if only:
        todo = {k: v for k, v in todo.items() if any(o in k for o in only)}
    x = torch.randn(n, device=device)
    y = torch.empty_like(x)
    copy = lambda: y.copy_(x)  # noqa: E731
    timer = _time_cuda if device == "cuda" else (_time_thread_cpu if thread_cpu else _time_cpu)
    for fn in [copy, *todo.values()]:  # warm up: page faults, thread pools, lazy loads
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    for name, fn in todo.items():
        best_k = best_c = float("inf")
        t0, done = time.perf_counter(), 0
        while done < reps or time.perf_counter() - t0 < budget:
            best_c = min(best_c, timer(copy))
            best_k = min(best_k, timer(fn))
            done += 1
        yield name, best_k, best_c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--n", type=int, default=None, help="elements (default 16M on CPU, 256M on CUDA)"
    )
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backend", default=None, choices=["torch", "native", "triton"])
    ap.add_argument("--only", nargs="*", help="substrings of the kernel names to run")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch (and kernel) threads, both sides"
    )
    ap.add_argument(
        "--budget", type=float, default=0.0, help="seconds per kernel: keep sampling until spent"
    )
    ap.add_argument(
        "--thread-cpu",
        action="store_true",
        help="one thread, timed by its CPU time (time.thread_time): robust on a shared, busy machine",
    )
    a = ap.parse_args(argv)
    if a.thread_cpu:
        a.threads = 1
    if a.threads:
        torch.set_num_threads(a.threads)
    n = a.n or ((256 << 20) if a.device == "cuda" else (16 << 20))
    backend = a.backend or kernels.available_backends(a.device)[0]
    clock = (
        "thread CPU time"
        if a.thread_cpu
        else ("CUDA events" if a.device == "cuda" else "wall clock")
    )
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"{n} fp32 elements on {a.device}, backend {backend}, {torch.get_num_threads()} threads, "
        f"best of >= {a.reps} ({clock}), load average {load}"
    )
    print(
        f"{'kernel':44s} {'ms':>8s} {'copy ms':>8s} {'x copy':>7s} {'bound':>7s} {'target':>7s}"
    )
    rows = measure(n, a.reps, a.device, backend, a.only, thread_cpu=a.thread_cpu, budget=a.budget)
    for name, tk, tc in rows:  # printed as each is measured
        target = TARGETS.get(name)
        mark = "" if target is None else f"{target:7.2f} {'met' if tc / tk >= target else 'MISSED'}"
        moved = BYTES_PER_VALUE.get(name)
        bound = "" if moved is None else f"{8 / moved:7.2f}"
        print(
            f"{name:44s} {tk * 1e3:8.2f} {tc * 1e3:8.2f} {tc / tk:7.2f} {bound:>7s} {mark}",
            flush=True,
        )
    return 0


def test_kernels_vs_copy(benchmark: object) -> None:  # pragma: no cover - pytest-benchmark entry
    """pytest-benchmark: the EF + q8 encode at 16M elements (the table has the rest)."""
    fn = cases(16 << 20, "cpu", None)["EF + q8 encode"]
    benchmark(fn)  # type: ignore[operator]


if __name__ == "__main__":
    raise SystemExit(main())
