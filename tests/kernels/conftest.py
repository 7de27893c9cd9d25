"""Fixtures of the kernel tests: which backends to compare with the torch reference."""

from __future__ import annotations

import pytest

from lowband.kernels import _native

needs_native = pytest.mark.skipif(
    not _native.available(), reason=f"native kernels not built: {_native.missing_reason()}"
)
