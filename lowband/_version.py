"""Versions every layer may read (a leaf module, like :mod:`lowband.errors`)."""

from __future__ import annotations

__all__ = ["WIRE_VERSION", "__version__"]

__version__ = "0.1.0"
#: Version of the payload and transport wire formats; peers must agree on it.
WIRE_VERSION = 1
