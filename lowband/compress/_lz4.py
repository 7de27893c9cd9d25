"""``lz4``: a lossless last stage, each buffer compressed as one LZ4 block.

The uncompressed size of every buffer follows from the codec and the shape, so
the decoder passes it as the exact destination size and never allocates more
than the codec allows; LZ4 cannot expand data by more than 255:1, which bounds
what a small hostile frame may claim.
"""

from __future__ import annotations

import lz4.block

from lowband.errors import CodecError

__all__ = ["compress", "decompress", "bound"]


def bound(raw: int) -> int:
    """Largest LZ4 block for ``raw`` input bytes (LZ4_compressBound)."""
    return raw + raw // 255 + 16


def compress(data: memoryview | bytes) -> bytes:
    if len(data) == 0:
        return b""
    return lz4.block.compress(data, store_size=False, mode="default")


def decompress(data: memoryview | bytes, *, lo: int, hi: int) -> bytes:
    """Decompress to between ``lo`` and ``hi`` bytes (both set by the codec)."""
    if len(data) == 0:
        if lo > 0:
            raise CodecError("empty lz4 block where data was expected")
        return b""
    if hi > 255 * len(data) + 16:
        hi = 255 * len(data) + 16
    try:
        out = lz4.block.decompress(data, uncompressed_size=hi)
    except Exception as e:  # lz4 raises its own LZ4BlockError
        raise CodecError(f"lz4 block does not decompress: {e}") from None
    if not lo <= len(out) <= hi:
        raise CodecError(f"lz4 block decompressed to {len(out)} bytes, {lo}..{hi} expected")
    return out
