"""The native (C) backend returns exactly what the torch reference returns.

Codes, indices, packed bytes, residuals and decoded values are compared bit for bit
(``torch.equal``); the one documented exception is the ``sign`` scale, a float sum
whose order may differ in the last bit (compared to 2 ulp). Sizes cover 0, 1, odd
sizes, non-multiples of the block and of 8, and several blocks; inputs cover fp32,
bf16 and fp16, ties and all-zero blocks and tiles.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowband.errors import CodecError, ConfigError
from tests.kernels.conftest import N, R, needs_native

pytestmark = needs_native

SIZES = [0, 1, 7, 33, 256, 257, 4097, 70001]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _data(n: int, kind: str, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(n, generator=g)
    elif kind == "heavy":  # heavy tails and a wide exponent range
        x = torch.randn(n, generator=g) ** 3 * torch.exp(torch.randn(n, generator=g) * 4)
    elif kind == "ties":  # few distinct magnitudes: tie rule and exact grid points
        x = torch.randint(-3, 4, (n,), generator=g).float()
    else:
        x = torch.zeros(n)
        if kind == "negzero":
            x = -x
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)  # stay finite in half precision
    return x.to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b), f"first difference at {int((a != b).nonzero()[0])}"


def _check_quantize(
    x: torch.Tensor,
    *,
    bits: int,
    block: int,
    sign: bool = False,
    stochastic: bool = False,
    seed: int = 0,
    ef: bool = False,
    decay: float = 1.0,
) -> None:
    r1 = _data(x.numel(), "normal", 99) * 0.1 if ef else None
    r2 = r1.clone() if r1 is not None else None
    kw = dict(bits=bits, block=block, sign=sign, stochastic=stochastic, seed=seed, decay=decay)
    c1, s1 = R.quantize(x, residual=r1, **kw)
    c2, s2 = N.quantize(x, residual=r2, **kw)
    _same(c1, c2)
    if sign:
        # mean |v| is a float sum in another order (torch: fp32 cascade; native: double):
        # the scale may differ in its last bits; 16 ulp bounds torch's own rounding error
        torch.testing.assert_close(s2, s1, rtol=16 * 2**-24, atol=0.0)
    else:
        _same(s1, s2)
        if ef:
            _same(r1, r2)
    # decode both ways, plain and accumulating into fp32
    n = x.numel()
    d1 = R.dequantize(c1, s1, bits=bits, n=n, block=block)
    d2 = N.dequantize(c1, s1, bits=bits, n=n, block=block)
    _same(d1, d2)
    o1 = _data(n, "normal", 5)
    o2 = o1.clone()
    R.dequantize(c1, s1, bits=bits, n=n, block=block, out=o1, accumulate=True)
    N.dequantize(c1, s1, bits=bits, n=n, block=block, out=o2, accumulate=True)
    _same(o1, o2)


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("n", SIZES)
def test_quantize_sizes(bits: int, n: int) -> None:
    for block in (256, 32, 5):
        _check_quantize(_data(n, "normal", n), bits=bits, block=block, ef=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "heavy", "ties", "zeros", "negzero"])
def test_quantize_dtypes_and_values(dtype: torch.dtype, kind: str) -> None:
    x = _data(3000, kind, 1, dtype)
    for bits in (8, 4, 2, 1):
        _check_quantize(x, bits=bits, block=256, ef=True)
        _check_quantize(x, bits=bits, block=64, stochastic=True, seed=7)
    _check_quantize(x, bits=1, block=256, sign=True, ef=True)


@HYP
@given(
    n=st.integers(0, 3000),
    bits=st.sampled_from([8, 4, 2, 1]),
    block=st.sampled_from([1, 3, 8, 32, 64, 96, 256, 1000]),
    mode=st.sampled_from(["nearest", "stochastic", "sign"]),
    seed=st.integers(-(2**40), 2**40),
    ef=st.booleans(),
    decay=st.sampled_from([1.0, 0.9, 0.5]),
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(["normal", "heavy", "ties", "zeros"]),
)
def test_quantize_property(
    n: int,
    bits: int,
    block: int,
    mode: str,
    seed: int,
    ef: bool,
    decay: float,
    dtype: torch.dtype,
    kind: str,
) -> None:
    x = _data(n, kind, seed & 0xFFFF, dtype)
    if mode == "sign":
        _check_quantize(x, bits=1, block=block, sign=True, ef=ef, decay=decay)
    else:
        _check_quantize(
            x,
            bits=bits,
            block=block,
            stochastic=mode == "stochastic",
            seed=seed,
            ef=ef,
            decay=decay,
        )


def test_quantize_large_multithreaded() -> None:
    """Several dynamically scheduled chunks, every thread busy."""
    x = _data(1_000_003, "normal", 3)
    _check_quantize(x, bits=8, block=256, ef=True, decay=0.9)
    _check_quantize(x, bits=2, block=128, stochastic=True, seed=11)


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("offset", [0, 3])
def test_dequantize_large_overwrite(bits: int, offset: int) -> None:
    """A decode big enough for streaming stores (32-byte aligned out), and the same into an
    unaligned view (plain stores): both equal the reference bit for bit, tail block included."""
    n = (2 << 20) + 4097
    x = _data(n, "normal", 11)
    codes, steps = R.quantize(x, bits=bits, block=256)
    want = R.dequantize(codes, steps, bits=bits, n=n, block=256)
    base = torch.full((n + offset,), float("nan"))
    out = base[offset:]
    got = N.dequantize(codes, steps, bits=bits, n=n, block=256, out=out)
    assert torch.equal(got, want)
    assert torch.equal(out, want)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("offset", [0, 1])
def test_quantize_large_streaming(bits: int, offset: int) -> None:
    """Codes big enough for streaming stores (an aligned output), and the same into an
    unaligned view (plain stores), with error feedback: both equal the reference bit for bit,
    the partial last block included."""
    n = (2 << 20) + 4097
    x = _data(n, "normal", 12)
    r1 = _data(n, "normal", 13) * 0.1
    r2 = r1.clone()
    want, wsteps = R.quantize(x, bits=bits, block=256, residual=r1)
    base = torch.full((R.packed_size(n, bits) + offset,), 0xA5, dtype=torch.uint8)
    codes, steps = base[offset:], torch.empty_like(wsteps)
    N.quantize(x, bits=bits, block=256, residual=r2, out=(codes, steps))
    _same(codes, want)
    _same(steps, wsteps)
    _same(r2, r1)


def test_quantize_tiny_blocks_keep_the_clamp() -> None:
    """A block whose absmax is so small that h / absmax overflows to inf (the native kernel
    keeps the clamp there) and blocks of subnormals and exact zeros beside ordinary ones: codes,
    scales and residuals equal the reference's, nearest and stochastic rounding."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256 * 8, generator=g)
    x[:256] *= 1e-39  # subnormal absmax: 127 / absmax is inf in fp32
    x[256:512] *= 1e-36  # tiny but inv finite
    x[512:768] = 0.0
    x[768:790] = 1e-45  # the smallest subnormal, the rest of the block zero
    x[790:1024] = 0.0
    for bits in (8, 4, 2, 1):
        _check_quantize(x, bits=bits, block=256, ef=True)
        _check_quantize(x, bits=bits, block=256, stochastic=True, seed=3)
        _check_quantize(x, bits=bits, block=32)


