"""Error feedback: keep what was not sent and add it to the next input.

With residual ``r`` (fp32, one per key) and decay ``beta``, each call sends
``C(v)`` for ``v = x + beta * r`` and keeps ``r = v - decode(C(v))``. With
``beta = 1`` everything is eventually delivered (Seide et al. 2014, Karimireddy
et al. 2019); SparseLoCo uses ``beta = 0.95``. Quantizers and top-k fold this
into the same kernel pass that encodes; codecs with a ``dct`` stage keep the
residual in the input domain through one decode.

The residual stays bounded only when the codec is a contraction,
``|v - decode(C(v))| < |v|`` with room to spare (Karimireddy et al. 2019). Every
codec is, except one whose values are ``q1``: its levels are +-absmax, so a value near
zero is sent as +-absmax and its error is as large as the block's largest value.
Under round-to-nearest the residual then grows linearly (|r|/|x| near 56 after 1,000
steps of random inputs), under stochastic rounding (error below one step, 2 absmax)
geometrically (1e26 within 150 steps). ``ErrorFeedback`` refuses ``q1`` values with
a ConfigError; ``sign`` sends the same bit per value with the scale mean|v| and is a
contraction. The bound each accepted codec keeps is tested in
``tests/compress/test_feedback.py``.
"""

from __future__ import annotations

from typing import Any

import torch

from lowband.compress._codec import Codec
from lowband.compress._payload import Payload
from lowband.errors import ConfigError

__all__ = ["ErrorFeedback", "check_contraction", "encode_with_feedback"]


def check_contraction(codec: Codec) -> None:
    """ConfigError for a codec whose error feedback residual would grow without bound."""
    from lowband.compress._quant import BlockQuant, Sign

    value = codec.value
    if isinstance(value, BlockQuant) and value.bits == 1 and not isinstance(value, Sign):
        raise ConfigError(
            f"error feedback cannot be used with {str(codec)!r}: q1 decodes every value to "
            "+-absmax of its block, which is not a contraction, so the residual grows "
            "without bound; use 'sign' in place of 'q1' (the same bit per value, scaled by "
            "mean|v|), or turn error feedback off"
        )


def encode_with_feedback(
    codec: Codec, x: torch.Tensor, residual: torch.Tensor, decay: float = 1.0
) -> Payload:
    """Encode ``x + decay * residual`` and keep in ``residual`` (fp32, x.numel()) what was not sent.

    Quantizers and top-k do it in the pass that encodes; a codec with a ``dct`` stage keeps
    the residual in the input domain, so what was sent is decoded once and subtracted.
    """
    if codec.dct is None:
        return codec.encode(x, residual=residual, decay=decay)
    v = x.detach().reshape(-1).to(torch.float32) + (residual * decay if decay != 1.0 else residual)
    p = codec.encode(v.view(x.shape), dtype=x.dtype)
    sent = torch.zeros_like(v)
    codec.decode_into(p, sent, accumulate=False)
    residual.copy_(v - sent)
    return p


class ErrorFeedback:
    def __init__(self, codec: Codec | str, decay: float = 1.0) -> None:
        from lowband.compress._codec import parse

        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"error feedback decay must be in [0, 1], got {decay}")
        self.codec = parse(codec)
        check_contraction(self.codec)
        self.decay = float(decay)
        self.residuals: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"ErrorFeedback({str(self.codec)!r}, decay={self.decay})"

    def residual(self, key: str, like: torch.Tensor) -> torch.Tensor:
        r = self.residuals.get(key)
        if r is None:
            r = self.residuals[key] = torch.zeros(like.numel(), dtype=torch.float32, device=like.device)
        elif r.numel() != like.numel():
            raise ConfigError(f"error feedback key {key!r} holds {r.numel()} values, input has {like.numel()}")
        return r

    def encode(self, x: torch.Tensor, key: str = "", *, codec: Codec | None = None) -> Payload:
        """Encode ``x`` plus the residual kept under ``key``; keep the new residual."""
        c = self.codec if codec is None else codec
        if codec is not None:
            check_contraction(c)
        return encode_with_feedback(c, x, self.residual(key, x), self.decay)

    def reset(self, key: str | None = None) -> None:
        if key is None:
            self.residuals.clear()
        else:
            self.residuals.pop(key, None)

    def state_dict(self) -> dict[str, Any]:
        return {"codec": str(self.codec), "decay": self.decay, "residuals": {k: v.clone() for k, v in self.residuals.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("codec") != str(self.codec):
            raise ConfigError(f"error feedback state is for codec {state.get('codec')!r}, not {str(self.codec)!r}")
        self.decay = float(state["decay"])
        self.residuals = {k: v.detach().clone().to(torch.float32) for k, v in state["residuals"].items()}
