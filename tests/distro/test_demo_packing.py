"""DeMo's packing of 1-D parameters: layout, bytes, exact error feedback, peers, resume."""

from __future__ import annotations

import pytest
import torch

from lowband.distro import DeMo
from lowband.distro._bucket import packed_layout
from lowband.errors import ConfigError
from lowband.testing import ThreadGroup, seeded
from lowband.testing import load_state_bytes as load_checkpoint
from lowband.testing import state_bytes as checkpoint


def _net(seed: int = 0, *, biases: bool = True) -> torch.nn.Module:
    """Two 64x64-tiled weights plus 1-D parameters (biases, LayerNorm) of 576 values."""
    with seeded(seed):
        return torch.nn.Sequential(
            torch.nn.Linear(64, 128, bias=biases),
            torch.nn.LayerNorm(128, elementwise_affine=biases),
            torch.nn.Tanh(),
            torch.nn.Linear(128, 64, bias=biases),
        )


def _step(m: torch.nn.Module, opt: DeMo, rank: int, s: int) -> None:
    g = torch.Generator().manual_seed(100 * rank + s)
    x = torch.randn(16, 64, generator=g)
    opt.zero_grad()
    (m(x) - x.flip(1)).square().mean().backward()
    opt.step()


@pytest.mark.parametrize("n", [1, 5, 64, 100, 4096, 5000])
def test_packed_layout_round_trips(n: int) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    for full in (False, True):
        lay = packed_layout(n, 64, full_tiles=full)
        if full:  # chunk x chunk tiles whatever n: they join the matrices' bucket
            assert lay.tile_shape == (64, 64) and lay.ntiles == -(-n // 4096)
        else:  # alone, a short vector is padded no further than its last 64-wide row
            assert lay.tile_cols == min(64, n) and lay.tile_numel < n + 64
        c = lay.forward(x)
        torch.testing.assert_close(lay.inverse(c), x, rtol=0, atol=1e-5 * float(x.abs().max()))
    assert packed_layout(5000, 64, full_tiles=False).tile_shape == (64, 64)
    with pytest.raises(ConfigError):
        packed_layout(0, 64, full_tiles=True)


def test_1d_parameters_ride_in_the_matrices_bucket_at_their_density() -> None:
    def sent_per_step(biases: bool) -> tuple[int, int]:
        with ThreadGroup(2) as tg:

            def body(group):
                m = _net(biases=biases)
                opt = DeMo(m.parameters(), lr=1e-3, group=group, topk=8)
                for s in range(3):
                    _step(m, opt, group.rank, s)
                return opt.stats.bytes_sent // 3, opt.stats.messages // 3

            return tg.run(body)[0]

    without, msgs_without = sent_per_step(False)
    with_1d, msgs_with = sent_per_step(True)
    assert msgs_without == msgs_with == 1  # one payload per step to the one other peer
    # 576 values of biases and norms: one more 64x64 tile of 8 coefficients, 17 bytes
    # (8 indices of 12 bits, 8 sign bits, an fp32 scale) instead of a second payload.
    assert with_1d - without == 17


def test_packed_error_feedback_is_exact_and_updates_are_signs() -> None:
    with ThreadGroup(1) as tg:
        m = _net()
        lr = 1e-2
        opt = DeMo(m.parameters(), lr=lr, group=tg.groups[0], topk=8)
        vectors = [p for p in m.parameters() if p.dim() == 1]
        before = [p.detach().clone() for p in vectors]
        _step(m, opt, 0, 0)
        grads = torch.cat([p.grad.reshape(-1) for p in vectors])
        residual = torch.cat([opt.state[p]["momentum"].reshape(-1) for p in vectors])
        sent = lr * grads - residual  # what left the 1-D momenta (they started at zero)
        assert 0 < float(sent.norm()) < float((lr * grads).norm())
        # With one peer the update is what this peer sent, through sign: each 1-D value
        # moved by exactly lr, against the sign of what left its momentum.
        moved = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(vectors, before)])
        torch.testing.assert_close(moved.abs(), torch.full_like(moved, lr), rtol=0, atol=1e-6)
        assert torch.equal(moved.sign(), -sent.sign())
        # And what was sent is a sum of 8 cosines of the packed 64x64 tile, cropped to the
        # 576 real values: 8 coefficients of its zero-padded DCT carry much of its energy
        # (about half here; about 2 % for a dense random vector of the same size).
        lay = packed_layout(grads.numel(), 64, full_tiles=True)
        energy = lay.forward(sent).reshape(-1).square().sort(descending=True).values
        assert lay.ntiles == 1 and float(energy[:8].sum()) > 0.3 * float(energy.sum())


@pytest.mark.parametrize("overlap", [False, True])
def test_peers_stay_bit_identical_and_resume_bit_for_bit(overlap: bool) -> None:
    def run(group, *, steps: int, save_at: int):
        m = _net()
        opt = DeMo(m.parameters(), lr=3e-3, group=group, topk=8, overlap=overlap)
        saved = None
        for s in range(steps):
            if s == save_at:
                saved = checkpoint(m, opt)
            _step(m, opt, group.rank, s)
        opt.flush()
        m2 = _net(seed=7)
        opt2 = DeMo(m2.parameters(), lr=1.0, group=group, topk=8, overlap=overlap)
        ck = load_checkpoint(saved)  # type: ignore[arg-type]
        m2.load_state_dict(ck["model"])
        opt2.load_state_dict(ck["opt"])
        for s in range(save_at, steps):
            _step(m2, opt2, group.rank, s)
        opt2.flush()
        flat = [torch.cat([p.detach().reshape(-1) for p in mm.parameters()]) for mm in (m, m2)]
        ln = opt.state[m[1].weight]["momentum"].clone()
        return flat, ln

    with ThreadGroup(3) as tg:
        out = tg.run(run, steps=6, save_at=3)
    start = torch.cat([p.detach().reshape(-1) for p in _net().parameters()])
    for (full, resumed), _ in out:
        assert torch.equal(full, out[0][0][0])  # every peer applied the same updates
        assert torch.equal(resumed, full)  # the resumed run continued bit for bit
        assert not torch.equal(full, start)
    assert not torch.equal(out[1][1], out[0][1])  # each peer keeps its own 1-D momentum
