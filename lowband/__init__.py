"""lowband: train PyTorch models across machines joined by internet links.

The public names are loaded lazily so that ``import lowband`` stays cheap and
has no side effects (no threads, sockets, logging set-up or environment reads).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lowband._version import WIRE_VERSION, __version__

__all__ = [
    "__version__",
    "WIRE_VERSION",
    "errors",
    "compress",
    "kernels",
    "init_group",
    "DiLoCo",
    "DeMo",
    "CompressedGradients",
    "save",
    "load",
]

_LAZY = {
    "init_group": ("lowband.transport", "init_group"),
    "DiLoCo": ("lowband.optim", "DiLoCo"),
    "CompressedGradients": ("lowband.optim", "CompressedGradients"),
    "DeMo": ("lowband.distro", "DeMo"),
    "save": ("lowband.checkpoint", "save"),
    "load": ("lowband.checkpoint", "load"),
}
_SUBMODULES = {"errors", "compress", "kernels", "transport", "optim", "distro", "sync", "wan", "bench", "testing"}

if TYPE_CHECKING:  # pragma: no cover
    from lowband import compress, errors, kernels  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"lowband.{name}")
    raise AttributeError(f"module 'lowband' has no attribute {name!r}")
