"""Which tensors of a model the weight sync carries."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import torch

from lowband.errors import ConfigError, ConfigMismatch
from lowband.sync._wire import Manifest

__all__ = ["NameMap", "Selection", "check_manifest", "map_names", "named_tensors", "select"]

#: Which tensors to publish: a predicate on the name, or the names themselves.
Selection = Callable[[str], bool] | Collection[str]
#: Publisher name -> subscriber name: a mapping (names absent keep theirs) or a function.
NameMap = Mapping[str, str] | Callable[[str], str]


def named_tensors(
    model: torch.nn.Module | Mapping[str, torch.Tensor],
) -> list[tuple[str, torch.Tensor]]:
    """The floating-point parameters and buffers of ``model`` (or a name -> tensor mapping).

    Integer buffers (such as BatchNorm's ``num_batches_tracked``) are not weights and
    are left out. Every tensor must be a contiguous CPU tensor, since chunks are
    flat views of its storage.
    """
    if isinstance(model, torch.nn.Module):
        items = list(model.named_parameters()) + list(model.named_buffers())
    elif isinstance(model, Mapping):
        items = list(model.items())
    else:
        raise ConfigError(
            f"expected an nn.Module or a mapping of tensors, got {type(model).__name__}"
        )
    out = []
    seen: set[int] = set()
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"{name!r} is not a tensor")
        if not t.is_floating_point():
            continue
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ConfigError(
                f"tensor {name!r} must be a contiguous CPU tensor for the weight sync"
            )
        if id(t) in seen:
            continue  # tied weights travel once
        seen.add(id(t))
        out.append((str(name), t))
    if not out:
        raise ConfigError("the model has no floating-point tensors to sync")
    return out


def select(
    tensors: list[tuple[str, torch.Tensor]], only: Selection | None
) -> list[tuple[str, torch.Tensor]]:
    """The tensors ``only`` names (all when None); ConfigError if that leaves none, or if a
    name it lists is not in the model."""
    if only is None:
        return tensors
    if callable(only):
        out = [(n, t) for n, t in tensors if only(n)]
    else:
        wanted = set(only)
        unknown = sorted(wanted - {n for n, _ in tensors})[:5]
        if unknown:
            raise ConfigError(f"only= names tensors the model does not have: {unknown}")
        out = [(n, t) for n, t in tensors if n in wanted]
    if not out:
        raise ConfigError("only= selects none of the model's floating-point tensors")
    return out


def map_names(names: list[str], name_map: NameMap | None) -> list[str]:
    """Each publisher name as the subscriber calls it; ConfigMismatch if two land on one."""
    if name_map is None:
        out = names
    elif callable(name_map):
        out = [str(name_map(n)) for n in names]
    else:
        out = [str(name_map.get(n, n)) for n in names]
    if len(set(out)) != len(out):
        raise ConfigMismatch("name_map sends two published tensors to the same name")
    return out


def check_manifest(
    m: Manifest, tensors: Mapping[str, torch.Tensor], *, names: list[str], strict: bool = True
) -> None:
    """ConfigMismatch unless the subscriber's tensors match what the publisher serves.

    ``names`` are the published tensors' names as the subscriber calls them. Every one
    must be in ``tensors`` with the same shape, and (``strict``) no other; each dtype must
    be the published one, or float32 for bf16/fp16 weights (which it holds exactly).
    """
    missing = set(names) - set(tensors)
    if missing or (strict and set(tensors) != set(names)):
        extra = sorted(set(tensors) - set(names))[:5]
        raise ConfigMismatch(
            f"publisher and subscriber models differ: missing {sorted(missing)[:5]}, extra "
            f"{extra}" + ("" if missing else " (pass strict=False to receive only a subset)")
        )
    for name, spec in zip(names, m.tensors):
        t = tensors[name]
        if tuple(t.shape) != spec.shape:
            raise ConfigMismatch(
                f"{spec.name!r}: publisher shape {spec.shape}, subscriber {tuple(t.shape)}"
            )
        widened = t.dtype == torch.float32 and spec.dtype in (torch.bfloat16, torch.float16)
        if t.dtype != spec.dtype and not widened:
            raise ConfigMismatch(
                f"{spec.name!r}: published as {spec.dtype}, subscriber holds {t.dtype}"
            )
