"""A codec: an optional ``dct`` transform, optional ``topk``, a value codec, optional ``lz4``.

``encode(tensor) -> Payload`` and ``decode(payload) -> tensor`` are the pair every
layer above uses; ``decode_into`` adds into an fp32 buffer (what a reduction
needs) and ``decode_sum`` adds several peers' payloads, in the given order, so
every peer that sums the same payloads gets the same bits. Work is done in fp32
whatever the wire carries.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lowband.compress import _lz4
from lowband.compress._payload import DTYPE_CODES, Payload
from lowband.compress._spec import Spec, spec_fields
from lowband.errors import CodecError, ConfigError

__all__ = ["Codec", "parse"]

_seeds = itertools.count(1)


def parse(spec: str | Codec) -> Codec:
    """Parse a codec spec string (a Codec passes through). Raises ConfigError.

    Cached: a codec is resolved once where it enters (an optimizer, a collective's
    configuration) and travels as this object; the same string gives the same Codec.
    """
    if isinstance(spec, Codec):
        return spec
    if not isinstance(spec, str):
        raise ConfigError(f"a codec spec is a non-empty string, got {spec!r}")
    return _parse(spec)


@functools.lru_cache(maxsize=256)
def _parse(spec: str) -> Codec:
    return Codec(**spec_fields(spec))


def _bytes_tensor(data: bytes | memoryview) -> torch.Tensor:
    """A uint8 tensor over ``data`` without a copy. Decoders only read their buffers, so a
    read-only buffer (a received frame) is fine; torch's warning about it is silenced."""
    if not len(data):
        return torch.zeros(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable"
        return torch.frombuffer(data, dtype=torch.uint8)


@dataclass(frozen=True, repr=False)
class Codec(Spec):
    """A :class:`~lowband.compress._spec.Spec` that encodes and decodes."""

    def __repr__(self) -> str:
        return f"Codec({str(self)!r})"


    # -- encode --------------------------------------------------------------------------------

    def encode(
        self,
        x: torch.Tensor,
        *,
        residual: torch.Tensor | None = None,
        decay: float = 1.0,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> Payload:
        """Encode ``x``; with ``residual`` (fp32, x.numel()), fold in and update error feedback.

        ``dtype`` overrides the dtype recorded for decoding (default ``x.dtype``).
        """
        dtype = x.dtype if dtype is None else dtype
        if not x.is_floating_point() or dtype not in DTYPE_CODES:
            raise CodecError(f"codecs encode float16/bfloat16/float32/float64 tensors, got {x.dtype}")
        if self.dct is not None and residual is not None:
            raise CodecError("pass dct codecs through ErrorFeedback, which keeps the residual in the input domain")
        if seed is None:
            seed = next(_seeds) if getattr(self.value, "stochastic", False) else 0
        shape = tuple(x.shape)
        v = x.detach().reshape(-1)
        if x.dtype == torch.float64:
            v = v.to(torch.float32)
        if residual is not None and residual.numel() != v.numel():
            raise CodecError(f"residual has {residual.numel()} values, input {v.numel()}")
        if self.dct is not None:
            v = self.dct.forward(x.detach())
        if self.topk is not None:
            r = residual.reshape(-1) if residual is not None else None
            pos, vals, idx = self.topk.select(v, residual=r, decay=decay)
            bufs = [idx, *self.value.encode(vals, seed=seed)]
            if r is not None:
                r[pos] -= self.value.decode(bufs[1:], vals.numel())
        else:
            r = residual.reshape(-1) if residual is not None else None
            bufs = self.value.encode(v, residual=r, decay=decay, seed=seed)
        frames: list = [b.contiguous().view(torch.uint8).reshape(-1).cpu() for b in bufs]
        if self.lz4:
            frames = [_lz4.compress(memoryview(b.numpy())) for b in frames]
        p = Payload(spec=self.spec, dtype=dtype, shape=shape, buffers=frames)
        p.mark_checked()  # written by this codec for this shape
        return p

    # -- decode --------------------------------------------------------------------------------

    def _buffers(self, p: Payload) -> list[torch.Tensor]:
        if p.spec != self.spec:
            raise CodecError(f"payload was encoded with {p.spec!r}, not {self.spec!r}")
        bounds = self.raw_bounds(p.shape)
        if not p.checked():  # from_frames and encode check once; a hand-built payload here
            self.check_lengths(p.shape, [b.nbytes for b in p.buffers])
        raw: list[torch.Tensor] = []
        for b, (lo, hi) in zip(p.buffers, bounds):
            data = _lz4.decompress(b, lo=lo, hi=hi) if self.lz4 else b
            raw.append(_bytes_tensor(data))
        return raw

    def _decode_flat(self, p: Payload, out: torch.Tensor | None, accumulate: bool) -> torch.Tensor:
        """Decode into a flat fp32 vector (``out`` if given), before any reshape."""
        bufs = self._buffers(p)
        n = p.numel
        m = self.dct.padded_numel(p.shape) if self.dct is not None else n
        if self.topk is None:
            self.value.validate(bufs, m)
            if self.dct is None:
                if out is not None and out.device.type != "cpu":  # decode where out lives
                    bufs = [b.to(out.device) for b in bufs]
                return self.value.decode(bufs, n, out=out, accumulate=accumulate)
            coef = self.value.decode(bufs, m)
        else:
            pos = self.topk.positions(bufs[0], m)
            vals_bufs = bufs[1:]
            self.value.validate(vals_bufs, pos.numel())
            vals = self.value.decode(vals_bufs, pos.numel())
            if self.dct is None:
                if out is None:
                    out = torch.zeros(n, dtype=torch.float32)
                elif not accumulate:
                    out.zero_()
                out.index_add_(0, pos.to(out.device), vals.to(out.device))
                return out
            coef = torch.zeros(m, dtype=torch.float32)
            coef[pos] = vals
        dense = self.dct.inverse(coef, p.shape).reshape(-1)  # type: ignore[union-attr]
        if out is None:
            return dense
        if accumulate:
            out.add_(dense.to(out.device))
        else:
            out.copy_(dense)
        return out

    def decode(self, p: Payload) -> torch.Tensor:
        """The tensor ``p`` stands for, in its original shape and dtype (CPU)."""
        return self._decode_flat(p, None, False).to(p.dtype).reshape(p.shape)

    def decode_into(self, p: Payload, out: torch.Tensor, *, accumulate: bool = True) -> torch.Tensor:
        """Add (or with ``accumulate=False`` write) the decoded values into fp32 ``out``."""
        if out.dtype != torch.float32 or out.numel() != p.numel or not out.is_contiguous():
            raise CodecError(f"decode_into needs a contiguous fp32 tensor of {p.numel} values")
        self._decode_flat(p, out.view(-1), accumulate)
        return out

    def decode_sum(self, payloads: Sequence[Payload], out: torch.Tensor) -> torch.Tensor:
        """Add every payload into fp32 ``out``, in order (one inverse DCT for dct codecs)."""
        if self.dct is None or self.topk is None:
            for p in payloads:
                self.decode_into(p, out)
            return out
        shape = payloads[0].shape if payloads else tuple(out.shape)
        m = self.dct.padded_numel(shape)
        coef = torch.zeros(m, dtype=torch.float32)
        for p in payloads:
            if p.shape != shape:
                raise CodecError(f"payload shapes differ: {p.shape} vs {shape}")
            bufs = self._buffers(p)
            pos = self.topk.positions(bufs[0], m)
            self.value.validate(bufs[1:], pos.numel())
            coef.index_add_(0, pos, self.value.decode(bufs[1:], pos.numel()))
        out.view(-1).add_(self.dct.inverse(coef, shape).reshape(-1).to(out.device))
        return out
