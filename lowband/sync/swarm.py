"""``RolloutSwarm``: peers share decoded rollouts with each other, not gradients (SAPO).

In Swarm sAmpling Policy Optimization (Gensyn, 2025) every node generates rollouts, sends
them to its peers, and trains on a mix of its own and theirs. Each peer here binds an
inbox (a :class:`~lowband.sync.RolloutChannel` hub, with its tag checks: the policy's
version and fingerprint, a maximum lag, an optional ``check`` such as a
:mod:`lowband.sync.commit` verification) and pushes its own rollouts straight to every
other peer's inbox: no hub in the middle, and a peer accepts only what it can check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lowband.errors import ConfigError
from lowband.sync.rollouts import Rollout, RolloutChannel
from lowband.transport.security import Curve

__all__ = ["RolloutSwarm"]


class RolloutSwarm:
    """One peer: an inbox at :attr:`address`, and an outgoing channel to each peer.

    Args:
        bind: ``host:port`` of this peer's inbox.
        name: this peer's name (the tag its rollouts carry).
        peers: other peers' inbox addresses (more with :meth:`connect`).
        staleness, max_lag, check, max_bytes, history, hwm: the inbox's, as for
            :class:`~lowband.sync.RolloutChannel`.
        security / server_key: CURVE; the swarm's peers share one server key pair here.
    """

    def __init__(
        self,
        *,
        bind: str,
        name: str,
        peers: Sequence[str] = (),
        staleness: str = "async",
        max_lag: int | None = None,
        check: Callable[[Rollout], bool] | None = None,
        security: Curve | None = None,
        server_key: bytes | str | None = None,
        max_bytes: int = 1 << 30,
        history: int = 1024,
        hwm: int = 1000,
    ) -> None:
        self.name = name
        self._security, self._server_key = security, server_key
        self._max_bytes, self._hwm = max_bytes, hwm
        self.inbox = RolloutChannel(
            bind=bind,
            staleness=staleness,
            max_lag=max_lag,
            check=check,
            security=security,
            max_bytes=max_bytes,
            history=history,
            hwm=hwm,
        )
        self.address = self.inbox.address
        self._out: dict[str, RolloutChannel] = {}
        try:
            for p in peers:
                self.connect(p)
        except BaseException:
            self.close()
            raise

    def connect(self, peer: str) -> None:
        """Share with the peer whose inbox is at ``peer`` from now on."""
        if peer == self.address:
            raise ConfigError("a peer does not share with itself")
        if peer not in self._out:
            self._out[peer] = RolloutChannel(
                connect=peer,
                name=self.name,
                security=self._security,
                server_key=self._server_key,
                max_bytes=self._max_bytes,
                hwm=self._hwm,
            )

    def policy(self, version: int, fingerprint: int) -> None:
        """A policy version this peer knows (from its ``WeightSubscriber``): rollouts made
        with it are accepted, within the lag."""
        self.inbox.policy(version, fingerprint)

    def share(self, data: Any, *, version: int, fingerprint: int) -> int:
        """Send one of this peer's rollouts to every peer; the bytes sent in all. Never
        blocks: a peer whose queue is full misses it (counted in :attr:`dropped`)."""
        return sum(
            ch.push(data, version=version, fingerprint=fingerprint, timeout=0)
            for ch in self._out.values()
        )

    def pull(self, max_items: int | None = None, *, timeout: float = 0.0) -> list[Rollout]:
        """The peers' rollouts that passed this peer's checks."""
        return self.inbox.pull(max_items, timeout=timeout)

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """Per peer: rollouts accepted, stale, unknown, malformed and rejected here."""
        return self.inbox.counts

    @property
    def dropped(self) -> int:
        return sum(ch.dropped for ch in self._out.values())

    def close(self) -> None:
        for ch in self._out.values():
            ch.close()
        self.inbox.close()

    def __enter__(self) -> RolloutSwarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
