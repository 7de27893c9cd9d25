"""A rank that restarts while the group trains is let in after a sync and healed from a
live member (issue 16, item 1): in-process ranks over the real Group and collectives."""

from __future__ import annotations

import pytest
import torch

import lowband
from lowband.testing import ThreadGroup
from lowband.transport._join import fingerprint

H, STEPS = 4, 64


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _train(model, opt, rank: int, until: int) -> None:
    while opt._step_count < until:
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(rank * 10_000 + opt._step_count))
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), x[:, :1].sin()).backward()
        opt.step()


def test_a_restarted_rank_is_admitted_after_a_sync_and_takes_the_live_state() -> None:
    def fn(group, tg):
        model = _model(0)
        opt = lowband.DiLoCo(torch.optim.AdamW(model.parameters(), lr=1e-2), group=group, sync_every=H,
                             outer_lr=0.7, outer_momentum=0.9)
        if group.rank == 2:
            _train(model, opt, 2, 2 * H + 1)
            tg.kill(2)  # "crashes" in the middle of its inner steps
            group = tg.rejoin(2)
            model = _model(123)  # a new process: other weights, a fresh inner optimizer
            opt = lowband.DiLoCo(torch.optim.AdamW(model.parameters(), lr=1e-2), group=group, sync_every=H,
                                 outer_lr=0.7, outer_momentum=0.9)
            assert group.joined_at is not None
        _train(model, opt, group.rank, STEPS)
        opt.flush()
        return fingerprint(opt._global), opt._step_count, group.participants, list(model.parameters())

    with ThreadGroup(3, on_failure="drop") as tg:
        results = tg.run(fn, tg, timeout=120)
    fps = {r[0] for r in results}
    assert len(fps) == 1, results  # every rank, the healed one included, holds the same bits
    assert {r[1] for r in results} == {STEPS}
    assert all(r[2] == (0, 1, 2) for r in results)
    for a, b in zip(results[0][3], results[2][3]):
        assert torch.equal(a, b)  # STEPS ends on a sync: the model holds the global values


def _compressed(model, group):
    return lowband.CompressedGradients(torch.optim.AdamW(model.parameters(), lr=1e-2), group=group, codec="q8")


def _demo(model, group, overlap=False):
    return lowband.DeMo(model.parameters(), lr=1e-3, group=group, topk=4, chunk=8, overlap=overlap)


@pytest.mark.parametrize("make", [_compressed, _demo, lambda m, g: _demo(m, g, True)],
                         ids=["compressed", "demo", "demo-overlap"])
def test_per_step_optimizers_heal_a_restarted_rank(make) -> None:
    def fn(group, tg):
        model = _model(0)
        opt = make(model, group)
        if group.rank == 1:
            _steps(model, opt, 1, 5)
            tg.kill(1)
            group = tg.rejoin(1)
            model = _model(7)
            opt = make(model, group)
            _steps(model, opt, 1, 15)
        else:
            def back() -> bool:  # rank 1 was dropped (epoch 1) and let in again (epoch 2)
                return group.epoch >= 2 and 1 in group.participants

            _steps(model, opt, group.rank, 0, until_joined=back, extra=15)
        if hasattr(opt, "flush"):
            opt.flush()
        return fingerprint(list(model.parameters())), group.participants

    with ThreadGroup(3, on_failure="drop") as tg:
        results = tg.run(fn, tg, timeout=120)
    assert len({r[0] for r in results}) == 1, results
    assert all(r[1] == (0, 1, 2) for r in results)


def _steps(model, opt, rank, n, until_joined=None, extra=0):
    """``n`` steps; with ``until_joined``, steps until it holds (bounded), then ``extra`` more."""
    i = 0

    def one() -> None:
        nonlocal i
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(rank * 10_000 + i))
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), x[:, :1].sin()).backward()
        opt.step()
        i += 1

    if until_joined is None:
        for _ in range(n):
            one()
        return
    while not until_joined():
        assert i < 2000, "the joiner was never admitted"
        one()
    for _ in range(extra):
        one()
