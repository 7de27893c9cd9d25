"""Socket plumbing shared by the weight sync and the rollout channel.

Addresses are ``host:port`` or ``tcp://host:port`` (``[::1]:port`` for IPv6, always in
brackets: :class:`lowband._endpoint.Endpoint`);
port 0 binds a free port. A socket that binds with ``security`` set is a CURVE
server behind the allow-list of :class:`lowband.transport.security.Curve`; a
connecting one is a CURVE client of the server's public key. A client whose
key the server refuses sees ``EVENT_HANDSHAKE_FAILED_AUTH`` on its monitor, which
:class:`AuthWatch` turns into :class:`lowband.errors.SecurityError` instead of
ZeroMQ's silent retries.
"""

from __future__ import annotations

import logging

import zmq
from zmq.utils.monitor import parse_monitor_message

from lowband._endpoint import Endpoint
from lowband.errors import ConfigError, SecurityError, TransportError
from lowband.transport.security import Curve, warn_if_exposed

__all__ = ["Endpoint", "AuthWatch", "parse_endpoint", "bind_socket", "connect_socket", "to_key"]

log = logging.getLogger(__name__)


def parse_endpoint(addr: str, what: str) -> Endpoint:
    """``addr`` as an :class:`~lowband._endpoint.Endpoint` (port 0: bind a free port)."""
    return Endpoint.parse(addr, what, any_port=True)


def bind_socket(sock: zmq.Socket, ep: Endpoint, security: Curve | None, what: str) -> int:
    """Bind ``sock`` (as a CURVE server when ``security`` is set); the port it got."""
    warn_if_exposed(ep.host, security, what)
    if security is not None:
        security.server(sock)
    sock.ipv6 = ep.ipv6
    try:
        if ep.port == 0:
            return sock.bind_to_random_port(ep.url().rsplit(":", 1)[0])
        sock.bind(ep.url())
    except zmq.ZMQError as e:
        raise TransportError(f"{what}: cannot bind {ep.url()}: {e}") from e
    return ep.port


def connect_socket(
    sock: zmq.Socket, url: str, *, ipv6: bool, security: Curve | None, server_key: bytes | None
) -> None:
    """Connect ``sock`` to ``url`` (as a CURVE client of ``server_key`` when ``security`` is set)."""
    if security is not None:
        if server_key is None:
            raise ConfigError("security is set: pass server_key, the publisher's public CURVE key")
        security.client(sock, server_key)
    sock.ipv6 = ipv6
    try:
        sock.connect(url)
    except zmq.ZMQError as e:
        raise TransportError(f"cannot connect to {url}: {e}") from e


class AuthWatch:
    """Watches a connecting socket's handshakes; :meth:`check` raises if the server refused us."""

    def __init__(self, sock: zmq.Socket) -> None:
        self._mon = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        )
        self._sock = sock
        self.refused = False

    def check(self) -> None:
        while not self.refused and self._mon.poll(0):
            event = parse_monitor_message(self._mon.recv_multipart())
            if event["event"] in (
                zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
            ):
                self.refused = True
        if self.refused:
            raise SecurityError(
                f"the server at {self._sock.last_endpoint.decode(errors='replace')} refused this "
                "socket's CURVE handshake (key not on its allow-list, or wrong server key)"
            )

    def close(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._mon.close(linger=0)


def to_key(key: bytes | str | None) -> bytes | None:
    if key is None:
        return None
    raw = key.encode("ascii") if isinstance(key, str) else bytes(key)
    if len(raw) != 40:
        raise ConfigError(f"a CURVE public key is 40 z85 characters, got {len(raw)}")
    return raw
