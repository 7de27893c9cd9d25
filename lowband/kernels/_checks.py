"""What more than one op checks or converts, written once.

The checks of a single op live with that op (``quant``, ``bits``, ``topk``, ``gaps``);
here are the few that several share: the non-finite input error and the fp32 view of a
caller's residual or output buffer.
"""

from __future__ import annotations

import torch

from lowband.errors import CodecError, ConfigError

__all__ = ["NONFINITE", "check_finite", "fp32_buffer", "nonfinite"]

#: What a quantizer, sign or top-k says of NaN or Inf input (every backend).
NONFINITE = "input holds NaN or Inf: quantizers, sign and top-k accept finite values only"


def nonfinite() -> CodecError:
    return CodecError(NONFINITE)


def check_finite(v: torch.Tensor) -> None:
    if v.numel() and not bool(torch.isfinite(v).all()):
        raise nonfinite()


def fp32_buffer(
    t: torch.Tensor, n: int, what: str, device: torch.device
) -> tuple[torch.Tensor, bool]:
    """A flat fp32 view of ``t`` (n elements on ``device``), or a converted copy when its dtype
    or layout differ; the second item says whether the caller copies the result back."""
    if t.numel() != n:
        raise ConfigError(f"{what} has {t.numel()} elements, {n} expected")
    if t.device != device:
        raise ConfigError(f"{what} is on {t.device}, the input on {device}")
    if t.dtype == torch.float32 and t.is_contiguous():
        return t.view(-1), False
    return t.reshape(-1).to(torch.float32).contiguous(), True
