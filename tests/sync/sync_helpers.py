"""Helpers for the weight-sync tests: a publisher and subscribers on loopback, closed after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lowband.sync import WeightPublisher, WeightSubscriber

TIMEOUT = 20.0


def same_bits(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], dtype: torch.dtype | None = None
) -> bool:
    """True when every tensor of ``b`` holds exactly the bits of ``a`` (cast to ``dtype`` first)."""
    for k, x in a.items():
        x = x if dtype is None else x.to(dtype)
        y = b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            return False
    return True


def zeros_like(
    model: dict[str, torch.Tensor], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    return {
        k: torch.zeros(v.shape, dtype=v.dtype if dtype is None else dtype) for k, v in model.items()
    }


@contextmanager
def pair(
    model: dict[str, torch.Tensor], replica: dict[str, torch.Tensor], **kw: object
) -> Iterator[tuple[WeightPublisher, WeightSubscriber]]:
    """A publisher of ``model`` (first version published) and a synced subscriber of ``replica``."""
    sub_kw = {k: kw.pop(k) for k in ("security_sub", "server_key", "max_pending") if k in kw}
    sec = sub_kw.pop("security_sub", None)
    with WeightPublisher(model, **kw) as pub:  # type: ignore[arg-type]
        pub.publish()
        with WeightSubscriber(replica, connect=pub.address, security=sec, **sub_kw) as sub:  # type: ignore[arg-type]
            assert sub.update(block=True, timeout=TIMEOUT) == pub.version
            yield pub, sub
