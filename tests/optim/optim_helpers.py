"""Shared helpers for the optimizer tests: a tiny model, per-rank data, in-process ranks."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from lowband.testing import ThreadGroup

_SEED_LOCK = threading.Lock()  # ranks run as threads and share torch's global generator


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    with _SEED_LOCK:
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)
        ).to(dtype)


def batch(
    rank: int, step: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(16, 8, generator=g)
    y = x[:, :4] * 0.5 + 0.1 * torch.randn(16, 4, generator=g)
    return x.to(dtype), y.to(dtype)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> float:
    x, y = batch(rank, step, next(model.parameters()).dtype)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
    loss.backward()
    opt.step()
    return float(loss.detach())


def run_ranks(n: int, fn: Callable[[Any], Any]) -> list[Any]:
    """Run ``fn(group)`` on n in-process ranks (real Groups over an in-process hub)."""
    with ThreadGroup(n) as tg:
        return tg.run(fn, timeout=180)  # generous: the 2 cores are shared


class Recording:
    """A group seen through a log of the collectives called on it (delegation, no patching)."""

    def __init__(self, group: Any) -> None:
        self._group = group
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._group, name)

    def all_reduce(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(f"all_reduce:{kwargs.get('key', '')}")
        return self._group.all_reduce(tensor, *args, **kwargs)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Any:
        self.calls.append("broadcast")
        return self._group.broadcast(tensor, src)

    def verify(self, config: Any, **kwargs: Any) -> None:
        self.calls.append("verify")
        self._group.verify(config, **kwargs)


class LoraModel(torch.nn.Module):
    """A LoRA-like model: a frozen MLP base (3,332 values) and small trainable
    low-rank adapters on its first layer (528 values)."""

    def __init__(self, seed: int = 0, rank: int = 2) -> None:
        super().__init__()
        with _SEED_LOCK:
            torch.manual_seed(seed)
            self.base_in = torch.nn.Linear(8, 256)
            self.base_out = torch.nn.Linear(256, 4)
            self.down = torch.nn.Parameter(0.1 * torch.randn(8, rank))
            self.up = torch.nn.Parameter(0.1 * torch.randn(rank, 256))
        for p in (*self.base_in.parameters(), *self.base_out.parameters()):
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_in(x) + x @ self.down @ self.up
        return self.base_out(torch.tanh(h))

    def adapters(self) -> list[torch.nn.Parameter]:
        return [self.down, self.up]

    def frozen(self) -> list[torch.Tensor]:
        return [p for p in self.parameters() if not p.requires_grad]
