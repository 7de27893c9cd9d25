"""A step that raises on a NaN or Inf gradient changes nothing (issue 15, item 12)."""

from __future__ import annotations

import copy

import pytest
import torch
from optim_helpers import batch, make_model, run_ranks, train_step

from lowband.errors import LowbandError
from lowband.optim import CompressedGradients, DiLoCo

BUILDERS = {
    "diloco q4+ef": lambda m, g: DiLoCo(
        torch.optim.AdamW(m.parameters(), lr=1e-2), group=g, sync_every=2, codec="q4",
        error_feedback=True,
    ),
    "diloco dense, overlap": lambda m, g: DiLoCo(
        torch.optim.AdamW(m.parameters(), lr=1e-2), group=g, sync_every=2, overlap=1
    ),
    "compressed q4+ef": lambda m, g: CompressedGradients(
        torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1), group=g, codec="q4"
    ),
}


def same(a, b) -> bool:
    """Bit-identical nested state (dicts, lists, tensors, numbers)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_step_that_raises_changes_nothing(name: str, bad: float) -> None:
    def run(group, inject: bool):
        model = make_model()
        opt = BUILDERS[name](model, group)
        for t in range(3):  # past a sync, with error-feedback residuals and outer momentum
            train_step(model, opt, group.rank, t)
        raised = None
        if inject:
            x, y = batch(group.rank, 99)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            list(model.parameters())[1].grad[3] = bad  # on every rank, as a real overflow may be
            params = [p.detach().clone() for p in model.parameters()]
            state = copy.deepcopy(opt.state_dict())
            try:
                opt.step()
            except LowbandError as e:
                raised = e
            assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
            assert same(state, opt.state_dict())
        for t in range(3, 7):  # then clean steps work: as if the bad one never came
            train_step(model, opt, group.rank, t)
        return raised, [p.detach().clone() for p in model.parameters()], opt.stats.syncs

    for (raised, got, syncs), (_, ref, ref_syncs) in zip(
        run_ranks(2, lambda g: run(g, True)), run_ranks(2, lambda g: run(g, False))
    ):
        assert isinstance(raised, ValueError) and "NaN or Inf" in str(raised)
        assert syncs == ref_syncs
        assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_reduce_gradients_that_raises_changes_nothing() -> None:
    def run(group):
        model = make_model()
        opt = BUILDERS["compressed q4+ef"](model, group)
        train_step(model, opt, group.rank, 0)
        residuals = copy.deepcopy(opt.error_feedback.state_dict())
        for p in model.parameters():
            p.grad = torch.full_like(p, float("nan"))
        with pytest.raises(LowbandError):
            opt.reduce_gradients()
        assert same(residuals, opt.error_feedback.state_dict())
        train_step(model, opt, group.rank, 1)
        return opt.stats.syncs

    assert run_ranks(2, run) == [2, 2]
