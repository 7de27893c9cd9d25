"""The DeMo tests' problem: a 16-96-4 MLP fitting ``tanh(1.5 x)`` (:class:`lowband.testing.Regression`)."""

from __future__ import annotations

import torch

from lowband.testing import Regression

DEMO = Regression(widths=(16, 96, 4), rows=32, target=lambda v: torch.tanh(v * 1.5), noise=0.05)
make_mlp, batch, train_step = DEMO.model, DEMO.batch, DEMO.train_step
