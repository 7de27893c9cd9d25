"""DeMo's per-parameter state, and the checks a state dict must pass before it is loaded.

Each parameter with a gradient so far has, in ``optimizer.state[p]``:

* ``momentum_dct`` (parameters of two or more dimensions): the fp32 momentum as the DCT-II
  coefficients of its tiles, shape ``(ntiles, tile_numel)`` of
  ``param_layout(p.shape, chunk)`` (tile-major, as :meth:`TileLayout.forward`
  lays them out). DeMo updates it in the DCT domain (see :mod:`lowband.distro.demo`).
* ``momentum`` (1-D parameters and scalars, which are packed with their group's other
  1-D parameters): the fp32 momentum in the parameter's own shape.
* ``pending_update`` (only between an exchange and its application, ``overlap=True``):
  the fp32 update still to add, in the parameter's shape.

A checkpoint written before the momentum moved to the DCT domain holds ``momentum`` in
the parameter's shape for every parameter; :func:`checked_state` converts it (one
forward DCT, exact to fp32 rounding). One written before N-D parameters were tiled as
``(dim0, rest)`` (a state dict without ``"tiling": TILING``) holds the ``momentum_dct`` of a
parameter of three or more dimensions in the older layout ``(prod(shape[:-1]), shape[-1])``
(now the split with the fewest tiles, see :mod:`lowband.compress._dct`);
it is converted the same way (an inverse DCT in the old layout, a forward in the new).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from lowband.compress import TileLayout
from lowband.distro._bucket import param_layout
from lowband.errors import ConfigError

__all__ = ["MOMENTUM", "MOMENTUM_DCT", "PENDING", "TILING", "checked_state"]

TILING = 2  # the state dict's "tiling": N-D parameters split where they have the fewest tiles

MOMENTUM = "momentum"
MOMENTUM_DCT = "momentum_dct"
PENDING = "pending_update"


def checked_state(
    state_dict: Any,
    params: list[list[torch.Tensor]],
    *,
    check_group: Callable[[dict[str, Any]], None],
) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
    """Each parameter's saved buffers (by parameter), after checking everything.

    ``params`` are the optimizer's parameters group by group; ``check_group`` validates a
    saved param group's hyperparameters. Anything malformed raises ConfigError before
    the optimizer is touched.
    """
    legacy = isinstance(state_dict, dict) and state_dict.get("tiling") != TILING
    if not (
        isinstance(state_dict, dict)
        and isinstance(state_dict.get("state"), dict)
        and isinstance(state_dict.get("param_groups"), list)
    ):
        raise ConfigError("a DeMo state dict has 'state' (a dict) and 'param_groups' (a list)")
    groups = state_dict["param_groups"]
    if len(groups) != len(params):
        raise ConfigError(
            f"the state dict has {len(groups)} param groups, this optimizer {len(params)}"
        )
    out: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
    for n, (g, ps) in enumerate(zip(groups, params)):
        if not isinstance(g, dict) or not isinstance(g.get("params"), list):
            raise ConfigError(f"param group {n} of the state dict has no 'params' list")
        if len(g["params"]) != len(ps):
            raise ConfigError(
                f"param group {n} of the state dict has {len(g['params'])} parameters, "
                f"this optimizer's {len(ps)}"
            )
        check_group(g)
        for i, p in zip(g["params"], ps):
            saved = state_dict["state"].get(i)
            if saved is not None:
                out[p] = _buffers(saved, p, g["chunk"], f"parameter {i} (group {n})", legacy)
    return out


def _buffers(
    saved: Any, p: torch.Tensor, chunk: int, where: str, legacy: bool
) -> dict[str, torch.Tensor]:
    if not isinstance(saved, dict):
        raise ConfigError(f"{where}: its state is a {type(saved).__name__}, not a dict")
    unknown = set(saved) - {MOMENTUM, MOMENTUM_DCT, PENDING}
    if unknown:
        raise ConfigError(f"{where}: unknown state {sorted(map(str, unknown))}")
    for key, value in saved.items():
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
            raise ConfigError(f"{where}: {key} must be an fp32 tensor, got {_describe(value)}")
    bufs = {k: v.detach() for k, v in saved.items()}
    _shape(bufs, PENDING, tuple(p.shape), where)
    if p.dim() <= 1:
        if MOMENTUM_DCT in bufs:
            raise ConfigError(
                f"{where}: a parameter of shape {tuple(p.shape)} is packed and keeps its "
                f"momentum in its own shape ('{MOMENTUM}'), not '{MOMENTUM_DCT}'"
            )
        _shape(bufs, MOMENTUM, tuple(p.shape), where)
        return bufs
    lay = param_layout(p.shape, chunk)
    if MOMENTUM in bufs:
        if MOMENTUM_DCT in bufs:
            raise ConfigError(f"{where}: both '{MOMENTUM}' and '{MOMENTUM_DCT}'")
        _shape(bufs, MOMENTUM, tuple(p.shape), where)
        bufs[MOMENTUM_DCT] = lay.forward(bufs.pop(MOMENTUM))  # an older checkpoint
    elif legacy and p.dim() >= 3 and MOMENTUM_DCT in bufs:
        old = _legacy_layout(tuple(p.shape), chunk)
        _shape(bufs, MOMENTUM_DCT, (old.ntiles, old.tile_numel), where)
        bufs[MOMENTUM_DCT] = lay.forward(old.inverse(bufs[MOMENTUM_DCT]))
    _shape(bufs, MOMENTUM_DCT, (lay.ntiles, lay.tile_numel), where)
    return bufs


def _legacy_layout(shape: tuple[int, ...], chunk: int) -> TileLayout:
    """The layout of an N-D parameter before issue 17.5: ``(prod(shape[:-1]), shape[-1])``."""
    return TileLayout.for_matrix(shape, (math.prod(shape[:-1]), shape[-1]), chunk, full_tiles=False)


def _shape(bufs: dict[str, torch.Tensor], key: str, want: tuple[int, ...], where: str) -> None:
    if key in bufs and tuple(bufs[key].shape) != want:
        raise ConfigError(f"{where}: {key} has shape {tuple(bufs[key].shape)}, expected {want}")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor"
    return f"a {type(value).__name__}"
