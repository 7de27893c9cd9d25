"""``open_socket``, the one ZeroMQ socket factory (issue 14, item 6)."""

from __future__ import annotations

import threading

import pytest
import zmq

from lowband._endpoint import Endpoint
from lowband.transport._sockets import open_socket


def _terminates(ctx: zmq.Context) -> bool:
    """Whether ``ctx.term()`` returns: it blocks while any socket of ``ctx`` is open."""
    t = threading.Thread(target=ctx.term, daemon=True)
    t.start()
    t.join(10)
    return not t.is_alive()


def test_options_are_set_and_ipv6_follows_the_endpoint() -> None:
    ctx = zmq.Context()
    ep = Endpoint.parse("[::1]:0", any_port=True)
    s = open_socket(ctx, zmq.ROUTER, ep, sndhwm=7, rcvhwm=9, maxmsgsize=4096)
    try:
        assert (s.linger, s.sndhwm, s.rcvhwm, s.maxmsgsize, s.ipv6) == (0, 7, 9, 4096, 1)
        port = s.bind_to_random_port(ep.url().rsplit(":", 1)[0])
        c = open_socket(ctx, zmq.DEALER, ep)
        c.connect(ep.url(port))
        c.send(b"over ipv6")
        assert s.poll(10_000)
        assert s.recv_multipart()[1] == b"over ipv6"
        c.close()
        v4 = open_socket(ctx, zmq.PUB, Endpoint("127.0.0.1", 1))
        assert v4.ipv6 == 0
        v4.close()
    finally:
        s.close()
    assert _terminates(ctx)


def test_a_refused_option_closes_the_socket_again() -> None:
    ctx = zmq.Context()
    with pytest.raises(AttributeError):
        open_socket(ctx, zmq.DEALER, sndhwm=1, no_such_option=3)
    with pytest.raises(zmq.ZMQError):
        open_socket(ctx, zmq.DEALER, routing_id=b"")  # an empty routing id is refused
    assert _terminates(ctx)
