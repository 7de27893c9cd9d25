"""DeMo as an optimizer: hyperparameters, every case of issue 6 item 2, state, peers."""

from __future__ import annotations

import copy

import pytest
import torch
from _demo_util import batch, make_mlp, train_step

from lowband.distro import DeMo
from lowband.errors import ConfigError
from lowband.testing import ThreadGroup, flat_params
from lowband.testing import load_state_bytes as load_checkpoint
from lowband.testing import state_bytes as checkpoint


@pytest.fixture
def solo():
    with ThreadGroup(1) as tg:
        yield tg.groups[0]


@pytest.mark.parametrize(
    "bad",
    [
        {"lr": -1.0},
        {"lr": float("nan")},
        {"decay": 1.5},
        {"topk": 0},
        {"topk": 300},
        {"topk": 2.0},
        {"chunk": 0},
        {"chunk": 512},
        {"sign": 1},
        {"weight_decay": -0.1},
        {"codec": "topk:k=8,tile=64+sign"},
        {"codec": "no-such-codec"},
        {"overlap": "yes"},
    ],
)
def test_bad_hyperparameters_raise_config_error(solo, bad) -> None:
    kw = {"lr": 1e-3, **bad}
    with pytest.raises(ConfigError):
        DeMo(make_mlp().parameters(), group=solo, **kw)


def test_group_is_required_and_groups_validate_their_overrides(solo) -> None:
    with pytest.raises(ConfigError):
        DeMo(make_mlp().parameters(), lr=1e-3, group=None)
    m = make_mlp()
    opt = DeMo([{"params": m[0].parameters(), "topk": 4}], lr=1e-3, group=solo)
    assert opt.param_groups[0]["topk"] == 4 and opt.defaults["topk"] == 32
    with pytest.raises(ConfigError):
        opt.add_param_group({"params": m[2].parameters(), "chunk": -3})


def test_parameter_without_grad_is_skipped(solo) -> None:
    m = make_mlp()
    frozen = torch.nn.Parameter(torch.randn(64, 64))
    before = frozen.detach().clone()
    opt = DeMo([*m.parameters(), frozen], lr=1e-2, group=solo, topk=8, weight_decay=0.1)
    for s in range(3):
        train_step(m, opt, 0, s)
    assert torch.equal(frozen.detach(), before)
    assert frozen not in opt.state
    assert all(opt.momentum(p) is not None for p in m.parameters())
    assert opt.momentum(frozen) is None


def test_4d_and_prime_shaped_weights(solo) -> None:
    conv = torch.nn.Conv2d(3, 8, 3)
    emb = torch.nn.Parameter(torch.randn(50257, 7) * 0.01)
    opt = DeMo([*conv.parameters(), emb], lr=1e-2, group=solo, topk=8)
    start = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    x = torch.randn(2, 3, 9, 9)
    tok = torch.tensor([0, 17, 50256])
    for _ in range(2):
        opt.zero_grad()
        (conv(x).square().mean() + emb[tok].sum()).backward()
        opt.step()
    for p, p0 in zip(opt.param_groups[0]["params"], start):
        m = opt.momentum(p)
        assert m.shape == p.shape and m.dtype == torch.float32
        assert not torch.equal(p.detach(), p0)
    # Sign updates move every coordinate of a tile the IDCT touches: the embedding's rows
    # near the used tokens changed by exactly lr.
    assert torch.allclose((emb.detach() - start[2])[50256].abs(), torch.full((7,), 2e-2), atol=1e-6)
    # One payload per tile size: conv weight (64x3 tiles), bias (1x8), embedding (64x7).
    assert opt.stats.syncs == 2


def test_bf16_momentum_decays_in_fp32(solo) -> None:
    # With decay 0.999 a bf16 momentum would stall: 0.999 * x rounds back to x in bf16.
    assert torch.equal(
        torch.tensor(3.0, dtype=torch.bfloat16) * 0.999, torch.tensor(3.0, dtype=torch.bfloat16)
    )
    p16 = torch.nn.Parameter(torch.randn(96, 80).bfloat16())
    p32 = torch.nn.Parameter(p16.detach().float())
    o16 = DeMo([p16], lr=1e-3, group=solo, topk=4, decay=0.999)
    o32 = DeMo([p32], lr=1e-3, group=solo, topk=4, decay=0.999)
    g = torch.Generator().manual_seed(0)
    norms = []
    for s in range(30):
        grad = (
            torch.randn(96, 80, generator=g).bfloat16() if s < 3 else torch.zeros(96, 80).bfloat16()
        )
        p16.grad, p32.grad = grad, grad.float()
        o16.step()
        o32.step()
        m = o16.momentum(p16)
        assert o16.state[p16]["momentum_dct"].dtype == torch.float32
        # The momentum depends only on the gradients: bf16 and fp32 parameters agree bit for bit.
        assert torch.equal(o16.state[p16]["momentum_dct"], o32.state[p32]["momentum_dct"])
        norms.append(float(m.norm()))
    assert all(b < a for a, b in zip(norms[3:], norms[4:]))  # keeps shrinking, never stalls
    assert p16.dtype == torch.bfloat16


