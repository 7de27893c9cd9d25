"""Which tensors of a model the weight sync carries."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lowband.errors import ConfigError, ConfigMismatch
from lowband.sync._wire import Manifest

__all__ = ["check_manifest", "named_tensors"]


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


def check_manifest(m: Manifest, tensors: Mapping[str, torch.Tensor]) -> None:
    """ConfigMismatch unless the subscriber's tensors match what the publisher serves.

    Names and shapes must be equal; each dtype must be the published one, or float32
    for bf16/fp16 weights (which it holds exactly).
    """
    names = {t.name for t in m.tensors}
    if names != set(tensors):
        missing, extra = sorted(names - set(tensors))[:5], sorted(set(tensors) - names)[:5]
        raise ConfigMismatch(
            f"publisher and subscriber models differ: missing {missing}, extra {extra}"
        )
    for spec in m.tensors:
        t = tensors[spec.name]
        if tuple(t.shape) != spec.shape:
            raise ConfigMismatch(
                f"{spec.name!r}: publisher shape {spec.shape}, subscriber {tuple(t.shape)}"
            )
        widened = t.dtype == torch.float32 and spec.dtype in (torch.bfloat16, torch.float16)
        if t.dtype != spec.dtype and not widened:
            raise ConfigMismatch(
                f"{spec.name!r}: published as {spec.dtype}, subscriber holds {t.dtype}"
            )
