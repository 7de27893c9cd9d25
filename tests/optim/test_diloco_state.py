"""DiLoCo checkpoints resume bit for bit; GradScaler skips keep peers in lockstep."""

from __future__ import annotations

import copy

import pytest
import torch
from optim_helpers import batch, make_model, run_ranks, train_step

from lowband.compress import ErrorFeedback, parse
from lowband.errors import ConfigMismatch
from lowband.optim import DiLoCo, sparseloco


def build(group, model, **kwargs):
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return DiLoCo(inner, group=group, **kwargs)


SETTINGS = {
    "q4+ef, fragments, overlap": dict(
        sync_every=4, codec="q4", error_feedback=0.9, fragments=2, overlap=1
    ),
    "dense, nesterov": dict(sync_every=3),
}


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_mid_run_is_bit_for_bit(name: str, dtype: torch.dtype) -> None:
    kwargs = SETTINGS[name]

    def run(group):
        model = make_model(dtype=dtype)
        opt = build(group, model, **kwargs)
        for t in range(6):  # with overlap, a sync launched at step 6 is still in flight
            train_step(model, opt, group.rank, t)
        saved_opt = copy.deepcopy(opt.state_dict())
        saved_model = copy.deepcopy(model.state_dict())
        for t in range(6, 13):
            train_step(model, opt, group.rank, t)
        first = [p.detach().clone() for p in model.parameters()]

        resumed = make_model(seed=7 + group.rank, dtype=dtype)
        resumed.load_state_dict(saved_model)
        opt2 = build(group, resumed, **kwargs)
        opt2.load_state_dict(saved_opt)
        for t in range(6, 13):
            train_step(resumed, opt2, group.rank, t)
        second = [p.detach().clone() for p in resumed.parameters()]
        glob = saved_opt["diloco"]["global"]
        return first, second, [(g.dtype, g.device) for g in glob], opt2.stats.syncs

    for first, second, kinds, syncs in run_ranks(2, run):
        assert syncs > 0
        assert all(k == (torch.float32, torch.device("cpu")) for k in kinds)
        for a, b in zip(first, second):
            assert a.dtype == dtype
            assert torch.equal(a, b)


def test_state_dict_holds_outer_momentum_and_error_feedback() -> None:
    def run(group):
        model = make_model()
        opt = build(group, model, sync_every=2, codec="q2", error_feedback=True)
        for t in range(4):
            train_step(model, opt, group.rank, t)
        return opt.state_dict()

    sd = run_ranks(2, run)[0]["diloco"]
    assert sd["step"] == 4
    momentum = [s["momentum_buffer"] for s in sd["outer"]["state"].values()]
    assert momentum and all(m.dtype == torch.float32 and m.abs().sum() > 0 for m in momentum)
    residuals = sd["error_feedback"]["residuals"]
    assert residuals and all(r.abs().sum() > 0 for r in residuals.values())
    assert sd["config"]["codec"] == "q2"


def test_load_refuses_a_checkpoint_of_other_settings() -> None:
    def run(group):
        model = make_model()
        sd = build(group, model, sync_every=2).state_dict()
        other = build(group, make_model(), sync_every=3)
        with pytest.raises(ConfigMismatch):
            other.load_state_dict(sd)

    run_ranks(1, run)


def test_outer_state_keeps_its_saved_dtype() -> None:
    # torch's loader casts state to the parameter's dtype; a bf16 model must still
    # get back an fp32 global copy and fp32 outer momentum.
    def run(group):
        model = make_model(dtype=torch.bfloat16)
        opt = build(group, model, sync_every=1)
        train_step(model, opt, 0, 0)
        sd = copy.deepcopy(opt.state_dict())
        opt2 = build(group, model, sync_every=1)
        opt2.load_state_dict(sd)
        bufs = [opt2.outer_optimizer.state[g]["momentum_buffer"] for g in opt2._global]
        return [b.dtype for b in bufs], [g.dtype for g in opt2._global]

    mom, glob = run_ranks(1, run)[0]
    assert set(mom) == {torch.float32} and set(glob) == {torch.float32}


