"""Codec properties: shape/dtype restored, grid error bounds, zeros, sizes, spec round trip."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowband import kernels
from lowband.compress import ErrorFeedback, Payload, parse
from lowband.errors import CodecError, ConfigError

ALL_SPECS = [
    "fp32", "fp16", "bf16", "q8", "q4", "q2", "q1", "sign",
    "q8:block=64", "q4:rounding=stochastic", "q2:block=32", "sign:block=8",
    "topk:k=4,tile=64", "topk:k=3,tile=100+q8", "topk:k=64,tile=4096+q2", "topk:k=2,tile=300+sign",
    "topk:density=0.1", "topk:density=0.05+q4+lz4", "q8+lz4", "fp16+lz4",
    "dct:chunk=8+topk:k=4,tile=64+sign", "dct:chunk=4+q8",
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
shapes = st.one_of(
    st.just(()),
    st.lists(st.integers(0, 40), min_size=1, max_size=3).map(tuple),
)


def roundtrip(spec: str, x: torch.Tensor) -> tuple[torch.Tensor, Payload]:
    codec = parse(spec)
    p = codec.encode(x)
    q = Payload.from_frames(p.to_frames())
    return codec.decode(q), p


@settings(max_examples=60, deadline=None)
@given(spec=st.sampled_from(ALL_SPECS), shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31))
def test_shape_dtype_restored_and_nbytes_exact(spec: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    y, p = roundtrip(spec, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert p.nbytes == sum(memoryview(f).nbytes for f in p.to_frames())


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([8, 4, 2, 1]), n=st.integers(0, 700), block=st.sampled_from([8, 64, 256]),
       scale=st.floats(1e-6, 1e6), seed=st.integers(0, 2**31))
def test_round_to_nearest_error_bound(bits: int, n: int, block: int, scale: float, seed: int) -> None:
    """|x - decode(encode(x))| <= step/2 per block (step = absmax / h)."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    spec = f"q{bits}:block={block}"
    y, _ = roundtrip(spec, x)
    h = kernels.HALF_RANGE[bits]
    for b in range(0, n, block):
        xb, yb = x[b : b + block], y[b : b + block]
        step = xb.abs().max() / h
        assert (xb - yb).abs().max() <= step / 2 * (1 + 1e-5) + 1e-30


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([8, 4, 2, 1]), n=st.integers(1, 600), seed=st.integers(0, 2**31))
def test_stochastic_rounding_error_below_one_step(bits: int, n: int, seed: int) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    y, _ = roundtrip(f"q{bits}:block=64,rounding=stochastic", x)
    h = kernels.HALF_RANGE[bits]
    for b in range(0, n, 64):
        step = x[b : b + 64].abs().max() / h
        assert (x[b : b + 64] - y[b : b + 64]).abs().max() <= step * (1 + 1e-5)


def test_stochastic_rounding_is_unbiased() -> None:
    x = torch.full((256,), 0.3)
    x[0] = 1.0  # absmax 1: 0.3 lies between grid levels of q1 (+-1) and q2
    for bits in (1, 2):
        codec = parse(f"q{bits}:rounding=stochastic")
        mean = torch.stack([codec.decode(codec.encode(x, seed=s)) for s in range(400)]).mean(0)
        assert abs(float(mean[1:].mean()) - 0.3) < 0.02


@pytest.mark.parametrize("spec", ["q8", "q4", "q8:block=8"])
def test_zeros_stay_zeros_on_grids_with_a_zero_level(spec: str) -> None:
    x = torch.randn(1000)
    x[::3] = 0
    y, _ = roundtrip(spec, x)
    assert torch.all(y[::3] == 0)


@pytest.mark.parametrize("spec", ["q2", "q1", "sign"])
def test_all_zero_block_decodes_to_zero_even_without_zero_level(spec: str) -> None:
    y, _ = roundtrip(spec, torch.zeros(300))
    assert torch.all(y == 0)


def test_sign_scale_is_mean_abs_and_q1_is_absmax() -> None:
    x = torch.tensor([1.0, -3.0, 0.5, -0.5, 2.0, 0.0, -1.0, 4.0])
    s, _ = roundtrip("sign:block=8", x)
    q, _ = roundtrip("q1:block=8", x)
    assert torch.allclose(s.abs(), torch.full((8,), float(x.abs().mean())))
    assert torch.equal(torch.sign(s), torch.sign(q))
    assert torch.allclose(q.abs(), torch.full((8,), 4.0))
    assert float(s[5]) > 0  # sign(0) is +


def test_fp16_clamps_instead_of_overflowing() -> None:
    x = torch.tensor([1e6, -1e6, 3.0, float("inf"), float("nan")])
    y, _ = roundtrip("fp16", x)
    assert y[0] == 65504 and y[1] == -65504 and y[2] == 3.0
    assert math.isinf(y[3]) and math.isnan(y[4])  # non-finite passes through casts, as documented


@pytest.mark.parametrize("spec", ["q8", "q2", "sign", "topk:k=2,tile=8", "topk:density=0.5"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_quantizers_and_topk_reject_non_finite(spec: str, bad: float) -> None:
    x = torch.randn(64)
    x[5] = bad
    with pytest.raises(CodecError, match="NaN or Inf"):
        parse(spec).encode(x)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 3000), k=st.integers(1, 16), tile=st.sampled_from([8, 100, 256, 1000, 4096]), seed=st.integers(0, 999))
