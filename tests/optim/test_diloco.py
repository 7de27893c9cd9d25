"""DiLoCo against plain training and parameter averaging, on in-process groups."""

from __future__ import annotations

import copy

import pytest
import torch
from optim_helpers import batch, make_model, run_ranks, train_step

from lowband.errors import ConfigError, ConfigMismatch
from lowband.optim import DiLoCo
from lowband.testing import RecordingGroup

PLAIN = dict(outer_lr=1.0, outer_momentum=0.0, nesterov=False)


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("offload", ["cpu", "device"])
def test_one_peer_sync_every_step_equals_plain_training(offload: str) -> None:
    def run(group):
        ref = make_model()
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        model = make_model()
        opt = DiLoCo(
            torch.optim.AdamW(model.parameters(), lr=1e-2),
            group=group,
            sync_every=1,
            offload=offload,
            **PLAIN,
        )
        for t in range(10):
            train_step(ref, ref_opt, 0, t)
            train_step(model, opt, 0, t)
        return params_of(ref), params_of(model), opt.stats.syncs

    ref, got, syncs = run_ranks(1, run)[0]
    assert syncs == 10
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("H", [1, 3])
def test_several_peers_equal_parameter_averaging(H: int) -> None:
    n, steps = 3, 2 * H

    # Reference: each peer trains alone for H steps from the same start, then average.
    start = make_model()
    avg = params_of(start)
    for sync in range(steps // H):
        ends = []
        for rank in range(n):
            m = copy.deepcopy(start)
            with torch.no_grad():
                for p, a in zip(m.parameters(), avg):
                    p.copy_(a)
            o = torch.optim.SGD(m.parameters(), lr=0.1)
            for t in range(sync * H, (sync + 1) * H):
                train_step(m, o, rank, t)
            ends.append(params_of(m))
        avg = [torch.stack(ps).mean(0) for ps in zip(*ends)]

    def run(group):
        model = make_model()
        opt = DiLoCo(
            torch.optim.SGD(model.parameters(), lr=0.1), group=group, sync_every=H, **PLAIN
        )
        for t in range(steps):
            train_step(model, opt, group.rank, t)
        return params_of(model)

    for got in run_ranks(n, run):
        for a, b in zip(avg, got):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_dense_codec_matches_no_codec_within_its_error() -> None:
    def run(group, codec):
        model = make_model()
        opt = DiLoCo(
            torch.optim.SGD(model.parameters(), lr=0.1), group=group, sync_every=2, codec=codec
        )
        for t in range(6):
            train_step(model, opt, group.rank, t)
        return params_of(model)

    exact = run_ranks(2, lambda g: run(g, None))[0]
    q8 = run_ranks(2, lambda g: run(g, "q8"))[0]
    start = params_of(make_model())
    for e, q, s in zip(exact, q8, start):
        moved = (e - s).abs().max()
        assert moved > 1e-3  # training did move the parameters
        # q8 rounds each pseudo-gradient to 1/254 of its block's range; three syncs.
        assert (q - e).abs().max() <= 0.05 * moved
        assert not torch.equal(q, e)


def test_identical_start_broadcasts_rank0_parameters() -> None:
    def run(group):
        model = make_model(seed=group.rank)  # different on every peer
        DiLoCo(torch.optim.SGD(model.parameters(), lr=0.1), group=group, sync_every=4)
        return params_of(model)

    r0, r1 = run_ranks(2, run)
    for a, b, s in zip(r0, r1, params_of(make_model(seed=0))):
        assert torch.equal(a, b) and torch.equal(a, s)


def test_identical_start_sends_nothing_big_when_peers_agree() -> None:
    def run(group):
        group = RecordingGroup(group)
        model = make_model()
        opt = DiLoCo(torch.optim.SGD(model.parameters(), lr=0.1), group=group, sync_every=4)
        return opt.stats.bytes_sent, [c for c in group.calls]

    (sent, calls), _ = run_ranks(2, run)
    assert calls == ["verify", "broadcast", "all_reduce:"]  # settings and digests only
    assert sent < 200


def test_mismatched_settings_raise_on_every_peer() -> None:
    def run(group):
        model = make_model()
        try:
            DiLoCo(
                torch.optim.SGD(model.parameters(), lr=0.1), group=group, sync_every=4 + group.rank
            )
        except ConfigMismatch as e:
            return e
        return None

    assert all(isinstance(e, ConfigMismatch) for e in run_ranks(2, run))


def test_fragments_sync_at_staggered_steps() -> None:
    def run(group):
        group = RecordingGroup(group)
        model = make_model()
        opt = DiLoCo(
            torch.optim.SGD(model.parameters(), lr=0.1), group=group, sync_every=4, fragments=2
        )
        group.calls.clear()
        seen = []
        for t in range(8):
            train_step(model, opt, group.rank, t)
            seen.append([c for c in group.calls])
            group.calls.clear()
        return seen, [len(run) for run in opt._fragment_buckets]

    seen, _ = run_ranks(2, run)[0]
    keys = [sorted(c.split(":")[1] for c in s) for s in seen]
    # fragment 0 (bucket 0) at steps 2 and 6, fragment 1 (bucket 1) at steps 4 and 8
    assert keys == [[], ["diloco.0"], [], ["diloco.1"], [], ["diloco.0"], [], ["diloco.1"]]


def test_overlap_mixes_local_and_global_as_documented() -> None:
    def run(group):
        model = make_model()
        opt = DiLoCo(
            torch.optim.SGD(model.parameters(), lr=0.1),
            group=group,
            sync_every=3,
            overlap=1,
            mixing=0.5,
            **PLAIN,
        )
        ref = make_model()
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        for t in range(3):
            train_step(model, opt, 0, t)
            train_step(ref, ref_opt, 0, t)
        launched = params_of(
            ref
        )  # one peer, outer lr 1: the new global copy is the local one at launch
        assert opt.stats.syncs == 0
        train_step(model, opt, 0, 3)
        train_step(ref, ref_opt, 0, 3)
        assert opt.stats.syncs == 1
        expected = [0.5 * a + 0.5 * b for a, b in zip(params_of(ref), launched)]
        return expected, params_of(model)

    expected, got = run_ranks(1, run)[0]
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_scheduler_on_wrapper_changes_inner_lr() -> None:
    def run(group):
        model = make_model()
        inner = torch.optim.AdamW(model.parameters(), lr=1.0)
        opt = DiLoCo(inner, group=group, sync_every=2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for t in range(3):
            train_step(model, opt, 0, t)
            sched.step()
        return inner.param_groups[0]["lr"]

    assert run_ranks(1, run)[0] == pytest.approx(0.125)


def test_stats_count_payload_bytes_per_sync() -> None:
    def run(group):
        model = make_model()
        opt = DiLoCo(
            torch.optim.SGD(model.parameters(), lr=0.1), group=group, sync_every=2, codec="q4"
        )
        before = opt.stats.bytes_sent
        for t in range(4):
            train_step(model, opt, group.rank, t)
        return opt.stats.syncs, opt.stats.bytes_sent - before

    syncs, sent = run_ranks(2, run)[0]
    n = sum(p.numel() for p in make_model().parameters())
    assert syncs == 2
    assert 0 < sent < 2 * n * 4 / 4  # q4: well under an eighth of fp32 per sync


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(sync_every=0),
        dict(sync_every=4, fragments=5),
        dict(sync_every=4, overlap=4),
        dict(sync_every=4, offload="gpu"),
        dict(sync_every=4, mixing=1.5),
        dict(sync_every=4, outer_momentum=1.0),
        dict(sync_every=4, outer_lr=0.5, outer_optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0)),
        dict(sync_every=4, error_feedback=0.9),
    ],
)
def test_bad_settings_raise_config_error(kwargs) -> None:
    def run(group):
        model = make_model()
        with pytest.raises(ConfigError):
            DiLoCo(torch.optim.SGD(model.parameters(), lr=0.1), group=group, **kwargs)

    run_ranks(1, run)


