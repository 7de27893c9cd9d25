"""DeMo across peers: identical results, the one-step-delayed variant, bytes, convergence."""

from __future__ import annotations

import pytest
import torch
from _demo_util import batch, make_mlp, train_step

from lowband.distro import DeMo
from lowband.errors import ConfigMismatch
from lowband.testing import ThreadGroup, flat_params


@pytest.mark.parametrize("overlap", [False, True])
def test_every_peer_ends_with_identical_parameters(overlap: bool) -> None:
    def body(group):
        m = make_mlp()
        opt = DeMo(m.parameters(), lr=3e-3, group=group, topk=8, overlap=overlap)
        for s in range(6):
            train_step(m, opt, group.rank, s)  # each rank has its own data
        return flat_params(m), [opt.momentum(p) for p in m.parameters()]

    with ThreadGroup(3) as tg:
        out = tg.run(body)
    start = flat_params(make_mlp())
    for params, momenta in out[1:]:
        assert torch.equal(params, out[0][0])
        # Momenta are each peer's own (its data, its residual): they differ.
        assert not torch.equal(momenta[0], out[0][1][0])
    assert not torch.equal(out[0][0], start)


def test_overlap_applies_each_update_one_step_later() -> None:
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(80, 96, generator=g) for _ in range(6)]
    runs, last = {}, {}
    with ThreadGroup(1) as tg:
        for overlap in (False, True):
            p = torch.nn.Parameter(torch.randn(80, 96, generator=torch.Generator().manual_seed(1)))
            opt = DeMo([p], lr=1e-2, group=tg.groups[0], topk=8, overlap=overlap)
            trace = []
            for gr in grads:
                p.grad = gr.clone()  # gradients that do not depend on p: same momenta in both runs
                opt.step()
                trace.append(p.detach().clone())
            runs[overlap] = trace
            last[overlap] = _flushed(p, opt)
    start = torch.randn(80, 96, generator=torch.Generator().manual_seed(1))
    assert torch.equal(runs[True][0], start)  # step 0's exchange has not been applied yet
    for t in range(5):
        assert torch.equal(runs[True][t + 1], runs[False][t])
    assert torch.equal(last[True], runs[False][5])  # flush() applied the last one


def _flushed(p: torch.Tensor, opt: DeMo) -> torch.Tensor:
    opt.flush()
    return p.detach().clone()


def test_stats_count_the_payload_bytes_each_peer_sends() -> None:
    n_steps = 4

    def body(group):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 128))
        opt = DeMo(m.parameters(), lr=1e-3, group=group, topk=8)
        handshake = group.stats.bytes_sent
        for _ in range(n_steps):
            opt.zero_grad()
            m(torch.randn(4, 256)).square().mean().backward()
            opt.step()
        dense = sum(p.numel() for p in m.parameters()) * 4
        return opt.stats.as_dict(), group.stats.bytes_sent - handshake, dense

    with ThreadGroup(3) as tg:
        out = tg.run(body)
    for mine, group_sent, dense in out:
        assert mine["syncs"] == n_steps
        # One bucket (the 24 64x64 tiles of the weights and the biases packed into one more
        # tile) to each of two peers per step.
        assert mine["messages"] == 1 * 2 * n_steps
        # The group's own counter agrees: every payload byte it sent was DeMo's.
        assert mine["bytes_sent"] == group_sent
        per_step = mine["bytes_sent"] / n_steps / 2
        # 25 tiles of 17 bytes (8 indices of 12 bits, 8 sign bits, one fp32 scale) + a header.
        assert 25 * 17 < per_step < 25 * 17 + 200, per_step
        assert dense / per_step > 600, (dense, per_step)
        assert set(mine["per_peer"]) == {0, 1, 2} - {out.index((mine, group_sent, dense))}


def test_two_peers_converge() -> None:
    def body(group):
        m = make_mlp()
        opt = DeMo(m.parameters(), lr=3e-3, group=group, topk=8)
        x, y = batch(group.rank, 10_000)
        with torch.no_grad():
            start = float(torch.nn.functional.mse_loss(m(x), y))
        for s in range(100):
            train_step(m, opt, group.rank, s)
        with torch.no_grad():
            return start, float(torch.nn.functional.mse_loss(m(x), y))

    with ThreadGroup(2) as tg:
        for start, end in tg.run(body):
            assert end < 0.35 * start, (start, end)


def test_peers_start_from_rank_0_parameters() -> None:
    def body(group):
        m = make_mlp(seed=group.rank)  # seeded differently on purpose
        DeMo(m.parameters(), lr=1e-3, group=group)
        return flat_params(m)

    with ThreadGroup(3) as tg:
        out = tg.run(body)
    assert torch.equal(out[0], flat_params(make_mlp(seed=0)))
    assert all(torch.equal(o, out[0]) for o in out[1:])


def test_peers_with_other_settings_or_shapes_fail_clearly() -> None:
    def settings(group):
        DeMo(make_mlp().parameters(), lr=1e-3, group=group, topk=8 if group.rank else 16)

    def shapes(group):
        m = make_mlp() if group.rank else torch.nn.Linear(16, 4)
        DeMo(m.parameters(), lr=1e-3, group=group)

    for fn in (settings, shapes):
        with ThreadGroup(2) as tg:
            errors = tg.run(fn, return_exceptions=True)
        assert all(isinstance(e, ConfigMismatch) for e in errors), errors
