"""Robust aggregation under DiLoCo training (issue 9, item 2).

Eight peers (``ThreadGroup``: real Groups and collectives, in-process) train a tiny MLP
with DiLoCo. One peer is hostile: it sends its pseudo-gradient scaled by -20, or random
values 20 times its norm. The robust rules (``op="trimmed_mean" | "median" |
"norm_clip"``, applied at each shard owner) keep the loss drop within 10% of a clean
run's, while the plain mean does not.

The rule is DiLoCo's ``aggregate=`` (passed to ``group.all_reduce(op=...)``); the
hostile rank's input is altered by ``_Hostile``, a pass-through group (every collective
still runs on the real group). Also: CompressedGradients' ``aggregate=`` under the same
attack, and the clear errors where a rule cannot apply (sparse codecs, DeMo).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from lowband.distro import DeMo
from lowband.errors import ConfigError
from lowband.optim import CompressedGradients, DiLoCo
from lowband.testing import ThreadGroup

WORLD, HOSTILE, ROUNDS, H = 8, 5, 10, 4


class _Hostile:
    """The real group; on the hostile rank, the optimizer's contributions are altered."""

    def __init__(self, group: Any, attack: str | None) -> None:
        self._group, self._attack = group, attack

    def __getattr__(self, name: str) -> Any:
        return getattr(self._group, name)

    def all_reduce(self, tensor: torch.Tensor, codec: Any = None, *, op: str = "mean", **kw: Any) -> Any:
        if kw.get("key", "").startswith(("diloco.", "grads.")):
            if self._attack is not None and self._group.rank == HOSTILE:
                if self._attack == "scaled":
                    tensor = tensor * -20.0
                else:
                    g = torch.Generator().manual_seed(int(tensor.numel()))
                    noise = torch.randn(tensor.shape, generator=g)
                    tensor = noise * (20.0 * float(tensor.norm()) / float(noise.norm()))
        return self._group.all_reduce(tensor, codec, op=op, **kw)


_INIT_LOCK = threading.Lock()


def _model() -> torch.nn.Module:
    """The same initial weights on every thread: seeding and drawing from torch's global RNG
    must not interleave with the other peers' threads."""
    with _INIT_LOCK:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _data(seed: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(6, 1, generator=torch.Generator().manual_seed(7))
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))
    return x, torch.tanh(x @ w)


def _train(group: Any, op: str, attack: str | None) -> list[float]:
    model = _model()
    opt = DiLoCo(torch.optim.SGD(model.parameters(), lr=0.1), group=_Hostile(group, attack),
                 sync_every=H, outer_lr=0.7, outer_momentum=0.5, aggregate=op)
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


def _train_gradients(group: Any, op: str, attack: str | None) -> float:
    model = _model()
    opt = CompressedGradients(torch.optim.SGD(model.parameters(), lr=0.2), group=_Hostile(group, attack),
                              codec="q8", aggregate=op)
    ex, ey = _data(10_000, 512)
    with torch.no_grad():
        first = float(torch.nn.functional.mse_loss(model(ex), ey))
    for s in range(30):
        x, y = _data(group.rank * 1000 + s)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        return first - float(torch.nn.functional.mse_loss(model(ex), ey))


def test_compressed_gradients_aggregate() -> None:
    with ThreadGroup(WORLD) as tg:
        clean = tg.run(_train_gradients, "mean", None, timeout=240)[0]
        robust = tg.run(_train_gradients, "median", "scaled", timeout=240)[0]
        plain = tg.run(_train_gradients, "mean", "scaled", timeout=240)[0]
    assert clean > 0.05
    assert abs(robust - clean) <= 0.10 * clean, (robust, clean)
    assert abs(plain - clean) > 0.10 * clean, (plain, clean)


def test_rules_that_cannot_apply_are_refused() -> None:
    model = torch.nn.Linear(4, 2)
    with ThreadGroup(1) as tg:
        g = tg.groups[0]
        with pytest.raises(ConfigError, match="dense codec"):
            DiLoCo(torch.optim.SGD(model.parameters(), lr=0.1), group=g, sync_every=2,
                   codec="topk:k=2,tile=64+q4", aggregate="median")
        with pytest.raises(ConfigError, match="dense codec"):
            CompressedGradients(torch.optim.SGD(model.parameters(), lr=0.1), group=g,
                                codec="topk:k=2,tile=64+q4", aggregate="trimmed_mean")
        with pytest.raises(ConfigError, match="aggregate"):
            DiLoCo(torch.optim.SGD(model.parameters(), lr=0.1), group=g, sync_every=2, aggregate="max")
        with pytest.raises(ConfigError, match="only 'mean'"):
            DeMo(model.parameters(), lr=0.01, group=g, aggregate="norm_clip")
        DeMo(model.parameters(), lr=0.01, group=g, aggregate="mean")  # the default is fine
