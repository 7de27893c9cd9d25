"""Versions every layer may read (a leaf module, like :mod:`lowband.errors`)."""

from __future__ import annotations

__all__ = ["WIRE_VERSION", "__version__"]

__version__ = "0.1.0"
#: Version of the payload and transport wire formats; peers must agree on it.
#: 2: payload checksums are XXH3-64 (were lb64), and the dct: stage tiles a tensor of
#: three or more dimensions at its fewest-tiles split (issue 14, items 4 and 8).
WIRE_VERSION = 2
