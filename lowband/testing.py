"""Helpers for tests (and users' tests): in-process groups and local process groups.

In-process, fast (threads, no sockets)::

    from lowband.testing import ThreadGroup

    def step(group, x):                      # runs once per rank, on its own thread
        return group.all_reduce(x * (group.rank + 1), codec="q8").wait()

    with ThreadGroup(4) as tg:               # on_failure="raise"|"drop", peer_timeout=...
        results = tg.run(step, torch.ones(10))   # list indexed by rank; re-raises a rank's error
        tg.groups[0].stats                   # each rank's Group (real Group, real collectives)
        tg.kill(2)                           # rank 2 "crashes": the others see PeerLost

``tg.run(fn, *args, timeout=120, return_exceptions=False, ranks=None)`` calls
``fn(group, *args)`` on one thread per rank (``ranks`` to run a subset) and
returns the results by rank; with ``return_exceptions=True`` a rank's exception
is returned in its place instead of raised. A rank still running after
``timeout`` seconds raises ``CollectiveTimeout``.

Real processes (spawned, reused across tests): see :func:`spawn_group` and
:class:`ProcessPool` below.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from lowband.errors import CollectiveTimeout
from lowband.transport._local import LocalHub
from lowband.transport.group import Group

__all__ = ["ThreadGroup"]


class ThreadGroup:
    """``world_size`` ranks in this process, each with its own :class:`Group` over a shared hub."""

    def __init__(
        self,
        world_size: int,
        *,
        on_failure: str = "raise",
        peer_timeout: float = 30.0,
        timeout: float | None = None,
    ) -> None:
        self.hub = LocalHub(world_size, peer_timeout=peer_timeout)
        self.world_size = world_size
        self.groups = [
            Group(self.hub.carrier(r), on_failure=on_failure, timeout=timeout) for r in range(world_size)
        ]

    def kill(self, rank: int) -> None:
        """Simulate a crash of ``rank``: the others' waits on it raise PeerLost."""
        self.hub.kill(rank)

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        timeout: float = 120.0,
        return_exceptions: bool = False,
        ranks: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Call ``fn(group, *args, **kwargs)`` on one thread per rank; results by rank."""
        ranks = list(range(self.world_size)) if ranks is None else list(ranks)
        results: list[Any] = [None] * self.world_size
        errors: dict[int, BaseException] = {}

        def target(r: int) -> None:
            try:
                results[r] = fn(self.groups[r], *args, **kwargs)
            except BaseException as e:  # reported below, by rank
                errors[r] = e

        threads = [threading.Thread(target=target, args=(r,), name=f"rank-{r}", daemon=True) for r in ranks]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
        stuck = [r for r, t in zip(ranks, threads) if t.is_alive()]
        if stuck:
            for r in stuck:
                self.hub.kill(r)  # release whatever they wait on, so the threads end
            raise CollectiveTimeout(f"ranks {stuck} still running after {timeout}s")
        if return_exceptions:
            for r, e in errors.items():
                results[r] = e
        elif errors:
            raise errors[min(errors)]
        return results

    def close(self) -> None:
        self.hub.shutdown()
        for g in self.groups:
            g.close()

    def __enter__(self) -> ThreadGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
