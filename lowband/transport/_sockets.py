"""The ZeroMQ socket factory: the carrier's stream and heartbeat sockets, the coordinator,
its clients, weight sync and rollouts make their sockets with :func:`open_socket`.

A socket of one kind with ``LINGER`` 0 (closing never waits on an unreachable peer:
lowband re-sends what matters itself) and the named options set, in the order given;
if ZeroMQ refuses one, the socket is closed again before the error propagates, so a
failed construction leaks nothing. With an :class:`~lowband._endpoint.Endpoint`,
``ipv6`` follows the address (ZeroMQ refuses IPv6 addresses unless told).
"""

from __future__ import annotations

from typing import Any

import zmq

from lowband._endpoint import Endpoint

__all__ = ["open_socket"]

def open_socket(ctx: zmq.Context, kind: int, endpoint: Endpoint | None = None, **options: Any) -> zmq.Socket:
    """A ``kind`` socket of ``ctx`` with LINGER 0, IPV6 as ``endpoint`` needs, and ``options``."""
    sock = ctx.socket(kind)
    try:
        sock.linger = 0
        if endpoint is not None and endpoint.ipv6:
            sock.ipv6 = 1
        for name, value in options.items():
            setattr(sock, name, value)
    except BaseException:
        sock.close(0)
        raise
    return sock
