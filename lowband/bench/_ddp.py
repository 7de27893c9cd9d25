"""The benchmark's baseline: data parallelism with bucketed all-reduce overlapped with backward.

This is what a good data-parallel implementation does (PyTorch DDP, Li et al. 2020,
"PyTorch Distributed: Experiences on Accelerating Data Parallel Training"): gradients
are grouped into flat buckets in the reverse order of the parameters (the order
backward produces them), and each bucket's ``group.all_reduce`` starts as soon as its
last gradient is accumulated, so communication runs while backward computes the
rest. After backward, :meth:`BucketedAllReduce.wait` collects the averaged buckets
and writes them back into ``.grad`` before the optimizer step.

Buckets are launched strictly in index order, so every peer issues its collectives
in the same sequence whatever order the hooks fire in. Like PyTorch DDP, construction
broadcasts rank 0's parameters so that every peer starts from the same weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lowband.errors import ConfigError

__all__ = ["BucketedAllReduce"]


class BucketedAllReduce:
    """Average the gradients of ``params`` over ``group`` during backward, bucket by bucket."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        group: Any,
        *,
        bucket_bytes: int = 256 * 1024,
        codec: Any = None,
    ) -> None:
        if bucket_bytes < 1:
            raise ConfigError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        unique: dict[int, torch.nn.Parameter] = {}
        for p in params:
            if p.requires_grad:
                unique.setdefault(id(p), p)
        ordered = list(unique.values())[::-1]  # backward produces the last layers first
        self.group = group
        self.codec = codec
        self.buckets: list[list[torch.nn.Parameter]] = []
        size = 0
        for p in ordered:
            nbytes = p.numel() * 4  # fp32 on the wire
            if not self.buckets or size + nbytes > bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += nbytes
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._ready = [0] * len(self.buckets)
        self._launched = 0
        self._works: list[Any] = []
        self.syncs = 0  # completed steps' all-reduces (each step is one sync of every bucket)
        with torch.no_grad():  # one flat broadcast: one round trip, not one per tensor
            flat = torch.cat([p.detach().reshape(-1).float() for p in ordered])
            group.broadcast(flat, src=0).wait()
            offset = 0
            for p in ordered:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in ordered]

    def _on_grad(self, p: torch.Tensor) -> None:
        b = self._bucket_of[id(p)]
        self._ready[b] += 1
        while self._launched < len(self.buckets) and self._ready[self._launched] == len(
            self.buckets[self._launched]
        ):
            self._launch(self._launched)

    def _launch(self, b: int) -> None:
        flat = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float()
                for p in self.buckets[b]
            ]
        )
        self._works.append(self.group.all_reduce(flat, codec=self.codec, op="mean"))
        self._launched += 1

    def wait(self) -> None:
        """Finish every bucket's all-reduce and write the averages into ``.grad``."""
        while self._launched < len(self.buckets):  # parameters that received no gradient
            self._launch(self._launched)
        for bucket, work in zip(self.buckets, self._works):
            mean = work.wait()
            offset = 0
            for p in bucket:
                n = p.numel()
                chunk = mean[offset : offset + n].view_as(p)
                if p.grad is None:
                    p.grad = chunk.to(p.dtype).clone()
                else:
                    p.grad.copy_(chunk)
                offset += n
        self._works.clear()
        self.syncs += 1
        self._ready = [0] * len(self.buckets)
        self._launched = 0

    def remove(self) -> None:
        """Detach the hooks from the parameters."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
