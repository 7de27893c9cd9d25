"""CompressedGradients on in-process groups, and the DDP hook's error-feedback keying."""

from __future__ import annotations

import copy

import pytest
import torch
from optim_helpers import batch, make_model, run_ranks, train_step

from lowband.errors import ConfigError
from lowband.optim import CompressedGradients, ddp_comm_hook


def grads_of(model, rank, step):
    m = copy.deepcopy(model)
    x, y = batch(rank, step)
    torch.nn.functional.mse_loss(m(x), y).backward()
    return [p.grad.detach().clone() for p in m.parameters()]


def test_dense_equals_data_parallel_sgd() -> None:
    n, steps = 3, 4
    ref = make_model()
    for t in range(steps):
        per_rank = [grads_of(ref, r, t) for r in range(n)]
        with torch.no_grad():
            for p, *gs in zip(ref.parameters(), *per_rank):
                p -= 0.1 * torch.stack(gs).mean(0)

    def run(group):
        model = make_model()
        opt = CompressedGradients(
            torch.optim.SGD(model.parameters(), lr=0.1), group=group, codec=None
        )
        for t in range(steps):
            train_step(model, opt, group.rank, t)
        return [p.detach().clone() for p in model.parameters()], opt.stats.syncs

    for got, syncs in run_ranks(n, run):
        assert syncs == steps
        for a, b in zip(ref.parameters(), got):
            torch.testing.assert_close(b, a.detach(), rtol=1e-5, atol=1e-6)


def test_q8_with_error_feedback_stays_close_to_dense() -> None:
    def run(group, codec):
        model = make_model()
        opt = CompressedGradients(
            torch.optim.SGD(model.parameters(), lr=0.1), group=group, codec=codec
        )
        for t in range(6):
            train_step(model, opt, group.rank, t)
        return [p.detach().clone() for p in model.parameters()], opt.stats.bytes_sent

    (dense, dense_bytes), _ = run_ranks(2, lambda g: run(g, None))
    (q8, q8_bytes), _ = run_ranks(2, lambda g: run(g, "q8"))
    start = list(make_model().parameters())
    for d, q, s in zip(dense, q8, start):
        moved = (d - s.detach()).abs().max()
        assert (q - d).abs().max() <= 0.05 * moved
    assert q8_bytes < dense_bytes / 2  # headers weigh on a 212-value model


def test_grad_scaler_inf_on_one_peer_skips_every_peer() -> None:
    def run(group):
        model = make_model()
        inner = torch.optim.SGD(model.parameters(), lr=0.1)
        opt = CompressedGradients(inner, group=group, codec="q8")
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        moved = []
        for t in range(3):
            x, y = batch(group.rank, t)
            opt.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            if t == 1 and group.rank == 1:
                next(model.parameters()).grad[0, 0] = float("nan")
            before = [p.detach().clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
            moved.append(any(not torch.equal(a, p) for a, p in zip(before, model.parameters())))
        return moved, [p.detach().clone() for p in model.parameters()]

    (m0, p0), (m1, p1) = run_ranks(2, run)
    assert m0 == m1 == [True, False, True]
    for a, b in zip(p0, p1):
        assert torch.equal(a, b)


def test_parameter_without_grad_gets_the_average_of_peers_that_had_one() -> None:
    def run(group):
        model = make_model()
        opt = CompressedGradients(
            torch.optim.SGD(model.parameters(), lr=0.1), group=group, codec=None
        )
        x, y = batch(group.rank, 0)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        last = list(model.parameters())[-1]
        if group.rank == 1:
            last.grad = None
        mine = None if last.grad is None else last.grad.clone()
        opt.reduce_gradients()
        return mine, last.grad.clone()

    (g0, avg0), (g1, avg1) = run_ranks(2, run)
    assert g1 is None
    torch.testing.assert_close(avg0, g0 / 2)
    assert torch.equal(avg0, avg1)


def test_error_feedback_round_trips_through_state_dict() -> None:
    def run(group):
        model = make_model()
        opt = CompressedGradients(
            torch.optim.SGD(model.parameters(), lr=0.1), group=group, codec="q2"
        )
        train_step(model, opt, group.rank, 0)
        sd = copy.deepcopy(opt.state_dict())
        opt2 = CompressedGradients(
            torch.optim.SGD(model.parameters(), lr=0.1), group=group, codec="q2"
        )
        opt2.load_state_dict(sd)
        return opt.error_feedback.residuals, opt2.error_feedback.residuals

    a, b = run_ranks(1, run)[0]
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]) and a[k].abs().sum() > 0


def test_bad_arguments() -> None:
    def run(group):
        with pytest.raises(ConfigError):
            CompressedGradients(object(), group=group, codec="q4")  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            CompressedGradients(
                torch.optim.SGD(make_model().parameters(), lr=0.1),
                group=group,
                codec=None,
                error_feedback=0.9,
            )
        with pytest.raises(ValueError):
            CompressedGradients(
                torch.optim.SGD(make_model().parameters(), lr=0.1), group=group, codec="q7"
            )

    run_ranks(1, run)


class _Bucket:
    """Stands in for ``dist.GradBucket`` (same methods): a flat buffer and its views."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self._params = params
        self._buf = torch.zeros(sum(p.numel() for p in params))
        self._views = []
        o = 0
        for p in params:
            self._views.append(self._buf[o : o + p.numel()].view_as(p))
            o += p.numel()

    def buffer(self) -> torch.Tensor:
        return self._buf

    def parameters(self) -> list[torch.Tensor]:
        return self._params

    def gradients(self) -> list[torch.Tensor]:
        return self._views


def test_ddp_hook_error_feedback_follows_parameters_across_bucket_rebuilds() -> None:
    a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (5, 7, 3))

    def run(group):
        hook = ddp_comm_hook(group, "q2")
        first = [_Bucket([a, b]), _Bucket([c])]
        for bk, vals in zip(first, (torch.linspace(-1, 1, 12), torch.tensor([0.3, -0.7, 0.05]))):
            bk.buffer().copy_(vals)
            hook(None, bk).wait()
        ef = hook.error_feedback
        before = _per_param(hook, first)
        assert all(r.abs().sum() > 0 for r in before.values())
        # DDP rebuilt its buckets: new groupings, new order
        rebuilt = _Bucket([c, a, b])
        key = hook._key(rebuilt, rebuilt.buffer())
        assert set(ef.residuals) == {key}
        after = _per_param(hook, [rebuilt])
        for p in (a, b, c):
            assert torch.equal(after[id(p)], before[id(p)])

    run_ranks(1, run)


def _per_param(hook, buckets) -> dict[int, torch.Tensor]:
    out = {}
    for bk in buckets:
        for p in bk.parameters():
            key, start, stop = hook._where[id(p)]
            out[id(p)] = hook.error_feedback.residuals[key][start:stop].clone()
    return out


def test_resume_with_a_scheduler_is_bit_for_bit() -> None:
    from test_diloco_state import _resume_with_scheduler

    def run(group):
        return _resume_with_scheduler(
            group,
            lambda g, m: CompressedGradients(
                torch.optim.AdamW(m.parameters(), lr=1e-2), group=g, codec="q4"
            ),
        )

    for first, second, lrs, shared in run_ranks(2, run):
        assert shared
        assert all(inner == outer for inner, outer in lrs)
        for a, b in zip(first, second):
            assert torch.equal(a, b)
