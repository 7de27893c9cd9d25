"""Atomic, hashed checkpoints: ``lowband.save(path, model, optimizer, **extra)`` / ``lowband.load(...)``.

A checkpoint holds the model and optimizer state dicts (lowband optimizers keep every
buffer, with its dtype and device, in ``state_dict()``), the Python, NumPy and torch
(CPU and CUDA) RNG states, and whatever the caller passes (such as the data position),
so a resumed run continues bit for bit.

File layout (format ``lowband-checkpoint/2``, no pickle anywhere)::

    magic b"LBCKPT\\x00\\x00" | u32 version (2) | u64 header length H | header (H bytes, JSON)
    | tensor data (the tensors' raw bytes, back to back, in header order)
    | sha256 of every byte before it (32 bytes)

The header is a tagged tree: plain JSON scalars, ``{"list": [...]}``, ``{"tuple": [...]}``,
``{"dict": [[key, value], ...]}`` (keys str or int) and
``{"tensor": [dtype, shape, nbytes, device]}``. Loading checks, before anything is applied:
the file size against ``max_bytes``; the header length against the file size and
``MAX_HEADER``; that the tensors' declared sizes add up exactly to the file size (so no
allocation exceeds the bytes present); the hash; then every section (model keys and
shapes, optimizer groups, each RNG state tried on a fresh generator). Only then does it
apply the optimizer, the model and the RNG states. Any failure is a ``CheckpointError``.

Writes go to a temporary file ``.lowband-ckpt.<host>.<pid>.<random>.tmp`` in the same
directory, flushed and fsynced, then renamed over ``path`` (and the directory fsynced), so a
crash or a full disk mid-write leaves the previous checkpoint intact. Each save removes the
temporary files that writers on this host left when they died (their pid is gone); a live
writer's file is never touched.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import re
import secrets
import socket
from typing import Any

import numpy as np
import torch

from lowband._frames import Layout
from lowband.errors import CheckpointError, ConfigError, LowbandError

__all__ = ["save", "load", "remove_orphans", "FORMAT", "MAX_BYTES", "MAX_HEADER"]

FORMAT = "lowband-checkpoint/2"
VERSION = 2
MAGIC = b"LBCKPT\x00\x00"
#: The file's prefix: magic, u32 format version, u64 header length.
_PREFIX = Layout("checkpoint", MAGIC, VERSION, "Q", version_name="format version", version_code="I",
                 error=CheckpointError)
DIGEST = 32
#: Default cap on a checkpoint file's size at load (``load(max_bytes=...)`` to change it).
MAX_BYTES = 64 << 30
#: Cap on the JSON header (the structure without tensor bytes).
MAX_HEADER = 64 << 20
_MAX_DEPTH = 64

_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)
}
for _name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        _DTYPES[_name] = getattr(torch, _name)

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
_TMP = re.compile(r"^\.lowband-ckpt\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>[0-9]+)\.[0-9a-f]+\.tmp$")


# -- RNG states ------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _parse_rng(state: Any) -> tuple[Any, Any, torch.Tensor, list[torch.Tensor] | None]:
    """Turn a loaded RNG section into setter arguments, each tried on a fresh generator."""
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state):
        raise CheckpointError("rng section: needs python, numpy and torch states")
    py = state["python"]
    if not (isinstance(py, tuple) and len(py) == 3 and isinstance(py[1], tuple)):
        raise CheckpointError("rng section: bad python state")
    py = (py[0], py[1], py[2])
    n = state["numpy"]
    if not isinstance(n, dict) or not isinstance(n.get("keys"), torch.Tensor) or n["keys"].dtype != torch.int64:
        raise CheckpointError("rng section: bad numpy state")
    keys = n["keys"].numpy()
    if keys.ndim != 1 or keys.min(initial=0) < 0 or keys.max(initial=0) >= 1 << 32:
        raise CheckpointError("rng section: numpy keys out of range")
    np_state: Any = (n.get("kind"), keys.astype(np.uint32), n.get("pos"), n.get("has_gauss"), n.get("cached"))
    t = state["torch"]
    cuda = state.get("cuda")
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
        raise CheckpointError("rng section: bad torch state")
    if cuda is not None and not (isinstance(cuda, list) and all(isinstance(c, torch.Tensor) and c.dtype == torch.uint8 for c in cuda)):
        raise CheckpointError("rng section: bad cuda states")
    try:
        random.Random().setstate(py)
        np.random.RandomState().set_state(np_state)
        torch.Generator().set_state(t)
    except (TypeError, ValueError, RuntimeError, OverflowError, IndexError, KeyError) as e:
        raise CheckpointError(f"rng section: {e}") from e
    return py, np_state, t, cuda


def _set_rng(py: Any, np_state: Any, t: torch.Tensor, cuda: list[torch.Tensor] | None) -> None:
    random.setstate(py)
    np.random.set_state(np_state)
    torch.set_rng_state(t)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# -- the tagged tree ---------------------------------------------------------------------


def _encode(value: Any, tensors: list[torch.Tensor], where: str) -> Any:
    """The JSON node for ``value``; tensors are appended to ``tensors``. ConfigError for what cannot be saved."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else {"float": repr(float(value))}
    if isinstance(value, torch.Tensor):
        name = str(value.dtype).removeprefix("torch.")
        if name not in _DTYPES or value.layout != torch.strided or value.is_quantized:
            raise ConfigError(f"checkpoint {where}: tensor of dtype {value.dtype} / layout {value.layout} cannot be saved")
        t = value.detach()
        tensors.append(t)
        return {"tensor": [name, list(t.shape), t.numel() * t.element_size(), str(t.device)]}
    if isinstance(value, (list, tuple)):
        tag = "list" if isinstance(value, list) else "tuple"
        return {tag: [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise ConfigError(f"checkpoint {where}: key {k!r} is not a str or int")
            items.append([k, _encode(v, tensors, f"{where}[{k!r}]")])
        return {"dict": items}
    raise ConfigError(f"checkpoint {where} is a {type(value).__name__}: pass tensors, numbers, strings or containers of them")


class _Decoder:
    """Rebuild the tree from a parsed header; tensors are read from the file as they come."""

    def __init__(self, f: io.BufferedReader, hasher: Any, data_bytes: int) -> None:
        self.f, self.hasher, self.left = f, hasher, data_bytes

    def tensor(self, spec: Any) -> torch.Tensor:
        if not (isinstance(spec, list) and len(spec) == 4):
            raise CheckpointError("bad tensor entry")
        name, shape, nbytes, device = spec
        if not isinstance(name, str) or name not in _DTYPES or not isinstance(shape, list) or not isinstance(device, str):
            raise CheckpointError(f"bad tensor entry {spec!r:.200}")
        if any(type(s) is not int or s < 0 for s in shape) or len(shape) > 32 or type(nbytes) is not int:
            raise CheckpointError(f"bad tensor shape {shape!r:.200}")
        dtype = _DTYPES[name]
        if math.prod(shape) * dtype.itemsize != nbytes or nbytes > self.left:
            raise CheckpointError(f"tensor of {nbytes} bytes does not fit its shape {shape} or the file")
        self.left -= nbytes
        raw = torch.empty(nbytes, dtype=torch.uint8)
        view = raw.numpy().data
        got = self.f.readinto(view) if nbytes else 0
        if got != nbytes:
            raise CheckpointError("checkpoint is truncated")
        self.hasher.update(view)
        return raw.view(dtype).reshape(shape)  # placed on its device by _place, after the hash is checked

    def node(self, x: Any, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise CheckpointError("checkpoint structure nested too deeply")
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, float):
            return x
        if not (isinstance(x, dict) and len(x) == 1):
            raise CheckpointError(f"bad node {x!r:.100}")
        (tag, body), = x.items()
        if tag == "tensor":
            return _Tensor(self.tensor(body), body[3])
        if tag == "float":
            if body not in ("inf", "-inf", "nan"):
                raise CheckpointError(f"bad float {body!r:.100}")
            return float(body)
        if tag in ("list", "tuple") and isinstance(body, list):
            out = [self.node(v, depth + 1) for v in body]
            return out if tag == "list" else tuple(out)
        if tag == "dict" and isinstance(body, list):
            d: dict[Any, Any] = {}
            for item in body:
                if not (isinstance(item, list) and len(item) == 2) or isinstance(item[0], bool) or not isinstance(item[0], (str, int)):
                    raise CheckpointError(f"bad dict item {item!r:.100}")
                d[item[0]] = self.node(item[1], depth + 1)
            return d
        raise CheckpointError(f"bad node tag {tag!r:.100}")


class _Tensor:
    """A tensor read from the file with the device it was saved on, until the hash is checked."""

    __slots__ = ("t", "device")

    def __init__(self, t: torch.Tensor, device: str) -> None:
        self.t, self.device = t, device


def _place(x: Any, device: str | torch.device | None) -> Any:
    if isinstance(x, _Tensor):
        target = x.device if device is None else device
        try:
            return x.t if str(target) == "cpu" else x.t.to(target)
        except (RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"cannot place a tensor on {target!r:.50}: {e}") from e
    if isinstance(x, list):
        return [_place(v, device) for v in x]
    if isinstance(x, tuple):
        return tuple(_place(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _place(v, device) for k, v in x.items()}
    return x


# -- temporary files -------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # exists (another user's) or not a pid we can judge: keep its file
    return True


def remove_orphans(directory: str) -> list[str]:
    """Delete the temporary files of this host's dead checkpoint writers in ``directory``; return their names."""
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _TMP.match(name)
        if m is None or m["host"] != _HOST or _pid_alive(int(m["pid"])):
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(name)
        except FileNotFoundError:
            pass  # another writer removed it first
        except OSError:
            pass  # not ours to fight over; the next save tries again
    return removed


# -- save / load -----------------------------------------------------------------------


def save(path: str | os.PathLike[str], model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None = None, **extra: Any) -> None:
    """Write a checkpoint atomically; raise CheckpointError (the old file survives) on failure."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tensors: list[torch.Tensor] = []
    tree = _encode({
        "format": FORMAT,
        "model": model.state_dict() if model is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": _rng_state(),
        "extra": extra,
    }, tensors, "checkpoint")
    header = json.dumps(tree, separators=(",", ":"), allow_nan=False).encode()
    if len(header) > MAX_HEADER:
        raise ConfigError(f"checkpoint structure is {len(header)} bytes of header, over {MAX_HEADER}: pack small values into tensors")
    remove_orphans(directory)
    name = os.path.join(directory, f".lowband-ckpt.{_HOST}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    tmp: str | None = name  # None once renamed
    try:
        with open(name, "xb") as f:
            h = hashlib.sha256()
            for chunk in (_PREFIX.pack(len(header)), header):
                f.write(chunk)
                h.update(chunk)
            for t in tensors:
                raw = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data
                f.write(raw)
                h.update(raw)
            f.write(h.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(name, path)
        tmp = None
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"could not write checkpoint {path!r}: {e}; the previous checkpoint is untouched") from e
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def _read(path: str, max_bytes: int, device: str | torch.device | None) -> dict[str, Any]:
    """Read, size-check and hash-check the whole file; return the tree (nothing applied)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError as e:
        raise CheckpointError(f"no checkpoint at {path!r}") from e
    except OSError as e:
        raise CheckpointError(f"cannot open checkpoint {path!r}: {e}") from e
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise CheckpointError(f"checkpoint {path!r} is {size} bytes, over the cap of {max_bytes} (load(max_bytes=...))")
            prefix = f.read(_PREFIX.size)
            if prefix[:2] == b"PK":
                raise CheckpointError(f"{path!r} is not a {FORMAT} file: it is a torch zip (lowband-checkpoint/1 "
                                      f"from an older lowband, or foreign); this lowband reads only {FORMAT}")
            try:  # size, magic and version, checked by the layout
                (hlen,) = _PREFIX.unpack(prefix)
            except CheckpointError as e:
                raise CheckpointError(f"{path!r}: {e} ({FORMAT})") from None
            data_bytes = size - _PREFIX.size - hlen - DIGEST
            if hlen > MAX_HEADER or data_bytes < 0:
                raise CheckpointError(f"{path!r}: header of {hlen} bytes does not fit the file or the cap {MAX_HEADER}")
            h = hashlib.sha256(prefix)
            header = f.read(hlen)
            if len(header) != hlen:
                raise CheckpointError(f"{path!r} is truncated")
            h.update(header)
            try:
                raw_tree = json.loads(header)
            except (ValueError, RecursionError) as e:  # JSON errors are ValueErrors; bad UTF-8 too
                raise CheckpointError(f"{path!r}: header is corrupt ({e})") from e
            dec = _Decoder(f, h, data_bytes)
            tree = dec.node(raw_tree)
            if dec.left != 0:
                raise CheckpointError(f"{path!r}: {dec.left} bytes of tensor data belong to no tensor")
            digest = f.read(DIGEST + 1)
        except CheckpointError:
            raise  # already names the path (it is an OSError too)
        except OSError as e:
            raise CheckpointError(f"cannot read checkpoint {path!r}: {e}") from e
    if digest != h.digest():
        raise CheckpointError(f"checkpoint {path!r} is corrupt: its sha256 does not match its content")
    if not (isinstance(tree, dict) and tree.get("format") == FORMAT and set(tree) == {"format", "model", "optimizer", "rng", "extra"}):
        raise CheckpointError(f"{path!r} is not a {FORMAT} checkpoint")
    if not isinstance(tree["extra"], dict) or not all(isinstance(k, str) for k in tree["extra"]):
        raise CheckpointError(f"{path!r}: bad extra section")
    return {k: (_place(v, device) if k != "rng" else _place(v, "cpu")) for k, v in tree.items()}


def _check_model(state: Any, model: torch.nn.Module) -> None:
    mine = model.state_dict()
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("model section is not a dict of tensors")
    if set(state) != set(mine):
        missing, unexpected = sorted(set(mine) - set(state))[:5], sorted(set(state) - set(mine), key=str)[:5]
        raise CheckpointError(f"model section does not match the model: missing {missing}, unexpected {unexpected}")
    for k, v in mine.items():
        if state[k].shape != v.shape:
            raise CheckpointError(f"model section: {k} has shape {tuple(state[k].shape)}, the model {tuple(v.shape)}")


def _check_optimizer(state: Any, optimizer: torch.optim.Optimizer) -> None:
    mine = optimizer.state_dict()
    if not (isinstance(state, dict) and isinstance(state.get("state"), dict) and isinstance(state.get("param_groups"), list)):
        raise CheckpointError("optimizer section needs a state dict and a param_groups list")
    groups = state["param_groups"]
    if len(groups) != len(mine["param_groups"]) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) and len(g["params"]) == len(m["params"])
        for g, m in zip(groups, mine["param_groups"])
    ):
        raise CheckpointError("optimizer section: its param_groups do not match the optimizer's")
    ids = [p for g in groups for p in g["params"]]
    if not all(type(p) is int for p in ids):
        raise CheckpointError("optimizer section: parameter ids are not ints")
    if not all(isinstance(v, dict) for v in state["state"].values()) or not set(state["state"]) <= set(ids):
        raise CheckpointError("optimizer section: state for parameters it does not list")


def load(
    path: str | os.PathLike[str],
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
    map_location: str | torch.device | None = "cpu",
    max_bytes: int = MAX_BYTES,
) -> dict[str, Any]:
    """Restore model, optimizer and RNG states from ``path``; return the ``extra`` dict.

    Everything is read and checked (size caps, sha256, every section) before anything is
    applied; on any failure a ``CheckpointError`` is raised and model, optimizer and RNG
    are as they were (an optimizer whose own ``load_state_dict`` rejects the state is the
    one case applied first, before the model, so the model stays untouched).
    ``map_location=None`` puts each tensor back on the device it was saved from.
    """
    path = os.fspath(path)
    blob = _read(path, max_bytes, map_location)
    rng = _parse_rng(blob["rng"]) if restore_rng else None
    if model is not None:
        if blob["model"] is None:
            raise CheckpointError(f"checkpoint {path!r} holds no model state")
        _check_model(blob["model"], model)
    if optimizer is not None:
        if blob["optimizer"] is None:
            raise CheckpointError(f"checkpoint {path!r} holds no optimizer state")
        _check_optimizer(blob["optimizer"], optimizer)
        try:
            optimizer.load_state_dict(blob["optimizer"])
        except LowbandError:
            raise  # the optimizer's own clear refusal (such as ConfigMismatch)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
            raise CheckpointError(f"checkpoint {path!r}: the optimizer refused its state: {e}") from e
    if model is not None:
        try:
            model.load_state_dict(blob["model"])
        except (RuntimeError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path!r}: the model refused its state: {e}") from e
    if rng is not None:
        _set_rng(*rng)
    return dict(blob["extra"])
