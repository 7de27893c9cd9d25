"""Cast codecs ``fp32``, ``fp16``, ``bf16``: values sent as floats of that width.

``fp16`` clamps finite values to +-65504 instead of overflowing to inf; NaN and
+-Inf inputs pass through unchanged on every cast (they are data, not an error).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowband.errors import ConfigError

__all__ = ["Cast"]

_WIDTH = {"fp32": (torch.float32, 4), "fp16": (torch.float16, 2), "bf16": (torch.bfloat16, 2)}
_FP16_MAX = 65504.0


_WIDEN_CHUNK = 1 << 20


def _sub_widened(r: torch.Tensor, w: torch.Tensor) -> None:
    """``r -= w.float()`` for a half-width ``w``, through a reused fp32 scratch of 1M values:
    torch's in-place op on mixed dtypes converts element by element (7x slower than a copy at
    16M values) and a whole-size ``w.float()`` is a fresh 4-byte-per-value allocation."""
    n = r.numel()
    scratch = torch.empty(min(n, _WIDEN_CHUNK), dtype=torch.float32, device=r.device)
    for lo in range(0, n, _WIDEN_CHUNK):
        hi = min(n, lo + _WIDEN_CHUNK)
        s = scratch[: hi - lo]
        s.copy_(w[lo:hi])
        r[lo:hi].sub_(s)


@dataclass(frozen=True)
class Cast:
    name: str = "fp32"

    def __post_init__(self) -> None:
        if self.name not in _WIDTH:
            raise ConfigError(f"unknown cast {self.name!r}")

    def __str__(self) -> str:
        return self.name

    @property
    def dtype(self) -> torch.dtype:
        return _WIDTH[self.name][0]

    def sizes(self, n: int) -> list[int]:
        return [n * _WIDTH[self.name][1]]

    def to_wire(self, v: torch.Tensor) -> torch.Tensor:
        """v (any float dtype, 1-D) as this cast's dtype, fp16 clamped to its range."""
        if self.name == "fp16":
            v32 = v.to(torch.float32)
            if v32.device.type == "cpu" and v32.numel():
                # one read (no device sync on the CPU): all within range, the clamp is a no-op;
                # a NaN makes both comparisons false and takes the careful path
                lo, hi = torch.aminmax(v32)
                if float(lo) >= -_FP16_MAX and float(hi) <= _FP16_MAX:
                    return v32.to(torch.float16)
            fin = torch.isfinite(v32)
            v32 = torch.where(fin, v32.clamp(-_FP16_MAX, _FP16_MAX), v32)
            return v32.to(torch.float16)
        return v.to(self.dtype)

    def encode(self, v: torch.Tensor, *, residual: torch.Tensor | None = None, decay: float = 1.0, seed: int = 0) -> list[torch.Tensor]:
        if residual is None:
            return [self.to_wire(v.reshape(-1)).contiguous().view(torch.uint8)]
        # in place in the residual (fp32, flat): v = x + decay * r there, then r = v - wire(v);
        # the same values as with temporaries, without allocating (and faulting in) two more
        # fp32 tensors of the input's size on every call
        if decay != 1.0:
            residual.mul_(decay)
        residual.add_(v.reshape(-1))
        w = self.to_wire(residual).contiguous()
        if w.dtype == torch.float32:  # the wire buffer must not be the residual itself
            w = w.clone()
            residual.sub_(w)
        else:
            _sub_widened(residual, w)
        return [w.view(torch.uint8)]

    def decode(self, bufs: list[torch.Tensor], n: int, out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
        w = bufs[0].view(self.dtype)
        if out is None:  # a new tensor: w may be a read-only received frame
            return w.to(torch.float32, copy=True)
        if accumulate:
            out.add_(w)
        else:
            out.copy_(w)
        return out

    def validate(self, bufs: list[torch.Tensor], n: int) -> None:
        return None
