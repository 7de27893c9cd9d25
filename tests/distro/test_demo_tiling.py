"""DeMo's DCT tiling and the per-bucket wire choice."""

from __future__ import annotations

import math

import pytest
import torch

from lowband.compress import Payload, TileLayout, parse
from lowband.distro._bucket import param_layout
from lowband.distro._wire import bucket_codec, combine, value_spec
from lowband.errors import ConfigError, ConfigMismatch

SHAPES = [
    (64, 64),
    (130, 200),
    (50257, 7),
    (64, 32, 3, 3),
    (2, 3, 70, 65),
    (128,),
    (5,),
    (1,),
    (1, 1),
    (3, 1),
]


def _dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II from its definition, in float64 (independent of the kernels)."""
    out = torch.empty(n, n, dtype=torch.float64)
    for k in range(n):
        s = math.sqrt(1.0 / n) if k == 0 else math.sqrt(2.0 / n)
        for i in range(n):
            out[k, i] = s * math.cos(math.pi * (2 * i + 1) * k / (2 * n))
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_to_fp32_precision(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    lay = param_layout(shape, 64)
    c = lay.forward(x)
    assert c.dtype == torch.float32 and c.shape == (lay.ntiles, lay.tile_numel)
    y = lay.inverse(c)
    assert y.shape == x.shape and y.dtype == torch.float32
    # An orthonormal fp32 transform errs by a few ulps of the largest value per axis.
    torch.testing.assert_close(y, x, rtol=0, atol=2e-6 * float(x.abs().max()) * lay.tile_rows)
    # Orthonormal: the energy of the coefficients is the energy of the (zero-padded) input.
    assert math.isclose(float(c.double().norm()), float(x.double().norm()), rel_tol=1e-5)


def test_forward_is_the_2d_dct_ii_of_each_tile() -> None:
    x = torch.randn(70, 65, generator=torch.Generator().manual_seed(2))
    lay = param_layout(x.shape, 64)
    assert (lay.tile_rows, lay.tile_cols, lay.grid) == (64, 64, (2, 2))
    c = lay.forward(x).double().reshape(2, 2, 64, 64)
    padded = torch.zeros(128, 128, dtype=torch.float64)
    padded[:70, :65] = x.double()
    d = _dct_matrix(64)
    for i in range(2):
        for j in range(2):
            want = d @ padded[64 * i : 64 * (i + 1), 64 * j : 64 * (j + 1)] @ d.T
            torch.testing.assert_close(c[i, j], want, rtol=0, atol=1e-4)


def test_rectangular_tiles_use_each_axis_basis() -> None:
    x = torch.randn(64, 7, generator=torch.Generator().manual_seed(3))
    lay = param_layout(x.shape, 64)
    want = _dct_matrix(64) @ x.double() @ _dct_matrix(7).T
    torch.testing.assert_close(lay.forward(x).double().reshape(64, 7), want, rtol=0, atol=1e-4)


def test_prime_vocabulary_is_padded_not_cut_into_slivers() -> None:
    lay = param_layout((50257, 7), 64)
    assert (lay.tile_rows, lay.tile_cols) == (64, 7)
    assert lay.ntiles == 786  # ceil(50257 / 64): the last tile carries 47 padded rows
    lay = param_layout((50257, 768), 64)
    assert (lay.tile_rows, lay.tile_cols, lay.grid) == (64, 64, (786, 12))


def test_nd_weights_split_where_they_have_the_fewest_tiles() -> None:
    # A conv weight (O, I, kh, kw) is (O, I*kh*kw): tiles span whole filters, not 3-wide
    # slivers of (O*I*kh, kw) (issue 17, item 5).
    conv = param_layout((64, 32, 3, 3), 64)
    assert (conv.rows, conv.cols, conv.tile_rows, conv.tile_cols) == (64, 288, 64, 64)
    # Stacked experts (E, out, in) with few experts: (E*out, in), not E-row-tall tiles.
    experts = param_layout((8, 1024, 512), 64)
    assert (experts.rows, experts.cols, experts.tile_shape) == (8192, 512, (64, 64))
    # A vector is rows of chunk values, like the packed 1-D parameters.
    bias = param_layout((300,), 64)
    assert (bias.rows, bias.cols, bias.tile_rows, bias.tile_cols, bias.ntiles) == (5, 64, 5, 64, 1)


@pytest.mark.parametrize("shape", [(64, 64, 3, 3), (256, 128, 3, 3), (512, 512, 1, 1)])
def test_conv_weight_costs_a_ninth_or_less_of_the_old_tiling(shape: tuple[int, ...]) -> None:
    # What DeMo sends is topk values per tile: count the tiles of the old view.
    new = param_layout(shape, 64)
    old = TileLayout.for_matrix(shape, (math.prod(shape[:-1]), shape[-1]), 64, full_tiles=False)
    assert new.ntiles * 8 <= old.ntiles


def test_dct_stage_is_the_same_tiling_with_full_tiles() -> None:
    x = torch.randn(32, 16, 3, 3, generator=torch.Generator().manual_seed(5))
    lay = TileLayout.for_shape(x.shape, 8, full_tiles=True)
    assert lay.tile_shape == (8, 8) and (lay.rows, lay.cols) == (32, 144)
    coef = parse("dct:chunk=8+fp32").dct.forward(x)  # type: ignore[union-attr]
    assert torch.equal(coef, lay.forward(x).reshape(-1))


def test_bad_chunk_or_empty_parameter() -> None:
    with pytest.raises(ConfigError):
        param_layout((4, 4), 0)
    with pytest.raises(ConfigError):
        param_layout((0, 4), 64)


def test_sparse_bucket_wire_is_compact() -> None:
    bc = bucket_codec(4096, topk=8, value=None)
    assert bc.sparse and str(bc.codec) == "topk:k=8,tile=4096+sign:block=8"
    x = torch.randn(100 * 4096, generator=torch.Generator().manual_seed(4))
    p = bc.codec.encode(x)
    # Per tile: 8 indices of 12 bits (12 bytes), 8 sign bits (1 byte), one fp32 scale.
    assert [b.nbytes for b in p.buffers] == [1200, 100, 400]
    assert p.nbytes < 1800 + 200  # header included
    assert 4 * x.numel() / p.nbytes > 800
    # The codec sends what it says: decoded values sit at 8 positions per tile.
    d = bc.codec.decode(p).reshape(100, 4096)
    assert torch.equal((d != 0).sum(1), torch.full((100,), 8))


def test_small_tiles_never_go_larger_than_dense() -> None:
    for tile, k in [(64, 8), (7, 8), (64, 32), (3, 1), (448, 8)]:
        bc = bucket_codec(tile, topk=k, value=None)
        x = torch.randn(tile * 50, generator=torch.Generator().manual_seed(tile))
        p = bc.codec.encode(x)
        dense = bucket_codec(tile, topk=tile, value=None).codec.encode(x)
        assert p.nbytes <= dense.nbytes < 4 * x.numel()
    assert not bucket_codec(64, topk=8, value=None).sparse  # 64 sign bits beat 8 indices + 8 signs
    assert bucket_codec(448, topk=8, value=None).sparse


def test_value_codec_option() -> None:
    assert value_spec(None) is None
    assert str(bucket_codec(4096, topk=8, value=value_spec("q4")).codec) == "topk:k=8,tile=4096+q4"
    with pytest.raises(ConfigError):
        value_spec("topk:k=8,tile=4096+sign")
    with pytest.raises(ConfigError):
        value_spec("dct:chunk=64+q4")
    with pytest.raises(ConfigError):
        value_spec("not-a-codec")


def test_combine_sums_in_rank_order_and_averages_over_participants() -> None:
    bc = bucket_codec(256, topk=4, value=value_spec("fp32"))
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(1024, generator=g) for _ in range(3)]
    ps: list[Payload | None] = [bc.codec.encode(x) for x in xs]
    mean, n = combine(bc.codec, ps, 1024)
    want = sum(bc.codec.decode(p) for p in ps if p is not None) / 3  # type: ignore[misc]
    assert n == 3 and torch.equal(mean, want)
    ps[1] = None  # a dropped peer: the mean is over the two that took part
    mean, n = combine(bc.codec, ps, 1024)
    assert n == 2
    torch.testing.assert_close(mean, (bc.codec.decode(ps[0]) + bc.codec.decode(ps[2])) / 2)  # type: ignore[arg-type]
    with pytest.raises(ConfigMismatch):
        combine(bc.codec, [bc.codec.encode(torch.randn(512))], 1024)
