"""Codec spec strings and what they fix: ``parse_spec("dct:chunk=64+topk:k=8,tile=4096+sign+lz4")``.

Stages are joined by ``+``; each is ``name`` or ``name:key=value,key=value``.
They must come in this order, each at most once: ``dct``, ``topk``, one value
codec (``fp32``, ``fp16``, ``bf16``, ``q8``, ``q4``, ``q2``, ``q1``, ``sign``; fp32 when
none is named), ``lz4``. ``str(spec)`` is the canonical spec and parses back to
an equal one.

A :class:`Spec` is the stages alone: enough to say which buffers, of which sizes, a
payload of a given shape carries (what the wire format checks before it trusts a
payload), nothing that encodes. :class:`lowband.compress.Codec` is a Spec that also
encodes and decodes; ``lowband.compress.parse`` gives one. Parsing is cached: a spec
string that arrives with every payload is parsed once per process, not per message.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lowband.compress import _lz4
from lowband.compress._cast import Cast
from lowband.compress._dct import DCT
from lowband.compress._quant import BlockQuant, Sign
from lowband.compress._topk import TopK
from lowband.errors import CodecError, ConfigError

__all__ = ["MAX_PAYLOAD_BYTES", "Spec", "parse_spec", "spec_fields"]

#: Default cap on the bytes a payload may carry or decode to (frames and output).
MAX_PAYLOAD_BYTES = 1 << 34


@dataclass(frozen=True)
class Spec:
    """The stages of a codec: an optional ``dct`` transform, optional ``topk``, a value codec,
    optional ``lz4``. ``str()`` is the canonical spec string (computed once)."""

    value: Cast | BlockQuant = field(default_factory=Cast)
    topk: TopK | None = None
    dct: DCT | None = None
    lz4: bool = False

    @functools.cached_property
    def spec(self) -> str:
        stages = [str(s) for s in (self.dct, self.topk) if s is not None]
        stages.append(str(self.value))
        if self.lz4:
            stages.append("lz4")
        return "+".join(stages)

    def __str__(self) -> str:
        return self.spec

    @property
    def sparse(self) -> bool:
        """True when only some positions travel: reduce by all-gather, not reduce-scatter."""
        return self.topk is not None

    def raw_bounds(self, shape: tuple[int, ...]) -> list[tuple[int, int]]:
        """``(min, max)`` bytes of each buffer before lz4, for a tensor of ``shape``."""
        n = 1
        for s in shape:
            n *= s
        m = self.dct.padded_numel(shape) if self.dct is not None else n
        if self.topk is None:
            return [(s, s) for s in self.value.sizes(m)]
        kk = self.topk.count(m)
        return [self.topk.index_size_bounds(m)] + [(s, s) for s in self.value.sizes(kk)]

    def check_lengths(self, shape: tuple[int, ...], lengths: Sequence[int], *, max_bytes: int = MAX_PAYLOAD_BYTES) -> None:
        """Raise CodecError unless ``lengths`` are what this codec writes for ``shape``."""
        bounds = self.raw_bounds(shape)
        if len(lengths) != len(bounds):
            raise CodecError(f"codec {self} writes {len(bounds)} buffers, payload has {len(lengths)}")
        for i, (got, (lo, hi)) in enumerate(zip(lengths, bounds)):
            if hi > max_bytes:
                raise CodecError(f"buffer {i} would decode to {hi} bytes, over the cap of {max_bytes}")
            if self.lz4:
                if got > _lz4.bound(hi) or (lo > 0 and got == 0) or (lo == 0 and hi == 0 and got):
                    raise CodecError(f"lz4 buffer {i} has {got} bytes, at most {_lz4.bound(hi)} expected")
            elif not lo <= got <= hi:
                raise CodecError(f"buffer {i} has {got} bytes, {lo}..{hi} expected for shape {shape} with {self}")

_ORDER = {"dct": 0, "topk": 1, "value": 2, "lz4": 3}
_VALUES = {"fp32", "fp16", "bf16", "q8", "q4", "q2", "q1", "sign"}
_OPTIONS = {
    "dct": {"chunk": int},
    "topk": {"k": int, "tile": int, "density": float},
    "q": {"block": int, "rounding": str},
    "sign": {"block": int},
    "cast": {},
    "lz4": {},
}


def _options(name: str, text: str, allowed: dict[str, type]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not text:
        return out
    for item in text.split(","):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"stage {name!r}: option {item!r} is not key=value")
        if key not in allowed:
            raise ConfigError(f"stage {name!r} has no option {key!r} (options: {sorted(allowed) or 'none'})")
        if key in out:
            raise ConfigError(f"stage {name!r}: option {key!r} given twice")
        try:
            out[key] = allowed[key](raw.strip())
        except ValueError:
            raise ConfigError(f"stage {name!r}: {key}={raw!r} is not a valid {allowed[key].__name__}") from None
    return out


def parse_spec(spec: str) -> Spec:
    """Parse a codec spec string into its stages. Raises ConfigError."""
    if not isinstance(spec, str):
        raise ConfigError(f"a codec spec is a non-empty string, got {spec!r}")
    return _parse_spec(spec)


@functools.lru_cache(maxsize=256)
def _parse_spec(spec: str) -> Spec:
    return Spec(**spec_fields(spec))


def spec_fields(spec: str) -> dict[str, Any]:
    """The stage objects a spec string names, as :class:`Spec`'s fields."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"a codec spec is a non-empty string, got {spec!r}")
    if len(spec) > 512:
        raise ConfigError("codec spec longer than 512 characters")
    parts: dict[str, Any] = {}
    last = -1
    for stage in spec.strip().split("+"):
        name, _, opts = stage.strip().partition(":")
        name = name.strip().lower()
        kind = "value" if name in _VALUES else name
        if kind not in _ORDER:
            raise ConfigError(f"unknown codec stage {name!r} in {spec!r} (stages: dct, topk, fp32, fp16, bf16, q8, q4, q2, q1, sign, lz4)")
        if _ORDER[kind] <= last:
            raise ConfigError(f"stage {name!r} is repeated or out of order in {spec!r} (order: dct, topk, value codec, lz4)")
        last = _ORDER[kind]
        if name == "dct":
            parts["dct"] = DCT(**_options(name, opts, _OPTIONS["dct"]))
        elif name == "topk":
            parts["topk"] = TopK(**_options(name, opts, _OPTIONS["topk"]))
        elif name == "lz4":
            _options(name, opts, _OPTIONS["lz4"])
            parts["lz4"] = True
        elif name == "sign":
            parts["value"] = Sign(**_options(name, opts, _OPTIONS["sign"]))
        elif name.startswith("q"):
            o = _options(name, opts, _OPTIONS["q"])
            rounding = o.pop("rounding", "nearest")
            if rounding not in ("nearest", "stochastic"):
                raise ConfigError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
            parts["value"] = BlockQuant(bits=int(name[1:]), stochastic=rounding == "stochastic", **o)
        else:
            _options(name, opts, _OPTIONS["cast"])
            parts["value"] = Cast(name)
    return {"value": parts.get("value", Cast("fp32")), "topk": parts.get("topk"), "dct": parts.get("dct"), "lz4": parts.get("lz4", False)}