def test_quantize_rejects_nonfinite() -> None:
    for bad in (float("nan"), float("inf"), -float("inf")):
        # in a vector group, in the element-by-element tail of a partial block, at the end
        for n, at in ((1000, 537), (1000, 999), (300, 290), (70001, 70000), (70001, 3)):
            x = _data(n, "normal", 0)
            x[at] = bad
            with pytest.raises(CodecError):
                N.quantize(x, bits=8)
            with pytest.raises(CodecError):
                N.quantize(x, bits=4, block=32, residual=torch.zeros(n))
            with pytest.raises(CodecError):
                N.topk_tiles(x, k=4, tile=256)
    # finite input and residual whose sum overflows
    x = _data(1000, "normal", 0)
    x[700] = 3e38
    r = torch.zeros(1000)
    r[700] = 3e38
    with pytest.raises(CodecError):
        N.quantize(x, bits=8, residual=r)


def test_quantize_preallocated_out_and_bad_args() -> None:
    x = _data(1000, "normal", 0)
    codes = torch.empty(R.packed_size(1000, 4), dtype=torch.uint8)
    steps = torch.empty(4)
    c, s = N.quantize(x, bits=4, out=(codes, steps))
    assert c.data_ptr() == codes.data_ptr() and s.data_ptr() == steps.data_ptr()
    _same(c, R.quantize(x, bits=4)[0])
    with pytest.raises(ConfigError):
        N.quantize(x, bits=4, out=(codes[:-1], steps))
    with pytest.raises(CodecError):
        N.quantize(x, bits=3)
    with pytest.raises(ConfigError):
        N.quantize(x, bits=2, sign=True)
    with pytest.raises(ConfigError):
        N.quantize(x, bits=8, residual=torch.zeros(999))
    with pytest.raises(CodecError):
        N.dequantize(codes[:-1], steps, bits=4, n=1000)
    with pytest.raises(CodecError):
        N.dequantize(codes, steps[:-1], bits=4, n=1000)


