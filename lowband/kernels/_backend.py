"""Backend choice for the kernel ops, made once per op and device.

Each op module (``quant``, ``bits``, ``topk``, ``dct``, ``gaps``) declares an :class:`Op`
with its backends: ``torch`` (the reference, any device), ``native`` (C from csrc/, CPU)
and ``triton`` (CUDA; named as ``"module:function"`` so triton is imported only when a
Triton kernel is first asked for). ``backend=None`` takes the best backend for the
tensor's device: ``native`` on the CPU when it was built, ``triton`` on CUDA when triton
imports, else the ``torch`` reference. The choice is logged once per op and device; when
the fast path is missing the log line is a WARNING that says what was lost. Naming a
backend that cannot run raises :class:`lowband.errors.BackendUnavailable`.

The Triton kernels also run on CPU tensors under ``TRITON_INTERPRET=1`` (how the
test-suite checks them without a GPU); they are never picked automatically there.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from lowband.errors import BackendUnavailable, ConfigError
from lowband.kernels import _clib

__all__ = ["BACKENDS", "OPS", "SINGLE", "Op", "available_backends", "resolve"]

log = logging.getLogger(__name__)

BACKENDS = ("torch", "native", "triton")
#: Every op by name, filled as the op modules declare theirs.
OPS: dict[str, Op] = {}
#: The ops with one implementation for every backend (the checksum, the DCT's matmul),
#: registered by their modules.
SINGLE: dict[str, Callable[..., Any]] = {}
_announced: set[tuple[str, str]] = set()
_triton_found: bool | None = None


def _triton_importable() -> bool:
    global _triton_found
    if _triton_found is None:
        _triton_found = importlib.util.find_spec("triton") is not None
    return _triton_found


def _triton_runs_on(device: torch.device) -> bool:
    if not _triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device``, the one ``backend=None`` takes first."""
    dev = torch.device(device)
    found = []
    if dev.type == "cpu" and _clib.available():
        found.append("native")
    if dev.type == "cuda" and _triton_runs_on(dev):
        found.append("triton")
    found.append("torch")
    if dev.type == "cpu" and _triton_runs_on(dev):
        found.append("triton")
    return found


def _announce(op: str, chosen: str, device: torch.device) -> None:
    if (op, device.type) in _announced:
        return
    _announced.add((op, device.type))
    if device.type == "cpu" and chosen == "torch":
        log.warning(
            "lowband.kernels: %s runs on the torch reference on CPU because the native kernels are "
            "unavailable (%s): quantize, top-k and index coding run as multi-pass torch ops, several times "
            "slower (benchmarks/bench_kernels.py --backend torch). Rebuild with a C compiler: pip install -e .",
            op,
            _clib.missing_reason(),
        )
    elif device.type == "cuda" and chosen == "torch":
        log.warning(
            "lowband.kernels: %s runs on the torch reference on CUDA: triton is not importable", op
        )
    else:
        log.info("lowband.kernels: %s uses the %s backend on %s", op, chosen, device.type)


class Op:
    """One kernel op and its backends; :meth:`pick` resolves one once per
    (backend asked for, device type, ``TRITON_INTERPRET``): ops are called per buffer."""

    def __init__(
        self,
        name: str,
        *,
        torch: Callable[..., Any],
        native: Callable[..., Any] | None = None,
        triton: str | None = None,
    ) -> None:
        self.name = name
        self._backends: dict[str, Callable[..., Any] | str | None] = {
            "torch": torch,
            "native": native,
            "triton": triton,
        }
        self._resolved: dict[tuple[str | None, str, str | None], Callable[..., Any]] = {}
        OPS[name] = self

    def pick(self, backend: str | None, device: torch.device) -> Callable[..., Any]:
        key = (backend, device.type, os.environ.get("TRITON_INTERPRET"))
        fn = self._resolved.get(key)
        if fn is None:
            fn = self._resolved[key] = self._lookup(backend, device)
        return fn

    def _function(self, backend: str) -> Callable[..., Any] | None:
        fn = self._backends[backend]
        if isinstance(fn, str):
            module, _, attr = fn.partition(":")
            return getattr(importlib.import_module(module), attr)
        return fn

    def _lookup(self, backend: str | None, device: torch.device) -> Callable[..., Any]:
        if backend is None:
            for chosen in available_backends(device):
                fn = self._function(chosen)
                if fn is not None:
                    _announce(self.name, chosen, device)
                    return fn
            raise BackendUnavailable(
                f"no kernel backend runs {self.name} on {device.type}"
            )  # pragma: no cover
        if backend not in BACKENDS:
            raise ConfigError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
        if backend not in available_backends(device):
            why = (
                f": {_clib.missing_reason()}"
                if backend == "native" and device.type == "cpu"
                else ""
            )
            raise BackendUnavailable(
                f"kernel backend {backend!r} cannot run on {device.type} here{why}"
            )
        fn = self._function(backend)
        if fn is None:
            raise BackendUnavailable(f"kernel backend {backend!r} has no {self.name} kernel")
        return fn


def forget_choices() -> None:
    """Resolve and announce every op afresh (the tests of the choice itself)."""
    _announced.clear()
    for op in OPS.values():
        op._resolved.clear()


def resolve(op: str, device: torch.device | str = "cpu", *, backend: str | None = None) -> Any:
    """The kernel function that ``lowband.kernels.<op>`` calls for ``device``, looked up now.

    The public ops pick their backend from a cache on every call (about a microsecond); a
    hot loop that makes thousands of small calls resolves once and calls the result with the
    same arguments (minus ``backend=``). Raises ConfigError for an unknown op or backend and
    BackendUnavailable as the ops do.
    """
    single = SINGLE.get(op)
    if single is not None:  # one implementation, whatever the backend asked for
        return single
    found = OPS.get(op)
    if found is None:
        raise ConfigError(
            f"unknown kernel op {op!r}; choose one of {sorted(set(OPS) | set(SINGLE))}"
        )
    return found.pick(backend, torch.device(device))
