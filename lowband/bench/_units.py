"""Parsing of link rates and durations given on the ``lowband bench`` command line.

Rates are bits per second and need a unit: ``100mbit``, ``100Mbit/s``, ``1gbit``,
``500kbit``, or bytes per second with a capital ``B``: ``12.5MB/s``. Spellings
like ``100mbps`` are refused with a message, because tools disagree on them
(``tc`` reads ``mbps`` as megabytes per second, most people as megabits).
Durations need a unit too: ``50ms``, ``0.2s``, ``500us``.
"""

from __future__ import annotations

import re

from lowband.errors import ConfigError

__all__ = ["parse_rate", "parse_duration", "format_rate", "format_bytes"]

_NUMBER = r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e(?P<exp>[+-]?[0-9]+))?"
_RATE = re.compile(_NUMBER + r"\s*(?P<unit>[a-zA-Z/]+)$")
_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_TIME = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0}


def _number(m: re.Match[str]) -> float:
    value = float(m.group("num"))
    if m.group("exp"):
        value *= 10.0 ** int(m.group("exp"))
    return value


def parse_rate(text: str) -> float:
    """``"100mbit"`` -> ``1e8`` (bits per second). Raises :class:`ConfigError` with a hint."""
    s = text.strip()
    m = _RATE.match(s)
    hint = "write it like 100mbit, 1gbit, 500kbit (bits per second) or 12.5MB/s (bytes)"
    if m is None:
        raise ConfigError(f"bad rate {text!r}: {hint}")
    unit = m.group("unit")
    # Bytes per second: a capital B, as in 12.5MB/s or 12.5MB/sec.
    byte_unit = re.fullmatch(r"([kKmMgGtT]?)B/s(?:ec)?", unit)
    if byte_unit:
        bits = _number(m) * _PREFIX[byte_unit.group(1).lower()] * 8.0
    else:
        low = unit.lower()
        if re.fullmatch(r"[kmgt]?bps", low):
            raise ConfigError(
                f"ambiguous rate {text!r}: tc reads '{unit}' as bytes per second and most people "
                f"as bits; {hint}"
            )
        bit_unit = re.fullmatch(r"([kmgt]?)bits?(?:/s|/sec)?", low)
        if bit_unit is None:
            raise ConfigError(f"unknown rate unit {unit!r} in {text!r}: {hint}")
        bits = _number(m) * _PREFIX[bit_unit.group(1)]
    if bits <= 0:
        raise ConfigError(f"rate {text!r} must be positive")
    return bits


def parse_duration(text: str) -> float:
    """``"50ms"`` -> ``0.05`` (seconds). Raises :class:`ConfigError` for a missing or unknown unit."""
    s = text.strip()
    m = _RATE.match(s)
    if m is None or m.group("unit").lower() not in _TIME:
        raise ConfigError(f"bad duration {text!r}: write it like 50ms, 0.2s or 500us")
    return _number(m) * _TIME[m.group("unit").lower()]


def format_rate(bits_per_s: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits_per_s >= scale:
            return f"{bits_per_s / scale:g} {unit}"
    return f"{bits_per_s:g} bit/s"


def format_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"
