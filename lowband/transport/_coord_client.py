"""A peer's connection to the coordinator (see :mod:`lowband.transport.coordinator`).

One DEALER socket, used under a lock by whichever thread asks. Requests are
idempotent and carry an id; a reply to any id sent for the same question is
accepted, so a question can be re-asked with fresher information (a commit with
a smaller alive set) without losing the answer to the first asking.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from typing import Any

import zmq

from lowband.errors import ConfigError, ConfigMismatch, TransportError

__all__ = ["CoordinatorClient", "StaleEpoch"]


class StaleEpoch(TransportError):
    """The coordinator has moved on: this peer asked about an old epoch or is no longer a member."""


def _endpoint(address: str) -> str:
    if address.startswith("tcp://"):
        return address
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"coordinator address must be HOST:PORT, got {address!r}")
    return f"tcp://{host}:{port}"


class CoordinatorClient:
    def __init__(self, ctx: zmq.Context, address: str, *, security: Any = None) -> None:
        self.endpoint = _endpoint(address)
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0  # close never waits on an unreachable coordinator
        self.sock.maxmsgsize = 16 << 20  # views list every peer; still bounded
        self.sock.reconnect_ivl, self.sock.reconnect_ivl_max = 100, 2000  # ms, with backoff
        self.sock.tcp_keepalive, self.sock.tcp_keepalive_idle = 1, 20
        if security is not None:
            if security.coordinator_key is None:
                raise ConfigError(
                    "Curve(coordinator_key=...) is needed to reach a CURVE coordinator"
                )
            security.client(self.sock, security.coordinator_key)
        self.sock.connect(self.endpoint)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def ask(
        self, req: dict[str, Any], *, timeout: float, ids: set[int] | None = None
    ) -> dict[str, Any] | None:
        """Send ``req``; wait up to ``timeout`` s for a reply to it or to any of ``ids``
        (earlier askings of the same question). ``None`` on timeout."""
        with self._lock:
            rid = next(self._ids)
            if ids is not None:
                ids.add(rid)
            accept = ids if ids is not None else {rid}
            deadline = time.monotonic() + timeout
            # no connection yet (or CURVE refused us): the request waits at most `timeout`
            if not self.sock.poll(max(1, int(timeout * 1000)), zmq.POLLOUT):
                return None
            try:
                self.sock.send(json.dumps({**req, "id": rid}).encode(), zmq.NOBLOCK)
            except zmq.Again:
                return None
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not self.sock.poll(max(1, int(left * 1000))):
                    return None
                try:
                    rep = json.loads(self.sock.recv())
                except (ValueError, RecursionError) as e:
                    raise TransportError(
                        f"coordinator at {self.endpoint} sent a bad reply: {e}"
                    ) from e
                rid_got = rep.get("id") if isinstance(rep, dict) else None
                if not isinstance(rid_got, int) or rid_got not in accept:
                    continue  # an answer to a question nobody waits for any more
                if rep.get("ok") is True:
                    return rep
                kind, err = rep.get("kind"), str(rep.get("error"))
                if kind == "mismatch":
                    raise ConfigMismatch(err)
                if kind == "stale":
                    raise StaleEpoch(err)
                raise TransportError(f"coordinator refused {req.get('op')!r}: {err}")

    def close(self) -> None:
        self.sock.close(0)
