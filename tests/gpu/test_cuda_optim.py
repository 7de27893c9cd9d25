"""The optimizers on CUDA parameters: results, rank agreement and accelerator memory.

These run where CUDA is present (skipped otherwise; CI has no GPU). Ranks are threads
of one process (``ThreadGroup``) sharing the one device. ``LOWBAND_GPU_TESTS_ON_CPU=1``
runs the same tests on CPU tensors (all but the memory checks), to debug them here.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch

from lowband import CompressedGradients, DeMo, DiLoCo
from lowband.testing import ThreadGroup

ON_CPU = os.environ.get("LOWBAND_GPU_TESTS_ON_CPU") == "1"
DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEV != "cuda" and not ON_CPU, reason="needs CUDA (LOWBAND_GPU_TESTS_ON_CPU=1 runs it on CPU)"
)
needs_cuda = pytest.mark.skipif(DEV != "cuda", reason="device memory is measured on CUDA only")

_LOCK = threading.Lock()  # ranks are threads sharing torch's global generator


def _mlp(width: int, dtype: torch.dtype = torch.float32, device: str = DEV) -> torch.nn.Module:
    with _LOCK:
        torch.manual_seed(0)
        m = torch.nn.Sequential(
            torch.nn.Linear(64, width), torch.nn.Tanh(), torch.nn.Linear(width, 64)
        )
    return m.to(device=device, dtype=dtype)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> float:
    g = torch.Generator().manual_seed(1000 * rank + step)
    p = next(model.parameters())
    x = torch.randn(32, 64, generator=g).to(device=p.device, dtype=p.dtype)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x).float(), torch.tanh(x).float())
    loss.backward()
    opt.step()
    return float(loss.detach())


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1).cpu() for p in model.parameters()])


def _run_demo(device: str, dtype: torch.dtype, steps: int = 12) -> list[torch.Tensor]:
    def rank(group):  # type: ignore[no-untyped-def]
        model = _mlp(256, dtype, device)
        opt = DeMo(model.parameters(), lr=1e-3, group=group, topk=8, chunk=32, decay=0.99)
        for t in range(steps):
            _step(model, opt, group.rank, t)
        return _flat(model)

    with ThreadGroup(2) as tg:
        return tg.run(rank, timeout=300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_demo_on_cuda_agrees_across_ranks_and_with_cpu(dtype: torch.dtype) -> None:
    gpu = _run_demo(DEV, dtype)
    assert torch.equal(gpu[0], gpu[1]), "ranks differ"
    cpu = _run_demo("cpu", dtype)
    assert torch.equal(cpu[0], cpu[1])
    start = _flat(_mlp(256, dtype, "cpu"))
    moved = (gpu[0] != start).float().mean().item()
    assert moved > 0.5, f"only {moved:.0%} of the weights moved"
    # sign() makes every update +-lr: float rounding (device matmul vs CPU) may flip a
    # near-zero coefficient's sign or a top-k tie; the rest must agree to rounding
    close = torch.isclose(gpu[0], cpu[0], rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert close.float().mean().item() > 0.99


def test_compressed_gradients_on_cuda_match_cpu() -> None:
    def run(device: str) -> list[torch.Tensor]:
        def rank(group):  # type: ignore[no-untyped-def]
            model = _mlp(512, device=device)
            inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
            opt = CompressedGradients(inner, group=group, codec="q4")
            for t in range(8):
                _step(model, opt, group.rank, t)
            assert opt.stats.bytes_sent > 0
            return _flat(model)

        with ThreadGroup(2) as tg:
            return tg.run(rank, timeout=300)

    gpu, cpu = run(DEV), run("cpu")
    assert torch.equal(gpu[0], gpu[1])
    # the quantizer sees the same gradients to float rounding: codes may differ by one step
    # near a rounding boundary, so compare the trained weights loosely
    assert torch.allclose(gpu[0], cpu[0], atol=2e-3, rtol=0)


def _diloco_peak(offload: str, width: int = 2048) -> tuple[int, int, int]:
    """Model bytes, and the device's peak allocation over inner-only steps and over a sync step."""

    def rank(group):  # type: ignore[no-untyped-def]
        model = _mlp(width)
        inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
        opt = DiLoCo(inner, group=group, sync_every=4, offload=offload)
        for t in range(3):  # AdamW's state now exists: inner-only steps
            _step(model, opt, group.rank, t)
        return model, opt

    with ThreadGroup(1) as tg:
        model, opt = tg.run(rank, timeout=300)[0]
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        tg.run(lambda g: _step(model, opt, 0, 3), timeout=300)  # step 4: inner step + outer step
        torch.cuda.synchronize()
        assert opt.stats.syncs == 1
        sync_peak = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        tg.run(lambda g: _step(model, opt, 0, 4), timeout=300)  # an inner-only step
        torch.cuda.synchronize()
        inner_peak = torch.cuda.max_memory_allocated() - base
    return model_bytes, inner_peak, sync_peak


@needs_cuda
def test_diloco_offload_cpu_adds_no_model_sized_device_memory() -> None:
    model_bytes, inner_peak, sync_peak = _diloco_peak("cpu")
    largest = 64 * 2048 * 4  # the biggest parameter's fp32 bytes: per-tensor copies are allowed
    print(f"model {model_bytes} B; peak over a step: inner {inner_peak} B, with sync {sync_peak} B")
    assert sync_peak <= inner_peak + 2 * largest + (1 << 20)


@needs_cuda
def test_diloco_offload_device_keeps_its_copies_on_the_device() -> None:
    # the contrast that shows the measurement can see model-sized buffers: "device" holds
    # the global copy and outer momentum there (allocated at construction, not per step)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model = _mlp(2048)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with ThreadGroup(1) as tg:

        def build(group):  # type: ignore[no-untyped-def]
            return DiLoCo(
                torch.optim.SGD(model.parameters(), lr=0.1),
                group=group,
                sync_every=2,
                offload="device",
            )

        opt = tg.run(build, timeout=300)[0]
        tg.run(lambda g: [_step(model, opt, 0, t) for t in range(2)], timeout=300)
        held = torch.cuda.memory_allocated() - before
    assert held >= 3 * model_bytes  # model, global copy, outer momentum (+ staging)
