"""Tensor kernels behind the codecs, one function per op, three backends each.

* ``torch``: the reference in ``_ref``, the specification; any device.
* ``native``: C11 + OpenMP + AVX2 (portable C where the CPU lacks AVX2) from ``csrc/``,
  built into ``lowband/_native.so`` by ``pip install`` and loaded with ctypes; CPU.
* ``triton``: Triton kernels for CUDA (``_triton``); imported only when first used.

``backend=None`` picks the best available for the tensor's device (native on CPU,
triton on CUDA, else torch) and logs the choice once, as a WARNING when the fast path is
missing; naming a backend that cannot run raises
:class:`lowband.errors.BackendUnavailable`. Every backend returns the reference's codes,
indices and packed bytes bit for bit (the ``sign`` scale, a float sum, may differ in its
last bits). The native and triton ``quantize``/``topk_tiles`` also take ``out=`` buffers.
"""

from __future__ import annotations

from lowband.kernels._checksum import checksum
from lowband.kernels._dispatch import (
    available_backends,
    dct_tiles,
    decode_gaps,
    dequantize,
    encode_gaps,
    max_code,
    pack_bits,
    quantize,
    resolve,
    scatter_accumulate,
    topk_tiles,
    unpack_bits,
)
from lowband.kernels._ref import HALF_RANGE, dct_basis, packed_size, tile_to_global, topk_count

__all__ = [
    "HALF_RANGE",
    "available_backends",
    "checksum",
    "dct_basis",
    "dct_tiles",
    "decode_gaps",
    "dequantize",
    "encode_gaps",
    "max_code",
    "pack_bits",
    "packed_size",
    "quantize",
    "resolve",
    "scatter_accumulate",
    "tile_to_global",
    "topk_count",
    "topk_tiles",
    "unpack_bits",
]
