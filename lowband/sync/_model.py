"""Which tensors of a model the weight sync carries."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lowband.errors import ConfigError

__all__ = ["named_tensors"]


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
