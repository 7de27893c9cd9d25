"""A minimal in-process group for the optimizer tests: N ranks as threads.

It follows the Group contract of the brief (all_reduce with codec and error
feedback, broadcast, stats) with a plain all-gather of decoded contributions,
summed in rank order so every rank gets the same bits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from lowband.transport import CommStats


class _Done:
    def __init__(self, result: torch.Tensor) -> None:
        self.result = result

    def wait(self) -> torch.Tensor:
        return self.result


class _World:
    def __init__(self, n: int) -> None:
        self.n = n
        self.barrier = threading.Barrier(n, timeout=30)
        self.slots: list[Any] = [None] * n


class ThreadPeer:
    def __init__(self, world: _World, rank: int) -> None:
        self._w = world
        self.rank = rank
        self.world_size = world.n
        self.epoch = 0
        self.stats = CommStats()
        self.calls: list[str] = []

    def _exchange(self, item: Any) -> list[Any]:
        self._w.slots[self.rank] = item
        self._w.barrier.wait()
        got = list(self._w.slots)
        self._w.barrier.wait()
        return got

    def all_reduce(self, tensor, codec=None, op="mean", error_feedback=None, key=""):
        self.calls.append(f"all_reduce:{key}")
        if codec is None:
            mine = tensor.detach().reshape(-1).to(torch.float32).clone()
            nbytes = mine.numel() * 4
        else:
            p = error_feedback.encode(tensor, key=key) if error_feedback is not None else codec.encode(tensor)
            mine = codec.decode(p).reshape(-1).to(torch.float32)
            nbytes = p.nbytes
        for peer in range(self.world_size):
            if peer != self.rank:
                self.stats.count_send(peer, nbytes)
                self.stats.count_recv(peer, nbytes)
        parts = self._exchange(mine)
        out = torch.zeros_like(mine)
        for part in parts:
            out += part
        if op == "mean":
            out /= self.world_size
        return _Done(out.view(tensor.shape))

    def broadcast(self, tensor, src=0):
        self.calls.append("broadcast")
        parts = self._exchange(tensor.detach().clone())
        if self.rank != src:
            self.stats.count_recv(src, tensor.nbytes)
            with torch.no_grad():
                tensor.copy_(parts[src])
        else:
            for peer in range(self.world_size):
                if peer != src:
                    self.stats.count_send(peer, tensor.nbytes)
        return _Done(tensor)

    def barrier(self) -> None:
        self._exchange(None)

    def close(self) -> None:
        pass


def run_ranks(n: int, fn: Callable[[ThreadPeer], Any]) -> list[Any]:
    """Run ``fn(group)`` on n threads; return the results by rank, re-raising the first error."""
    world = _World(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def body(rank: int) -> None:
        try:
            results[rank] = fn(ThreadPeer(world, rank))
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
            world.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    if any(t.is_alive() for t in threads):
        raise TimeoutError("a rank thread did not finish in 60 s")
    return results
