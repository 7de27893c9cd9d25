"""Small models and per-rank data for the DeMo tests (imported by the test modules)."""

from __future__ import annotations

import io
import threading

import torch

_SEED_LOCK = threading.Lock()  # ranks run as threads and share torch's global generator


def make_mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    with _SEED_LOCK:
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Linear(16, 96), torch.nn.Tanh(), torch.nn.Linear(96, 4)
        ).to(dtype)


def batch(
    rank: int, step: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(32, 16, generator=g)
    y = torch.tanh(x[:, :4] * 1.5) + 0.05 * torch.randn(32, 4, generator=g)
    return x.to(dtype), y.to(dtype)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> float:
    x, y = batch(rank, step, next(model.parameters()).dtype)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
    loss.backward()
    opt.step()
    return float(loss.detach())


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def checkpoint(model: torch.nn.Module, opt: torch.optim.Optimizer) -> bytes:
    """Model and optimizer state as ``torch.save`` writes them (what a resume reads back)."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    return buf.getvalue()


def load_checkpoint(saved: bytes) -> dict:
    return torch.load(io.BytesIO(saved), weights_only=True)