def test_is_a_real_optimizer_sharing_inner_state() -> None:
    def run(group):
        model = make_model()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
        opt = DiLoCo(inner, group=group, sync_every=2)
        train_step(model, opt, 0, 0)
        assert isinstance(opt, torch.optim.Optimizer)
        assert opt.param_groups is inner.param_groups and opt.state is inner.state
        p = next(model.parameters())
        assert "exp_avg" in opt.state[p]
        x, y = batch(0, 1)
        loss = opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        assert loss is not None

    run_ranks(1, run)


def test_q4_reduction_is_quantized_in_both_phases() -> None:
    """Per sync each of 2 peers sends half the values to the shard owner and gets half
    back: at 4 bits both ways that is about P/2 bytes; an fp32 all-gather phase would
    make it over 2P."""
    P = 128 * 128

    def run(group):
        torch.manual_seed(0)
        model = torch.nn.Linear(128, 128, bias=False)
        opt = DiLoCo(
            torch.optim.SGD(model.parameters(), lr=0.1), group=group, sync_every=1, codec="q4"
        )
        before = opt.stats.bytes_sent
        x = torch.randn(4, 128)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        return opt.stats.bytes_sent - before

    for sent in run_ranks(2, run):
        assert 0.5 * P * 0.5 < sent < 0.7 * P
