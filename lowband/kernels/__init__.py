"""Tensor kernels behind the codecs, organised by op; three backends each.

One module per op family holds the op's reference, its argument checks and the binding of
every backend: :mod:`~lowband.kernels.quant` (``quantize``, ``dequantize``, ``max_code``),
:mod:`~lowband.kernels.bits` (``pack_bits``, ``unpack_bits``), :mod:`~lowband.kernels.topk`
(``topk_tiles``, ``scatter_accumulate``), :mod:`~lowband.kernels.gaps` (``encode_gaps``,
``decode_gaps``) and :mod:`~lowband.kernels.dct` (``dct_tiles``, one matmul for every backend).

* ``torch``: the reference, the specification; any device.
* ``native``: C11 + OpenMP + AVX2 (portable C where the CPU lacks AVX2) from ``csrc/``,
  built into ``lowband/_native.so`` by ``pip install`` and loaded with ctypes (``_clib``); CPU.
* ``triton``: Triton kernels for CUDA (``_quant_triton``, ``_topk_triton``, ``_bits_triton``);
  imported only when first used.

``backend=None`` picks the best available for the tensor's device (native on CPU,
triton on CUDA, else torch), once per op and device, and logs the choice once, as a
WARNING when the fast path is missing; naming a backend that cannot run raises
:class:`lowband.errors.BackendUnavailable`. Every backend returns the reference's codes,
indices and packed bytes bit for bit (the ``sign`` scale, a float sum, may differ in its
last bits). ``quantize`` and ``topk_tiles`` also take ``out=`` buffers.
"""

from __future__ import annotations

from lowband.kernels._backend import available_backends, resolve
from lowband.kernels._checksum import checksum
from lowband.kernels.bits import pack_bits, packed_size, unpack_bits
from lowband.kernels.dct import dct_basis, dct_tiles
from lowband.kernels.gaps import decode_gaps, encode_gaps
from lowband.kernels.quant import HALF_RANGE, dequantize, max_code, quantize
from lowband.kernels.topk import scatter_accumulate, tile_to_global, topk_count, topk_tiles

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
