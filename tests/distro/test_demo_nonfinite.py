"""DeMo.step that raises on a NaN or Inf gradient changes nothing (issue 15, item 12):
no weight decay, no momentum change, so the next clean steps work."""

from __future__ import annotations

import copy

import pytest
import torch
from _demo_util import batch, make_mlp, train_step

from lowband.distro import DeMo
from lowband.errors import LowbandError
from lowband.testing import ThreadGroup


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("where", [0, 1])  # a matrix, a bias (the packed 1-D path)
def test_a_step_that_raises_changes_nothing(overlap: bool, where: int) -> None:
    def run(group, inject: bool):
        m = make_mlp()
        opt = DeMo(m.parameters(), lr=1e-2, group=group, topk=4, chunk=8, weight_decay=0.1,
                   codec="q4", overlap=overlap)
        for s in range(3):
            train_step(m, opt, group.rank, s)
        raised = None
        if inject:
            x, y = batch(group.rank, 99)
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            list(m.parameters())[where].grad.view(-1)[2] = float("nan")
            params = [p.detach().clone() for p in m.parameters()]
            # no state_dict(): with overlap it would finish the exchange in flight
            state = [copy.deepcopy(dict(opt.state.get(p, {}))) for p in m.parameters()]
            try:
                opt.step()
            except LowbandError as e:
                raised = e
            assert all(torch.equal(a, p) for a, p in zip(params, m.parameters()))
            assert _same(state, [dict(opt.state.get(p, {})) for p in m.parameters()])
        for s in range(3, 6):
            train_step(m, opt, group.rank, s)
        opt.flush()
        return raised, [p.detach().clone() for p in m.parameters()]

    with ThreadGroup(2) as tg:
        bad = tg.run(lambda g: run(g, True), timeout=120)
        ref = tg.run(lambda g: run(g, False), timeout=120)
    for (raised, got), (_, want) in zip(bad, ref):
        assert isinstance(raised, ValueError) and "NaN or Inf" in str(raised)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
