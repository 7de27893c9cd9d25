"""Tensor kernels behind the codecs, one function per op, three backends each.

``backend=None`` picks the best available for the tensor's device and logs the
choice once; naming a backend that cannot run raises
:class:`lowband.errors.BackendUnavailable`. The torch reference in ``_ref`` is
the specification: every backend returns the same codes and indices.
"""

from __future__ import annotations

from lowband.kernels._dispatch import (
    available_backends,
    checksum,
    dct_tiles,
    decode_gaps,
    dequantize,
    encode_gaps,
    pack_bits,
    quantize,
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
    "pack_bits",
    "packed_size",
    "quantize",
    "scatter_accumulate",
    "tile_to_global",
    "topk_count",
    "topk_tiles",
    "unpack_bits",
]
