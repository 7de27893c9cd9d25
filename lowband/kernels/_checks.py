"""Argument checks that every backend of an op makes, written once.

The reference (``_ref``), native (``_native``) and Triton (``_triton``) kernels of an op
take the same arguments and raise the same errors for bad ones; each calls these.
"""

from __future__ import annotations

from collections.abc import Mapping

from lowband.errors import CodecError, ConfigError

__all__ = ["NONFINITE", "nonfinite", "quantize_args", "topk_args"]

#: What a quantizer, sign or top-k says of NaN or Inf input (every backend).
NONFINITE = "input holds NaN or Inf: quantizers, sign and top-k accept finite values only"


def nonfinite() -> CodecError:
    return CodecError(NONFINITE)


def quantize_args(bits: int, block: int, sign: bool, half_range: Mapping[int, float]) -> None:
    """``quantize``: a bit width of the grid, a positive block, the sign grid only at 1 bit."""
    if bits not in half_range:
        raise CodecError(f"unsupported bit width {bits}")
    if block < 1:
        raise ConfigError(f"block must be >= 1, got {block}")
    if sign and bits != 1:
        raise ConfigError("the sign grid uses 1-bit codes")


def topk_args(k: int, tile: int) -> None:
    """``topk_tiles``: a tile of 1..65536 values and k >= 0."""
    if not 1 <= tile <= 65536:
        raise CodecError(f"tile {tile} must be in 1..65536")
    if k < 0:
        raise ConfigError(f"k must be >= 0, got {k}")
