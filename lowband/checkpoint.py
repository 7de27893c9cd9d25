"""Atomic checkpoints: ``lowband.save(path, model, optimizer, **extra)`` / ``lowband.load(...)``.

A checkpoint is written to a temporary file in the same directory, flushed and
fsynced, then renamed over ``path`` (and the directory fsynced), so a crash or a
full disk mid-write leaves the previous checkpoint intact. It holds the model and
optimizer state dicts (lowband optimizers keep every buffer, with its dtype and
device, in ``state_dict()``), the Python, NumPy and torch (CPU and CUDA) RNG
states, and whatever the caller passes (such as the data position), so a resumed
run continues bit for bit.

Loading never unpickles arbitrary objects: it uses ``torch.load(weights_only=True)``,
so ``extra`` values must be tensors, numbers, strings, bools, None, or lists,
tuples and dicts of those.
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any

import numpy as np
import torch

from lowband.errors import CheckpointError, ConfigError

__all__ = ["save", "load", "FORMAT"]

FORMAT = "lowband-checkpoint/1"


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_PLAIN = (torch.Tensor, int, float, str, bool, type(None))


def _check_plain(value: Any, where: str) -> None:
    """Refuse what weights_only loading could not read back, before anything is written."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise ConfigError(f"checkpoint extra {where}: key {k!r} is not a str or int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise ConfigError(f"checkpoint extra {where} is a {type(value).__name__}: pass tensors, numbers, strings or containers of them")


def save(path: str | os.PathLike[str], model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None = None, **extra: Any) -> None:
    """Write a checkpoint atomically; raise CheckpointError (the old file survives) on failure."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    for key, value in extra.items():
        _check_plain(value, key)
    blob = {
        "format": FORMAT,
        "model": model.state_dict() if model is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": _rng_state(),
        "extra": extra,
    }
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".lowband-ckpt-", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"could not write checkpoint {path!r}: {e}; the previous checkpoint is untouched") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def load(
    path: str | os.PathLike[str],
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
    map_location: str | torch.device | None = "cpu",
) -> dict[str, Any]:
    """Restore model, optimizer and RNG states from ``path``; return the ``extra`` dict."""
    path = os.fspath(path)
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"no checkpoint at {path!r}") from e
    except Exception as e:  # torch raises several kinds for corrupt or hostile files
        raise CheckpointError(f"checkpoint {path!r} is unreadable or corrupt: {e}") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a {FORMAT} checkpoint")
    if model is not None:
        if blob["model"] is None:
            raise CheckpointError(f"checkpoint {path!r} holds no model state")
        model.load_state_dict(blob["model"])
    if optimizer is not None:
        if blob["optimizer"] is None:
            raise CheckpointError(f"checkpoint {path!r} holds no optimizer state")
        optimizer.load_state_dict(blob["optimizer"])
    if restore_rng:
        _set_rng_state(blob["rng"])
    return dict(blob["extra"])