def test_tiled_topk_keeps_largest_per_tile_and_zeros_elsewhere(n: int, k: int, tile: int, seed: int) -> None:
    if k > tile:
        return
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    y, _ = roundtrip(f"topk:k={k},tile={tile}", x)
    for b in range(0, n, tile):
        xs, ys = x[b : b + tile], y[b : b + tile]
        kept = ys != 0
        assert int(kept.sum()) == min(k, xs.numel())
        assert torch.equal(ys[kept], xs[kept])
        if (~kept).any():
            assert xs[kept].abs().min() >= xs[~kept].abs().max()


def test_topk_tie_rule_prefers_lower_index() -> None:
    x = torch.ones(16)
    y, _ = roundtrip("topk:k=3,tile=8", x)
    assert y.nonzero().flatten().tolist() == [0, 1, 2, 8, 9, 10]
    y, _ = roundtrip("topk:density=0.25", x)
    assert y.nonzero().flatten().tolist() == [0, 1, 2, 3]


def test_payload_bytes_per_element_targets() -> None:
    """Issue 2 'Done when': bytes per element, headers included, for 16M values."""
    n = 16 * 2**20
    x = torch.randn(n)
    limits = {"q8": 1.02, "q4": 0.52, "q2": 0.27, "sign": 0.145, "topk:k=64,tile=4096+q2": 0.035}
    for spec, limit in limits.items():
        p = parse(spec).encode(x)
        assert p.nbytes / n <= limit, (spec, p.nbytes / n)


@settings(max_examples=40, deadline=None)
@given(spec=st.sampled_from(ALL_SPECS))
def test_spec_string_round_trips(spec: str) -> None:
    c = parse(spec)
    assert parse(str(c)) == c
    assert str(parse(str(c))) == str(c)


@pytest.mark.parametrize(
    "bad",
    ["", "q3", "q8:block=7", "q8:blok=64", "topk", "topk:k=5,density=0.1", "topk:k=0,tile=8", "topk:k=300,tile=4096",
     "topk:density=2", "q8+q4", "lz4+q8", "q8+topk:k=1,tile=8", "dct:chunk=1", "q8:rounding=up", "fp32:x=1", "q8:block=abc"],
)
def test_bad_specs_raise_config_error(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse(bad)
    with pytest.raises(ValueError):  # ConfigError is a ValueError for user code
        parse(bad)


@pytest.mark.parametrize("spec", ["q8", "q4", "q2", "sign", "fp16", "topk:k=8,tile=64+q2", "topk:density=0.02+q8", "dct:chunk=8+topk:k=4,tile=64+sign"])
def test_error_feedback_delivers_a_constant_input_on_average(spec: str) -> None:
    """With decay 1, sum(sent) = T*x - r_T exactly, and r stays bounded: the mean converges to x."""
    x = torch.randn(512, generator=torch.Generator().manual_seed(1))
    ef = ErrorFeedback(spec)
    codec = parse(spec)
    total = torch.zeros(512, dtype=torch.float64)
    errs, norms = [], []
    for t in range(1, 601):
        total += codec.decode(ef.encode(x, key="w")).double()
        if t in (300, 600):
            errs.append(float((total / t - x.double()).abs().max()))
            norms.append(float(ef.residuals["w"].norm()))
            r = ef.residuals["w"].double()
            assert torch.allclose(total + r, t * x.double(), atol=1e-3 * t), spec  # nothing lost
    assert norms[1] < 1.5 * norms[0] + 1.0, (spec, norms)  # bounded, not growing with t
    # So the error of the average is the bounded residual over t: it vanishes as t grows.
    assert errs[1] <= float(ef.residuals["w"].abs().max()) / 600 + 1e-4, (spec, errs)
    assert errs[1] < errs[0], (spec, errs)


def test_error_feedback_decay_and_state_round_trip() -> None:
    x = torch.randn(256)
    ef = ErrorFeedback("topk:k=4,tile=64+q2", decay=0.95)
    for _ in range(5):
        ef.encode(x, key="a")
    r = ef.residuals["a"].clone()
    ef2 = ErrorFeedback("topk:k=4,tile=64+q2", decay=0.95)
    ef2.load_state_dict(ef.state_dict())
    assert torch.equal(ef2.residuals["a"], r)
    p1, p2 = ef.encode(x, key="a"), ef2.encode(x, key="a")
    assert [bytes(b) for b in p1.to_frames()] == [bytes(b) for b in p2.to_frames()]
    with pytest.raises(ConfigError):
        ErrorFeedback("q8").load_state_dict(ef.state_dict())
    with pytest.raises(ConfigError):
        ErrorFeedback("q8", decay=1.5)


def test_decode_into_and_decode_sum_accumulate_in_fp32() -> None:
    xs = [torch.randn(300, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for spec in ["q8", "topk:k=8,tile=64+q4", "dct:chunk=8+topk:k=16,tile=64"]:
        c = parse(spec)
        ps = [c.encode(x) for x in xs]
        out = torch.zeros(300)
        c.decode_sum(ps, out)
        ref = sum(c.decode(p).float() for p in ps)
        assert torch.allclose(out, ref, atol=1e-5), spec


def test_dct_stage_round_trips_to_fp32_precision() -> None:
    for shape in [(7,), (5, 9), (2, 3, 17, 6), (50257 // 100, 7)]:
        x = torch.randn(shape)
        y, _ = roundtrip("dct:chunk=8+fp32", x)
        assert torch.allclose(x, y, atol=1e-5), shape


def test_integer_tensors_are_refused() -> None:
    with pytest.raises(CodecError):
        parse("q8").encode(torch.arange(10))
