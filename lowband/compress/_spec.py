"""Codec spec strings: ``parse("dct:chunk=64+topk:k=8,tile=4096+sign+lz4")``.

Stages are joined by ``+``; each is ``name`` or ``name:key=value,key=value``.
They must come in this order, each at most once: ``dct``, ``topk``, one value
codec (``fp32``, ``fp16``, ``bf16``, ``q8``, ``q4``, ``q2``, ``q1``, ``sign``; fp32 when
none is named), ``lz4``. ``str(codec)`` is the canonical spec and parses back to
an equal codec.
"""

from __future__ import annotations

from typing import Any

from lowband.compress._cast import Cast
from lowband.compress._codec import Codec
from lowband.compress._dct import DCT
from lowband.compress._quant import BlockQuant, Sign
from lowband.compress._topk import TopK
from lowband.errors import ConfigError

__all__ = ["parse"]

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


def parse(spec: str | Codec) -> Codec:
    """Parse a codec spec string (a Codec passes through). Raises ConfigError."""
    if isinstance(spec, Codec):
        return spec
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
    return Codec(value=parts.get("value", Cast("fp32")), topk=parts.get("topk"), dct=parts.get("dct"), lz4=parts.get("lz4", False))
