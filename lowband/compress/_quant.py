"""Blockwise quantizers ``q8``, ``q4``, ``q2``, ``q1`` and the scaled ``sign`` codec.

Grids (full statement and formulas in :mod:`lowband.kernels.quant`), per block of
``block`` values (default 256), ``absmax`` the block's largest magnitude:

=======  =============================  ====================  ===========================
codec    levels (in steps)              step                  round-to-nearest error
=======  =============================  ====================  ===========================
``q8``   -127 .. 127 (zero is a level)  absmax / 127          <= step/2 = absmax/254
``q4``   -7 .. 7 (zero is a level)      absmax / 7            <= step/2 = absmax/14
``q2``   -1.5, -0.5, 0.5, 1.5 (no zero) absmax / 1.5          <= step/2 = absmax/3
``q1``   -0.5, 0.5 (no zero)            absmax / 0.5          <= step/2 = absmax
``sign`` -0.5, 0.5 (no zero)            2 * mean|v|           none per element (L2-optimal)
=======  =============================  ====================  ===========================

Rounding is to nearest with ties up (``floor(v * inv + h + 0.5)``), or stochastic
(``rounding=stochastic``: unbiased, error below one step) with a counter-based
hash so every backend draws the same numbers. ``q1`` and ``sign`` send the same
bits under round-to-nearest (a bit per value: is it >= 0); they differ in the
magnitude: ``q1`` decodes to +-absmax (and is unbiased with stochastic rounding),
``sign`` to +-mean|v| (smallest squared error, biased: use it with error feedback).
On ``q8`` and ``q4`` zeros stay zeros; ``q2``, ``q1`` and ``sign`` have no zero level.
Quantizers reject NaN and Inf (one would poison a whole block's scale).
Wire: the packed codes (``bits`` per value, ``ceil(n * bits / 8)`` bytes) and one
fp32 step per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lowband import kernels
from lowband.errors import CodecError, ConfigError

__all__ = ["BlockQuant", "Sign"]


@dataclass(frozen=True)
class BlockQuant:
    bits: int = 8
    block: int = 256
    stochastic: bool = False

    def __post_init__(self) -> None:
        if self.bits not in kernels.HALF_RANGE:
            raise ConfigError(f"q{self.bits} is not a grid: choose q8, q4, q2 or q1")
        if self.block < 8 or self.block % 8 or self.block > (1 << 20):
            raise ConfigError(f"block must be a multiple of 8 between 8 and 2**20, got {self.block}")

    def __str__(self) -> str:
        opts = []
        if self.block != 256:
            opts.append(f"block={self.block}")
        if self.stochastic:
            opts.append("rounding=stochastic")
        return f"q{self.bits}" + (":" + ",".join(opts) if opts else "")

    def sizes(self, n: int) -> list[int]:
        return [kernels.packed_size(n, self.bits), 4 * (-(-n // self.block))]

    def encode(self, v: torch.Tensor, *, residual: torch.Tensor | None = None, decay: float = 1.0, seed: int = 0) -> list[torch.Tensor]:
        codes, steps = kernels.quantize(
            v, bits=self.bits, block=self.block, stochastic=self.stochastic, seed=seed, residual=residual, decay=decay
        )
        return [codes, steps.view(torch.uint8)]

    def decode(self, bufs: list[torch.Tensor], n: int, out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
        return kernels.dequantize(bufs[0], bufs[1].view(torch.float32), bits=self.bits, n=n, block=self.block, out=out, accumulate=accumulate)

    def validate(self, bufs: list[torch.Tensor], n: int) -> None:
        steps = bufs[1].view(torch.float32)
        if steps.numel() and steps.device.type == "cpu":
            # one numpy pass on this thread (NaN fails both comparisons): a few torch ops on
            # 64K scales cost more in thread-pool hand-offs than the decode they guard
            a = steps.numpy()
            if not bool(np.logical_and(a >= 0, a < np.inf).all()):
                raise CodecError("block scales must be finite and non-negative")
        elif steps.numel() and not bool((torch.isfinite(steps) & (steps >= 0)).all()):
            raise CodecError("block scales must be finite and non-negative")
        if self.bits in (8, 4) and n:
            top = kernels.max_code(bufs[0], self.bits, n)
            if top > 2 * kernels.HALF_RANGE[self.bits]:
                raise CodecError(f"code {top} lies outside the q{self.bits} grid")


@dataclass(frozen=True)
class Sign(BlockQuant):
    bits: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits != 1 or self.stochastic:
            raise ConfigError("sign is a deterministic 1-bit codec")

    def __str__(self) -> str:
        return "sign" + (f":block={self.block}" if self.block != 256 else "")

    def encode(self, v: torch.Tensor, *, residual: torch.Tensor | None = None, decay: float = 1.0, seed: int = 0) -> list[torch.Tensor]:
        codes, steps = kernels.quantize(v, bits=1, block=self.block, sign=True, residual=residual, decay=decay)
        return [codes, steps.view(torch.uint8)]