def test_quantize_converts_odd_residual_layouts() -> None:
    """A non-contiguous or bf16 residual still gets the reference's update."""
    x = _data(512, "normal", 0)
    base = _data(1024, "normal", 1) * 0.1
    r1, r2 = base[::2].clone(), base.clone()[::2]
    assert not r2.is_contiguous()
    R.quantize(x, bits=4, residual=r1)
    N.quantize(x, bits=4, residual=r2)
    _same(r1, r2)


def _check_topk(
    x: torch.Tensor, *, k: int, tile: int, ef: bool = False, decay: float = 1.0
) -> None:
    r1 = _data(x.numel(), "normal", 98) if ef else None
    r2 = r1.clone() if r1 is not None else None
    l1, v1 = R.topk_tiles(x, k=k, tile=tile, residual=r1, decay=decay)
    l2, v2 = N.topk_tiles(x, k=k, tile=tile, residual=r2, decay=decay)
    _same(l1, l2)
    _same(v1, v2)
    if ef:
        _same(r1, r2)
    assert l2.numel() == R.topk_count(x.numel(), k=k, tile=tile)


@pytest.mark.parametrize("kind", ["normal", "heavy", "ties", "zeros", "negzero"])
@pytest.mark.parametrize(
    "k,tile",
    [(1, 1), (3, 8), (64, 4096), (256, 4096), (300, 256), (5, 7), (8, 1024), (17, 65536), (0, 64)],
)
def test_topk(kind: str, k: int, tile: int) -> None:
    for n in (0, 1, 100, 4095, 9001):
        _check_topk(_data(n, kind, n), k=k, tile=tile, ef=n % 2 == 1, decay=0.9)


def test_topk_large_multithreaded() -> None:
    """Enough tiles for every thread, dynamically scheduled."""
    _check_topk(_data(300_001, "normal", 4), k=64, tile=4096, ef=True, decay=0.9)
    _check_topk(_data(300_001, "heavy", 5), k=3, tile=1000)


def test_topk_shifting_distribution() -> None:
    """Tiles whose scale jumps (the next tile's first threshold guess is far off) stay exact."""
    parts = [_data(4096, "normal", i) * s for i, s in enumerate([1, 1e-3, 1e4, 0, 1, 1e-30, 7])]
    x = torch.cat(parts + [_data(4096, "ties", 9)])
    for dtype in DTYPES:
        _check_topk(x.to(dtype), k=64, tile=4096)
        _check_topk(x.to(dtype), k=200, tile=2048)


@HYP
@given(
    n=st.integers(0, 20000),
    k=st.integers(0, 300),
    tile=st.sampled_from([1, 2, 5, 64, 100, 1024, 4096, 5000, 65536]),
    kind=st.sampled_from(["normal", "heavy", "ties", "zeros"]),
    dtype=st.sampled_from(DTYPES),
    ef=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_topk_property(
    n: int, k: int, tile: int, kind: str, dtype: torch.dtype, ef: bool, seed: int
) -> None:
    _check_topk(_data(n, kind, seed, dtype), k=k, tile=tile, ef=ef)


def test_topk_preallocated_out() -> None:
    x = _data(10000, "normal", 0)
    m = R.topk_count(10000, k=16, tile=4096)
    out = (torch.empty(m, dtype=torch.int32), torch.empty(m))
    local, vals = N.topk_tiles(x, k=16, tile=4096, out=out)
    assert local.data_ptr() == out[0].data_ptr()
    _same(local, R.topk_tiles(x, k=16, tile=4096)[0])
    with pytest.raises(CodecError):
        N.topk_tiles(x, k=4, tile=65537)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 12, 16])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 9, 1001])
def test_pack_unpack(bits: int, n: int) -> None:
    u = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(n))
    p1, p2 = R.pack_bits(u, bits), N.pack_bits(u, bits)
    _same(p1, p2)
    _same(R.unpack_bits(p1, bits, n), N.unpack_bits(p1, bits, n))
    with pytest.raises(CodecError):
        N.unpack_bits(torch.zeros(p1.numel() + 1, dtype=torch.uint8), bits, n)