def test_mixed_dtypes_in_one_optimizer(solo) -> None:
    m = make_mlp()
    m[2].to(torch.bfloat16)
    opt = DeMo(m.parameters(), lr=1e-2, group=solo, topk=8)
    start = [p.detach().clone() for p in m.parameters()]
    x, y = batch(0, 0)
    for _ in range(3):
        opt.zero_grad()
        h = torch.tanh(m[0](x)).bfloat16()
        torch.nn.functional.mse_loss(m[2](h).float(), y).backward()
        opt.step()
    assert [p.dtype for p in m.parameters()] == [torch.float32] * 2 + [torch.bfloat16] * 2
    assert all(v.dtype == torch.float32 for p in m.parameters() for v in opt.state[p].values())
    assert all(not torch.equal(p.detach(), s) for p, s in zip(m.parameters(), start))


def test_closure_runs_before_the_update(solo) -> None:
    m = make_mlp()
    opt = DeMo(m.parameters(), lr=1e-2, group=solo, topk=8)
    x, y = batch(0, 0)
    seen = []

    def closure() -> torch.Tensor:
        seen.append(flat_params(m))
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        return loss

    first = flat_params(m)
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert torch.equal(seen[0], first)  # the closure saw the parameters before the step
    assert not torch.equal(flat_params(m), first)  # and its gradients drove the step
    assert all(p.grad is not None for p in m.parameters())


def test_weight_decay_is_decoupled(solo) -> None:
    p = torch.nn.Parameter(torch.full((8, 8), 2.0))
    opt = DeMo([p], lr=0.1, group=solo, weight_decay=0.5, topk=4)
    p.grad = torch.zeros(8, 8)
    opt.step()  # zero momentum: the only change is p *= 1 - lr * wd
    assert torch.equal(p.detach(), torch.full((8, 8), 2.0 * (1 - 0.1 * 0.5)))


def _run(group, *, overlap: bool, steps: int, save_at: int | None = None):
    torch.manual_seed(0)
    m = make_mlp()
    m[2].to(torch.bfloat16)
    opt = DeMo(m.parameters(), lr=3e-3, group=group, topk=8, weight_decay=0.01, overlap=overlap)
    saved = None
    for s in range(steps):
        if s == save_at:
            saved = checkpoint(m, opt)
        x, y = batch(group.rank, s)
        opt.zero_grad()
        torch.nn.functional.mse_loss(m[2](torch.tanh(m[0](x)).bfloat16()).float(), y).backward()
        opt.step()
    return m, opt, saved


def _resume(group, saved: bytes, *, overlap: bool, start: int, steps: int):
    m = make_mlp(seed=123)  # different init: everything must come from the checkpoint
    m[2].to(torch.bfloat16)
    opt = DeMo(m.parameters(), lr=1.0, group=group, topk=8, overlap=overlap)
    ck = load_checkpoint(saved)
    m.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    assert opt.param_groups[0]["lr"] == 3e-3
    for s in range(start, steps):
        x, y = batch(group.rank, s)
        opt.zero_grad()
        torch.nn.functional.mse_loss(m[2](torch.tanh(m[0](x)).bfloat16()).float(), y).backward()
        opt.step()
    return m, opt


@pytest.mark.parametrize("overlap", [False, True])
def test_state_dict_resume_is_bit_for_bit(overlap: bool) -> None:
    def body(group):
        full, full_opt, saved = _run(group, overlap=overlap, steps=8, save_at=5)
        resumed, res_opt = _resume(group, saved, overlap=overlap, start=5, steps=8)
        return full, full_opt, resumed, res_opt

    with ThreadGroup(2) as tg:
        for full, full_opt, resumed, res_opt in tg.run(body):
            for a, b in zip(full.parameters(), resumed.parameters()):
                assert a.dtype == b.dtype and torch.equal(a, b)
            for a, b in zip(full.parameters(), resumed.parameters()):
                sa, sb = full_opt.state[a], res_opt.state[b]
                assert sorted(sa) == sorted(sb)
                for key in sa:
                    assert sb[key].dtype == torch.float32 and torch.equal(sa[key], sb[key])


def test_load_keeps_fp32_momentum_of_bf16_parameter(solo) -> None:
    p = torch.nn.Parameter(torch.randn(70, 70).bfloat16())
    opt = DeMo([p], lr=1e-3, group=solo, topk=8)
    p.grad = torch.randn(70, 70).bfloat16()
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    other = DeMo([p], lr=1e-3, group=solo, topk=8)
    other.load_state_dict(sd)
    m = other.state[p]["momentum_dct"]
    assert m.dtype == torch.float32 and torch.equal(m, opt.state[p]["momentum_dct"])
