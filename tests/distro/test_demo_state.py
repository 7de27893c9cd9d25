"""DeMo's state: momentum in the DCT domain, its equivalence with the spatial algorithm, loading."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from _demo_util import make_mlp, train_step

from lowband.compress import TileLayout, dct2
from lowband.distro import DeMo
from lowband.distro._bucket import param_layout
from lowband.distro._wire import bucket_codec
from lowband.errors import ConfigError
from lowband.testing import ThreadGroup


@pytest.fixture
def solo():
    with ThreadGroup(1) as tg:
        yield tg.groups[0]


def test_momentum_matches_the_spatial_algorithm_with_padding(solo) -> None:
    # (70, 90) in 64 x 64 tiles: three of the four tiles are padded. The spatial algorithm
    # (the momentum kept in the parameter's shape, every step transformed and cropped)
    # is the reference; the DCT-domain momentum must follow it to fp32 rounding.
    lr, decay = 1e-2, 0.9
    g = torch.Generator().manual_seed(0)
    start = torch.randn(70, 90, generator=g)
    grads = [torch.randn(70, 90, generator=g) for _ in range(8)]
    p = torch.nn.Parameter(start.clone())
    opt = DeMo([p], lr=lr, group=solo, topk=8, decay=decay)
    lay = param_layout((70, 90), 64)
    codec = bucket_codec(64 * 64, topk=8, value=None).codec
    m, ref = torch.zeros(70, 90), start.clone()
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
        m = decay * m + lr * grad
        sent = lay.inverse(codec.decode(codec.encode(lay.forward(m).reshape(-1))))
        m -= sent
        ref -= lr * sent.sign()
        torch.testing.assert_close(opt.momentum(p), m, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(p.detach(), ref, rtol=0, atol=1e-6)
    # What the stored coefficients hold in the padded area was projected out.
    coeffs = opt.state[p]["momentum_dct"]
    assert coeffs.shape == (lay.ntiles, lay.tile_numel) and coeffs.dtype == torch.float32
    spatial = dct2(coeffs.view(-1, 64, 64), inverse=True)
    pad = lay.tiles(torch.ones(70, 90)) == 0
    assert int(pad.sum()) > 0
    assert float(spatial[pad].abs().max()) < 1e-6 * float(spatial.abs().max())


def test_state_format_saved_and_resumed_bit_for_bit(solo) -> None:
    torch.manual_seed(0)
    m = make_mlp()
    opt = DeMo(m.parameters(), lr=3e-3, group=solo, topk=8)
    for s in range(3):
        train_step(m, opt, 0, s)
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buf)
    sd = opt.state_dict()["state"]
    for i, p in enumerate(m.parameters()):  # weights: DCT coefficients; biases: their shape
        if p.dim() > 1:
            lay = param_layout(p.shape, 64)
            assert set(sd[i]) == {"momentum_dct"}
            assert sd[i]["momentum_dct"].shape == (lay.ntiles, lay.tile_numel)
        else:
            assert set(sd[i]) == {"momentum"} and sd[i]["momentum"].shape == p.shape

    m2 = make_mlp(seed=5)
    opt2 = DeMo(m2.parameters(), lr=1.0, group=solo, topk=8)
    ck = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    m2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    for s in range(3, 6):
        train_step(m, opt, 0, s)
        train_step(m2, opt2, 0, s)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
        assert all(torch.equal(opt.state[a][k], opt2.state[b][k]) for k in opt.state[a])


def _set(where: str, key: object, value: object):
    """A change to a state dict: ``sd[where][key] = value(sd)`` (``where`` a path of keys)."""

    def change(sd: dict) -> None:
        d = sd
        for k in where.split("/") if where else []:
            d = d[int(k) if k.isdigit() else k]
        d[key] = value(sd)

    return change


_MOMENTUM_0 = lambda sd: sd["state"][0]["momentum_dct"]  # noqa: E731

MALFORMED = {
    "bf16 momentum": _set("state/0", "momentum_dct", lambda sd: _MOMENTUM_0(sd).bfloat16()),
    "short momentum": _set("state/0", "momentum_dct", lambda sd: _MOMENTUM_0(sd)[1:]),
    "list momentum": _set("state/0", "momentum_dct", lambda sd: [1.0, 2.0]),
    "unknown key": _set("state/0", "bogus", lambda sd: torch.zeros(3)),
    "both momenta": _set("state/0", "momentum", lambda sd: torch.zeros(96, 16)),
    "dct of a 1-D": _set("state/1", "momentum_dct", lambda sd: torch.zeros(1, 128)),
    "1-D of 95": _set("state/1", "momentum", lambda sd: torch.zeros(95)),
    "pending transposed": _set("state/2", "pending_update", lambda sd: torch.zeros(96, 4)),
    "state not a dict": _set("state", 3, lambda sd: torch.zeros(4)),
    "other chunk": _set("param_groups/0", "chunk", lambda sd: 32),  # momenta are 64-tiled
    "bad topk": _set("param_groups/0", "topk", lambda sd: 0),
    "fewer params": _set("param_groups/0", "params", lambda sd: [0, 1, 2]),
    "two groups": _set("", "param_groups", lambda sd: sd["param_groups"] * 2),
    "state a list": _set("", "state", lambda sd: []),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_state_is_rejected_and_changes_nothing(solo, case: str) -> None:
    m = make_mlp()
    opt = DeMo(m.parameters(), lr=3e-3, group=solo, topk=8, overlap=True)
    for s in range(2):
        train_step(m, opt, 0, s)
    good = copy.deepcopy(opt.state_dict())
    assert "pending_update" in good["state"][2]  # overlap: the update in flight is saved
    bad = copy.deepcopy(good)
    MALFORMED[case](bad)
    tm = make_mlp(seed=3)
    target = DeMo(tm.parameters(), lr=1e-3, group=solo, topk=8)
    train_step(tm, target, 0, 0)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ConfigError):
        target.load_state_dict(bad)
    after = target.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for i, st in before["state"].items():
        assert all(torch.equal(after["state"][i][k], v) for k, v in st.items())
    target.load_state_dict(good)  # the same optimizer still takes the good one
    w0 = target.param_groups[0]["params"][0]
    assert torch.equal(target.state[w0]["momentum_dct"], good["state"][0]["momentum_dct"])


def test_a_missing_hyperparameter_is_rejected(solo) -> None:
    m = make_mlp()
    opt = DeMo(m.parameters(), lr=3e-3, group=solo, topk=8)
    train_step(m, opt, 0, 0)
    sd = copy.deepcopy(opt.state_dict())
    del sd["param_groups"][0]["decay"]
    with pytest.raises(ConfigError, match="decay"):
        opt.load_state_dict(sd)


def test_older_checkpoint_with_spatial_momentum_is_converted(solo) -> None:
    m = make_mlp()
    opt = DeMo(m.parameters(), lr=3e-3, group=solo, topk=8)
    for s in range(2):
        train_step(m, opt, 0, s)
    sd = copy.deepcopy(opt.state_dict())
    for i, p in enumerate(m.parameters()):
        sd["state"][i] = {"momentum": opt.momentum(p)}  # the layout before momentum_dct
    other = DeMo(m.parameters(), lr=3e-3, group=solo, topk=8)
    other.load_state_dict(sd)
    for p in m.parameters():
        key = "momentum_dct" if p.dim() > 1 else "momentum"
        torch.testing.assert_close(other.state[p][key], opt.state[p][key], rtol=0, atol=1e-7)


def test_checkpoint_of_the_old_nd_tiling_is_converted(solo) -> None:
    # Before issue 17.5 an N-D parameter's momentum_dct was laid out as
    # (prod(shape[:-1]), shape[-1]); a state dict without "tiling" is read that way.
    conv = torch.nn.Parameter(torch.zeros(16, 8, 3, 3))
    opt = DeMo([conv], lr=1e-2, group=solo, topk=8, chunk=16)
    old = TileLayout.for_matrix(tuple(conv.shape), (16 * 8 * 3, 3), 16, full_tiles=False)
    momentum = torch.randn(conv.shape, generator=torch.Generator().manual_seed(3))
    sd = opt.state_dict()
    assert sd.pop("tiling") == 2
    sd["state"] = {0: {"momentum_dct": old.forward(momentum)}}
    opt.load_state_dict(sd)
    torch.testing.assert_close(opt.momentum(conv), momentum, rtol=0, atol=1e-5)
    assert opt.state[conv]["momentum_dct"].shape == (param_layout(conv.shape, 16).ntiles, 256)
    sd = opt.state_dict()  # written now: read back as it is
    opt.load_state_dict(sd)
    torch.testing.assert_close(opt.momentum(conv), momentum, rtol=0, atol=1e-5)
