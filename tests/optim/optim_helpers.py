"""Shared helpers for the optimizer tests: a tiny model, per-rank data, in-process ranks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lowband import testing
from lowband.testing import Regression, ThreadGroup

#: The optimizer tests' problem: an 8-16-4 MLP fitting ``x / 2``.
PROBLEM = Regression(widths=(8, 16, 4), rows=16, target=lambda v: v * 0.5, noise=0.1)
make_model, batch, train_step = PROBLEM.model, PROBLEM.batch, PROBLEM.train_step


def run_ranks(n: int, fn: Callable[[Any], Any]) -> list[Any]:
    """Run ``fn(group)`` on n in-process ranks (real Groups over an in-process hub)."""
    with ThreadGroup(n) as tg:
        return tg.run(fn, timeout=180)  # generous: the 2 cores are shared


class LoraModel(torch.nn.Module):
    """A LoRA-like model: a frozen MLP base (3,332 values) and small trainable
    low-rank adapters on its first layer (528 values)."""

    def __init__(self, seed: int = 0, rank: int = 2) -> None:
        super().__init__()
        with testing.seeded(seed):
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
