"""The one checksum (XXH3-64 from the xxhash package): every input form agrees, and it is
the published algorithm (test vectors of xxHash), so a C routine fused with a copy can match."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowband import kernels


def test_published_xxh3_64_values() -> None:
    # XXH3_64bits(seed 0): the empty input and "a" (xxHash's own sanity values).
    assert kernels.checksum(b"") == 0x2D06800538D394C2
    assert kernels.checksum(b"a") == 0xE6C632B61E964E1F


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 1000, (1 << 20) + 13])
def test_every_input_form_agrees_and_a_flipped_bit_changes_it(n: int) -> None:
    b = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    want = kernels.checksum(b.tobytes())
    assert kernels.checksum(b) == want
    assert kernels.checksum(memoryview(b.tobytes())) == want
    assert kernels.checksum(torch.from_numpy(b.copy())) == want
    if n >= 4:  # a float tensor is hashed by its bytes
        f = b[: n // 4 * 4].view(np.float32)
        assert kernels.checksum(torch.from_numpy(f.copy())) == kernels.checksum(f.tobytes())
    if n:
        c = b.copy()
        c[n // 2] ^= 1
        assert kernels.checksum(c) != want


def test_non_contiguous_arrays_are_hashed_by_their_values() -> None:
    a = np.arange(64, dtype=np.uint8).reshape(8, 8)[:, ::2]
    assert kernels.checksum(a) == kernels.checksum(np.ascontiguousarray(a).tobytes())
    t = torch.arange(64, dtype=torch.uint8).reshape(8, 8).t()
    assert kernels.checksum(t) == kernels.checksum(t.contiguous().numpy().tobytes())