def test_scatter_accumulate() -> None:
    g = torch.Generator().manual_seed(0)
    n = 200_000
    idx = [torch.randperm(n, generator=g)[:50_000].sort().values for _ in range(3)]
    idx[1] = idx[1].to(torch.int32)
    vals = [torch.randn(50_000, generator=g) for _ in range(3)]
    vals[2] = vals[2].to(torch.bfloat16)
    base = torch.randn(n, generator=g)
    o1, o2 = base.clone(), base.clone()
    R.scatter_accumulate(o1, idx, vals)
    N.scatter_accumulate(o2, idx, vals)
    _same(o1, o2)
    with pytest.raises(CodecError):
        N.scatter_accumulate(o2, [torch.tensor([n])], [torch.tensor([1.0])])
    _same(o1, o2)  # a rejected call writes nothing
    with pytest.raises(ConfigError):
        N.scatter_accumulate(o2, [torch.tensor([0, 1])], [torch.tensor([1.0])])


@pytest.mark.parametrize("c", [4, 8, 64])
def test_dct_tiles(c: int) -> None:
    """One matmul for every backend (lowband.kernels.dct): the orthonormal DCT-II of each
    tile, in float64 to 1e-5, and its inverse undoes it."""
    import math

    from lowband import kernels

    k = torch.arange(c, dtype=torch.float64)[:, None]
    i = torch.arange(c, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * c)) * math.sqrt(2.0 / c)
    d[0] /= math.sqrt(2.0)
    x = torch.randn(5, c)
    y = torch.randn(3, c, c)
    torch.testing.assert_close(kernels.dct_tiles(x).double(), x.double() @ d.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.dct_tiles(y).double(), d @ y.double() @ d.t(), rtol=1e-5, atol=1e-5)
    for t in (x, y):
        back = kernels.dct_tiles(kernels.dct_tiles(t), inverse=True)
        torch.testing.assert_close(back, t, rtol=1e-5, atol=1e-5)
        assert kernels.resolve("dct_tiles", backend="native") is kernels.dct_tiles


@HYP
@given(st.lists(st.integers(0, 2**62), max_size=200, unique=True))
def test_gaps_round_trip(pos: list[int]) -> None:
    idx = torch.tensor(sorted(pos), dtype=torch.int64)
    data = N.encode_gaps(idx)
    assert data == R.encode_gaps(idx)
    limit = (int(idx[-1]) + 1) if pos else 1
    _same(N.decode_gaps(data, len(pos), limit), idx)
    if pos:
        with pytest.raises(CodecError):
            N.decode_gaps(data, len(pos), limit - 1)


def test_gaps_reject_unsorted() -> None:
    for bad in ([3, 3], [5, 2], [-1]):
        with pytest.raises(CodecError):
            N.encode_gaps(torch.tensor(bad))


def _outcome(fn, *args):  # noqa: ANN001, ANN202
    try:
        return fn(*args).tolist()
    except CodecError:
        return "CodecError"


@HYP
@given(
    data=st.binary(max_size=64),
    count=st.integers(0, 40),
    limit=st.sampled_from([1, 2, 100, 2**20, 2**62]),
)
def test_decode_gaps_hostile_bytes(data: bytes, count: int, limit: int) -> None:
    """Random bytes never crash the decoder; it accepts exactly what the reference accepts."""
    assert _outcome(N.decode_gaps, data, count, limit) == _outcome(
        R.decode_gaps, data, count, limit
    )


def test_decode_gaps_edge_cases() -> None:
    with pytest.raises(CodecError):
        N.decode_gaps(b"\x80" * 9 + b"\x01", 1, 2**63)  # 10-byte varint
    assert N.decode_gaps(b"\xff" * 8 + b"\x01", 1, 2**63 - 1).tolist() == [2**57 - 1]
    with pytest.raises(CodecError):
        N.decode_gaps(b"\x01", 2, 100)  # truncated
    with pytest.raises(CodecError):
        N.decode_gaps(b"\x01\x01", 1, 100)  # trailing
    with pytest.raises(CodecError):
        N.decode_gaps(b"", 10**12, 100)  # a count the bytes cannot hold: rejected before allocating
    with pytest.raises(CodecError):
        N.decode_gaps(b"\x01", 1, 1)
    assert N.decode_gaps(b"", 0, 0).numel() == 0

