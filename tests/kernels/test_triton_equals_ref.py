"""The Triton kernels return exactly what the torch reference returns.

Without CUDA they run on CPU tensors under ``TRITON_INTERPRET=1`` at tiny sizes (the
interpreter runs every program in Python); with CUDA they run natively on the GPU at
larger sizes. Codes, indices, packed bytes and residuals are compared bit for bit; the
``sign`` scale (a float sum in tree order) to a few ulp.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowband import kernels
from lowband.errors import CodecError
from lowband.kernels import _backend
from tests.kernels.conftest import Backend, R

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        importlib.util.find_spec("triton") is None, reason="triton is not installed"
    ),
]

CUDA = torch.cuda.is_available()
_TRITON_MODULES = (
    "lowband.kernels._bits_triton",
    "lowband.kernels._quant_triton",
    "lowband.kernels._topk_triton",
)
DEV = "cuda" if CUDA else "cpu"
#: sizes: tiny under the interpreter, a few blocks of real work on a GPU
SIZES = [0, 1, 37, 300, 100_003] if CUDA else [0, 1, 37, 300]


@pytest.fixture(scope="module")
def T() -> Iterator[Backend]:  # noqa: N802 - the backend under test
    """The Triton kernels, interpreted on CPU when there is no GPU."""
    old = os.environ.get("TRITON_INTERPRET")
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated
        for name in _TRITON_MODULES:
            sys.modules.pop(name, None)
        _backend.forget_choices()
    try:
        yield Backend("triton", DEV)
    finally:
        if not CUDA:
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old


def _x(
    n: int, kind: str = "normal", seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(n, generator=g)
    elif kind == "ties":
        x = torch.randint(-2, 3, (n,), generator=g).float()
    else:
        x = torch.zeros(n)
    return x.to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a.cpu(), b.cpu())


def _check_quantize(T: Backend, x: torch.Tensor, **kw: object) -> None:  # noqa: N803
    ef = kw.pop("ef", False)
    r1 = _x(x.numel(), "normal", 9) * 0.1 if ef else None
    r2 = r1.clone().to(DEV) if r1 is not None else None
    c1, s1 = R.quantize(x, residual=r1, **kw)
    c2, s2 = T.quantize(x.to(DEV), residual=r2, **kw)
    _same(c1, c2)
    if kw.get("sign"):
        torch.testing.assert_close(s2.cpu(), s1, rtol=16 * 2**-24, atol=0.0)
    else:
        _same(s1, s2)
        if ef:
            _same(r1, r2)
    n, bits, block = x.numel(), kw["bits"], kw.get("block", 256)
    o1 = _x(n, "normal", 3)
    o2 = o1.clone().to(DEV)
    R.dequantize(c1, s1, bits=bits, n=n, block=block, out=o1, accumulate=True)
    T.dequantize(c1.to(DEV), s1.to(DEV), bits=bits, n=n, block=block, out=o2, accumulate=True)
    _same(o1, o2)


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_quantize(T: Backend, bits: int) -> None:  # noqa: N803
    for n in SIZES:
        for block in (256, 32, 6):
            if block == 6 and n > 40 and not CUDA:
                continue  # one interpreted program per block: keep it short
            _check_quantize(T, _x(n, "normal", n), bits=bits, block=block, ef=True, decay=0.9)
            _check_quantize(T, _x(n, "normal", n), bits=bits, block=block, stochastic=True, seed=-7)
    _check_quantize(T, _x(300, "ties", 1), bits=bits, block=64, ef=True)
    _check_quantize(T, _x(300, "zeros"), bits=bits, block=64, ef=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_half_inputs(T: Backend, dtype: torch.dtype) -> None:  # noqa: N803
    x = _x(300, "normal", 2, dtype)
    _check_quantize(T, x, bits=8, block=64, ef=True)
    _check_quantize(T, x, bits=2, block=64, stochastic=True, seed=2**40)
    _check_quantize(T, x, bits=1, block=64, sign=True, ef=True)


def test_quantize_sign(T: Backend) -> None:  # noqa: N803
    for n in SIZES:
        _check_quantize(T, _x(n, "normal", 4), bits=1, block=128, sign=True, ef=True)
    _check_quantize(T, -_x(200, "zeros"), bits=1, block=64, sign=True)


def test_nonfinite_rejected(T: Backend) -> None:  # noqa: N803
    x = _x(100).to(DEV)
    x[17] = float("nan")
    with pytest.raises(CodecError):
        T.quantize(x, bits=8)
    with pytest.raises(CodecError):
        T.topk_tiles(x, k=2, tile=32)


def _check_topk(T: Backend, x: torch.Tensor, k: int, tile: int, ef: bool) -> None:  # noqa: N803
    r1 = _x(x.numel(), "normal", 8) if ef else None
    r2 = r1.clone().to(DEV) if r1 is not None else None
    l1, v1 = R.topk_tiles(x, k=k, tile=tile, residual=r1, decay=0.5)
    l2, v2 = T.topk_tiles(x.to(DEV), k=k, tile=tile, residual=r2, decay=0.5)
    _same(l1, l2)
    _same(v1, v2)
    if ef:
        _same(r1, r2)


@pytest.mark.parametrize("k,tile", [(3, 8), (64, 256), (5, 100), (1, 1), (0, 16), (300, 4096)])
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros"])
def test_topk(T: Backend, k: int, tile: int, kind: str) -> None:  # noqa: N803
    for n in SIZES:
        if -(-n // tile) > 8 and not CUDA:
            continue  # one interpreted program per tile, each a 31-step search
        _check_topk(T, _x(n, kind, n), k, tile, ef=n % 2 == 1)


@settings(
    max_examples=8 if not CUDA else 50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    n=st.integers(0, 200),
    bits=st.sampled_from([8, 4, 2, 1]),
    block=st.sampled_from([16, 48, 64, 256]),
    k=st.integers(0, 20),
    tile=st.sampled_from([50, 128] if not CUDA else [16, 50, 128, 4096]),
    seed=st.integers(0, 2**32),
)
def test_property(
    T: Backend, n: int, bits: int, block: int, k: int, tile: int, seed: int
) -> None:  # noqa: N803
    x = _x(n, "normal", seed % 1000)
    _check_quantize(T, x, bits=bits, block=block, stochastic=seed % 2 == 0, seed=seed, ef=True)
    _check_topk(T, x, k, tile, ef=True)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 12, 16])
def test_pack_unpack(T: Backend, bits: int) -> None:  # noqa: N803
    for n in (0, 1, 2, 3, 9, 301):
        u = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(n))
        p = R.pack_bits(u, bits)
        _same(p, T.pack_bits(u.to(DEV), bits))
        _same(
            R.unpack_bits(p, bits, n).to(torch.int32),
            T.unpack_bits(p.to(DEV), bits, n).to(torch.int32),
        )


def test_scatter_accumulate(T: Backend) -> None:  # noqa: N803
    g = torch.Generator().manual_seed(0)
    n = 500
    idx = [torch.randperm(n, generator=g)[:120].sort().values for _ in range(3)]
    vals = [torch.randn(120, generator=g) for _ in range(3)]
    base = torch.randn(n, generator=g)
    o1, o2 = base.clone(), base.clone().to(DEV)
    R.scatter_accumulate(o1, idx, vals)
    T.scatter_accumulate(o2, [i.to(DEV) for i in idx], [v.to(DEV) for v in vals])
    _same(o1, o2)
    with pytest.raises(CodecError):
        T.scatter_accumulate(o2, [torch.tensor([n], device=DEV)], [torch.tensor([1.0], device=DEV)])


def test_dispatch_names_triton(T: Backend) -> None:  # noqa: N803
    """backend="triton" goes through the dispatcher (on CPU only under the interpreter)."""
    x = _x(100, "normal", 5).to(DEV)
    c, s = kernels.quantize(x, bits=4, block=32, backend="triton")
    c1, s1 = R.quantize(x.cpu(), bits=4, block=32)
    _same(c, c1)
    assert "triton" in kernels.available_backends(DEV)
