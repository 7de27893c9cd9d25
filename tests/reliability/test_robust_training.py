"""Robust aggregation under DiLoCo training (issue 9, item 2).

Eight peers (``ThreadGroup``: real Groups and collectives, in-process) train a tiny MLP
with DiLoCo. One peer is hostile: it sends its pseudo-gradient scaled by -20, or random
values 20 times its norm. The robust rules (``op="trimmed_mean" | "median" |
"norm_clip"``, applied at each shard owner) keep the loss drop within 10% of a clean
run's, while the plain mean does not.

DiLoCo has no ``aggregate=`` argument yet, so the rule reaches the group through
``_Aggregate``, a pass-through group that turns DiLoCo's ``op="mean"`` into the rule
(and, on the hostile rank, alters what that rank sends): every collective still runs
on the real group.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lowband.optim import DiLoCo
from lowband.testing import ThreadGroup

WORLD, HOSTILE, ROUNDS, H = 8, 5, 10, 4


class _Aggregate:
    """The real group, with DiLoCo's mean replaced by ``op`` and a hostile rank's input altered."""

    def __init__(self, group: Any, op: str, attack: str | None) -> None:
        self._group, self._op, self._attack = group, op, attack

    def __getattr__(self, name: str) -> Any:
        return getattr(self._group, name)

    def all_reduce(self, tensor: torch.Tensor, codec: Any = None, *, op: str = "mean", **kw: Any) -> Any:
        if kw.get("key", "").startswith("diloco."):
            op = self._op
            if self._attack is not None and self._group.rank == HOSTILE:
                if self._attack == "scaled":
                    tensor = tensor * -20.0
                else:
                    g = torch.Generator().manual_seed(int(tensor.numel()))
                    noise = torch.randn(tensor.shape, generator=g)
                    tensor = noise * (20.0 * float(tensor.norm()) / float(noise.norm()))
        return self._group.all_reduce(tensor, codec, op=op, **kw)


def _data(seed: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(6, 1, generator=torch.Generator().manual_seed(7))
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))
    return x, torch.tanh(x @ w)


def _train(group: Any, op: str, attack: str | None) -> list[float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = DiLoCo(torch.optim.SGD(model.parameters(), lr=0.1), group=_Aggregate(group, op, attack),
                 sync_every=H, outer_lr=0.7, outer_momentum=0.5)
    ex, ey = _data(10_000, 512)
    losses = []
    with torch.no_grad():
        losses.append(float(torch.nn.functional.mse_loss(model(ex), ey)))
    for r in range(ROUNDS):
        for s in range(H):
            x, y = _data(group.rank * 1000 + r * H + s)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        with torch.no_grad():  # right after a sync the model holds the global parameters
            losses.append(float(torch.nn.functional.mse_loss(model(ex), ey)))
    return losses


def _drop(op: str, attack: str | None) -> float:
    with ThreadGroup(WORLD) as tg:
        runs = tg.run(_train, op, attack, timeout=240)
    assert all(r == runs[0] for r in runs), "every peer holds the same global parameters"
    return runs[0][0] - runs[0][-1]


@pytest.fixture(scope="module")
def clean_drop() -> float:
    drop = _drop("mean", None)
    assert drop > 0.05  # the clean run learns
    return drop


@pytest.mark.parametrize("attack", ["scaled", "random"])
def test_plain_mean_is_ruined_by_one_hostile_peer(clean_drop: float, attack: str) -> None:
    assert abs(_drop("mean", attack) - clean_drop) > 0.10 * clean_drop


@pytest.mark.parametrize("attack", ["scaled", "random"])
@pytest.mark.parametrize("op", ["trimmed_mean", "median", "norm_clip"])
def test_robust_rules_keep_the_loss_drop_within_10_percent(clean_drop: float, op: str, attack: str) -> None:
    drop = _drop(op, attack)
    assert abs(drop - clean_drop) <= 0.10 * clean_drop, (op, attack, drop, clean_drop)
