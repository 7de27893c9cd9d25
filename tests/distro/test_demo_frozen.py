"""DeMo and requires_grad=False parameters (issue 13, item 8): never sent nor stepped,
even holding a stale gradient, and every peer must agree on which they are."""

from __future__ import annotations

import torch
from _demo_util import batch, make_mlp

from lowband.distro import DeMo
from lowband.errors import ConfigMismatch
from lowband.testing import ThreadGroup


def _run(group, *, with_frozen: bool):
    m = make_mlp()
    g = torch.Generator().manual_seed(0)  # not the global generator: ranks are threads
    base = torch.nn.Parameter(torch.randn(256, 256, generator=g), requires_grad=False)
    before = base.detach().clone()
    params = [*m.parameters(), base] if with_frozen else list(m.parameters())
    opt = DeMo(params, lr=1e-2, group=group, topk=4, chunk=16, weight_decay=0.1)
    for s in range(3):
        x, y = batch(group.rank, s)
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        if with_frozen:
            base.grad = torch.ones_like(base)  # stale: as if left from before it was frozen
        opt.step()
    return opt.stats.bytes_sent, torch.equal(base.detach(), before), base not in opt.state


def test_frozen_parameter_is_neither_sent_nor_stepped() -> None:
    with ThreadGroup(2) as tg:
        lora = tg.run(lambda g: _run(g, with_frozen=True), timeout=120)
        alone = tg.run(lambda g: _run(g, with_frozen=False), timeout=120)
    for (sent, same, no_state), (sent_alone, _, _) in zip(lora, alone):
        assert sent == sent_alone > 0
        assert same and no_state


def test_peers_must_agree_on_which_parameters_are_frozen() -> None:
    def run(group):
        m = make_mlp()
        list(m.parameters())[group.rank].requires_grad_(False)
        try:
            DeMo(m.parameters(), lr=1e-2, group=group)
        except ConfigMismatch as e:
            return e
        return None

    with ThreadGroup(2) as tg:
        assert all(isinstance(e, ConfigMismatch) for e in tg.run(run, timeout=120))