def test_grad_scaler_inf_on_one_peer_keeps_peers_in_lockstep() -> None:
    """Rank 1 gets an inf at its third step: its inner step is skipped, rank 0's is not, and
    both still sync at the same counts (the schedule counts calls to step())."""

    def run(group):
        model = make_model()
        inner = torch.optim.SGD(model.parameters(), lr=0.1)
        opt = DiLoCo(
            inner, group=group, sync_every=2, outer_lr=1.0, outer_momentum=0.0, nesterov=False
        )
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        changed = []
        for t in range(4):
            x, y = batch(group.rank, t)
            opt.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            if t == 2 and group.rank == 1:
                next(model.parameters()).grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
            changed.append(any(not torch.equal(a, p) for a, p in zip(before, model.parameters())))
        return (
            changed,
            opt.stats.syncs,
            scaler.get_scale(),
            [p.detach().clone() for p in model.parameters()],
        )

    (c0, s0, scale0, p0), (c1, s1, scale1, p1) = run_ranks(2, run)
    assert c0 == [True, True, True, True]
    # third step on rank 1: no inner step and no sync (count 3), so nothing moved;
    # the sync at count 4 still ran on both peers
    assert c1 == [True, True, False, True]
    assert s0 == s1 == 2
    assert scale0 == 1024.0 and scale1 == 512.0  # the scaler backed off on rank 1 only
    for a, b in zip(p0, p1):
        assert torch.equal(a, b)  # synced at count 4, identical again


def test_grad_scaler_unscales_before_the_inner_step() -> None:
    def run(group):
        ref = make_model()
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        model = make_model()
        opt = DiLoCo(torch.optim.SGD(model.parameters(), lr=0.1), group=group, sync_every=100)
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        for t in range(3):
            train_step(ref, ref_opt, 0, t)
            x, y = batch(0, t)
            opt.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
        return list(ref.parameters()), list(model.parameters())

    ref, got = run_ranks(1, run)[0]
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_sparseloco_recipe_sets_its_parts() -> None:
    def run(group):
        model = make_model()
        opt = sparseloco(torch.optim.AdamW(model.parameters(), lr=1e-3), group=group)
        for t in range(2):
            train_step(model, opt, 0, t)
        return opt

    opt = run_ranks(1, run)[0]
    assert str(opt.codec) == str(parse("topk:k=64,tile=4096+q2"))
    assert isinstance(opt.error_feedback, ErrorFeedback) and opt.error_feedback.decay == 0.95
    outer = opt.outer_optimizer
    assert isinstance(outer, torch.optim.SGD)
    assert outer.param_groups[0]["lr"] == 1.0 and outer.param_groups[0]["momentum"] == 0.0
    assert opt.sync_every == 50


def test_grad_scaler_inf_on_every_peer_skips_every_inner_step_alike() -> None:
    def run(group):
        model = make_model()
        inner = torch.optim.AdamW(model.parameters(), lr=0.1)
        opt = DiLoCo(inner, group=group, sync_every=3)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for t in range(6):
            x, y = batch(group.rank, t)
            opt.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            if t in (1, 4):
                next(model.parameters()).grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        p = next(model.parameters())
        return int(inner.state[p]["step"]), opt.stats.syncs, p.detach().clone()

    (s0, y0, p0), (s1, y1, p1) = run_ranks(2, run)
    assert s0 == s1 == 4  # two of six inner steps skipped on both peers
    assert y0 == y1 == 2
    assert torch.equal(p0, p1)


def _resume_with_scheduler(group, build_opt):
    """Train 12 steps under a StepLR that changes lr every 2 steps, uninterrupted and
    resumed at step 5 into a fresh model, optimizer and scheduler; return both runs'
    parameters and the lr the inner optimizer really used at each resumed step."""

    def fresh(seed):
        model = make_model(seed=seed)
        opt = build_opt(group, model)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return model, opt, sched

    model, opt, sched = fresh(0)
    for t in range(5):
        train_step(model, opt, group.rank, t)
        sched.step()
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
    for t in range(5, 12):
        train_step(model, opt, group.rank, t)
        sched.step()
    first = [p.detach().clone() for p in model.parameters()]

    model2, opt2, sched2 = fresh(7 + group.rank)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    inner_lrs = []
    for t in range(5, 12):
        inner_lrs.append((opt2.inner.param_groups[0]["lr"], opt2.param_groups[0]["lr"]))
        train_step(model2, opt2, group.rank, t)
        sched2.step()
    second = [p.detach().clone() for p in model2.parameters()]
    return first, second, inner_lrs, opt2.param_groups is opt2.inner.param_groups


def test_resume_with_a_scheduler_is_bit_for_bit() -> None:
    def run(group):
        return _resume_with_scheduler(
            group, lambda g, m: build(g, m, sync_every=3, codec="q4", error_feedback=True)
        )

    for first, second, lrs, shared in run_ranks(2, run):
        assert shared
        assert all(inner == outer for inner, outer in lrs)
        assert len({inner for inner, _ in lrs}) >= 3  # the scheduler did change the lr
        for a, b in zip(first, second):
            assert torch.equal(a, b)
