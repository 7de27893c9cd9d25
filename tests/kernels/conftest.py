"""Fixtures of the kernel tests: which backends to compare with the torch reference."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lowband import kernels
from lowband.kernels import _backend, _clib

needs_native = pytest.mark.skipif(
    not _clib.available(), reason=f"native kernels not built: {_clib.missing_reason()}"
)


class Backend:
    """The kernels of one backend by op name (``R.quantize`` is the reference's), resolved
    through :func:`lowband.kernels.resolve`; names that are no op (``packed_size``) are the
    package's own."""

    def __init__(self, name: str, device: str = "cpu") -> None:
        self.name, self.device = name, torch.device(device)

    def __getattr__(self, op: str) -> Any:
        if op in _backend.OPS or op in _backend.SINGLE:
            return kernels.resolve(op, self.device, backend=self.name)
        return getattr(kernels, op)


R = Backend("torch")
N = Backend("native")
