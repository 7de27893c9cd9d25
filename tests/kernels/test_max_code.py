"""``kernels.max_code`` (issue 17.2): the grid check of q8/q4 decoding in one read, native
against the reference, odd lengths (the unused 4-bit tail nibble is not a code)."""

from __future__ import annotations

import pytest
import torch

from lowband.errors import CodecError
from lowband.kernels import available_backends
from tests.kernels.conftest import N as _native
from tests.kernels.conftest import R as _ref


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 4097, (1 << 20) + 3])
def test_max_code_matches_reference(bits: int, n: int) -> None:
    if "native" not in available_backends("cpu"):
        pytest.skip("native kernels not built")
    g = torch.Generator().manual_seed(n)
    for top in (0, 5, (1 << bits) - 2, (1 << bits) - 1):
        codes = _ref.pack_bits(torch.randint(0, top + 1, (n,), generator=g), bits)
        assert _native.max_code(codes, bits, n) == _ref.max_code(codes, bits, n)


def test_tail_nibble_is_not_a_code() -> None:
    codes = torch.tensor([0x21, 0xF3], dtype=torch.uint8)  # codes 1, 2, 3; the high nibble 0xF is padding
    assert _ref.max_code(codes, 4, 3) == 3
    if "native" in available_backends("cpu"):
        assert _native.max_code(codes, 4, 3) == 3


def test_max_code_refuses_other_widths() -> None:
    with pytest.raises(CodecError):
        _ref.max_code(torch.zeros(4, dtype=torch.uint8), 2, 16)
