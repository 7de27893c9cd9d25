"""The DeMo tests' model and per-rank data (the machinery is :mod:`lowband.testing`)."""

from __future__ import annotations

import torch

from lowband import testing
from lowband.testing import flat_params  # noqa: F401  (re-exported for the tests)
from lowband.testing import load_state_bytes as load_checkpoint  # noqa: F401
from lowband.testing import state_bytes as checkpoint  # noqa: F401


def make_mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return testing.tiny_mlp(16, 96, 4, seed=seed, dtype=dtype)


def batch(
    rank: int, step: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    return testing.regression_batch(
        rank, step, rows=32, features=16, outputs=4,
        target=lambda v: torch.tanh(v * 1.5), noise=0.05, dtype=dtype,
    )


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> float:
    return testing.train_step(model, opt, *batch(rank, step, next(model.parameters()).dtype))
