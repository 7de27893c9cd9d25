"""A peer's connection to the coordinator (see :mod:`lowband.transport.coordinator`).

One DEALER socket, used under a lock by whichever thread asks. Requests are
idempotent and carry an id; a reply to any id sent for the same question is
accepted, so a question can be re-asked with fresher information (a commit with
a smaller alive set) without losing the answer to the first asking.

A monitor on the socket tells what the address did, so a wait that cannot end
says why at once instead of at its deadline: a CURVE handshake refused (this
key is not allowed, or the coordinator's key is wrong) raises
``SecurityError``; a listener that takes TCP connections but never completes a
ZeroMQ handshake (a torch ``TCPStore``, a web server) raises ``TransportError``
naming it. :meth:`CoordinatorClient.diagnose` says, for a timeout message,
whether anything answered at the address.
"""

from __future__ import annotations

import errno
import itertools
import json
import secrets
import socket
import threading
import time
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from lowband._endpoint import Endpoint
from lowband.errors import ConfigError, ConfigMismatch, RankInUse, SecurityError, TransportError
from lowband.transport._sockets import open_socket

__all__ = ["CoordinatorClient", "StaleEpoch", "UnknownToCoordinator", "route_source"]

_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
#: TCP connections that closed before any ZeroMQ handshake completed, before we say the
#: listener is not a lowband coordinator.
_FOREIGN_AFTER = 2
#: ms a TCP connection may take to complete its ZeroMQ (and CURVE) handshake; libzmq's default
#: is 30 s, which would hide a listener that is not a coordinator for a minute.
_HANDSHAKE_MS = 3000


class StaleEpoch(TransportError):
    """The coordinator has moved on: this peer asked about an old epoch or is no longer a member."""


class UnknownToCoordinator(TransportError):
    """The coordinator does not know this peer's group or registration (it restarted)."""


def route_source(host: str, port: int = 9) -> str:
    """The local address this machine uses to reach ``host``: the address of the interface
    whose route leads there (a UDP ``connect`` sends nothing; it only asks the kernel's
    routing table). A loopback ``host`` gives back a loopback address."""
    h = host.strip("[]")
    try:
        infos = socket.getaddrinfo(h, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise ConfigError(f"cannot resolve coordinator host {host!r}: {e}") from None
    last: OSError | None = None
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            try:
                s.connect(addr)
                return str(s.getsockname()[0])
            except OSError as e:
                last = e
    raise TransportError(f"no route from this machine to {host!r}: {last}")


class CoordinatorClient:
    def __init__(self, ctx: zmq.Context, address: str, *, security: Any = None) -> None:
        ep = Endpoint.parse(address, "coordinator address")
        self.endpoint = ep.url()
        if security is not None and security.coordinator_key is None:
            raise ConfigError(
                "CURVE is on but the coordinator's public key is not known: pass "
                "Curve.from_files(secret, allowed=[...], coordinator='coordinator.key') "
                "(or Curve(..., coordinator_key=...))"
            )
        self.curve = security is not None
        # linger 0: close never waits on an unreachable coordinator; views list every peer,
        # still bounded (maxmsgsize); reconnects back off 50 ms doubling to 1 s (a restarted
        # coordinator is found within a second of listening again); a routing id of our
        # own (random, never published): after a reconnect the coordinator still knows this
        # connection as the one that holds our rank
        self.sock = open_socket(
            ctx, zmq.DEALER, ep, maxmsgsize=16 << 20, reconnect_ivl=50, reconnect_ivl_max=1000,
            tcp_keepalive=1, tcp_keepalive_idle=20, handshake_ivl=_HANDSHAKE_MS,
            routing_id=b"\x01" + secrets.token_bytes(15),
        )
        if security is not None:
            security.client(self.sock, security.coordinator_key)
        self.monitor = self.sock.get_monitor_socket(_EVENTS)
        self.connected = 0  # TCP connections made
        self.handshakes = 0  # ZeroMQ (and CURVE) handshakes completed
        self.closed_early = 0  # connections closed before their handshake completed
        self.refused: int | None = None  # errno of the last failed connect attempt
        self.replied = False  # the coordinator has answered something
        self.last_reply = time.monotonic()  # when it last answered (or this client started)
        self._stash: dict[int, dict[str, Any]] = {}  # replies read by another asker
        self.sock.connect(self.endpoint)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # -- what the address did ---------------------------------------------------------
    def _events(self) -> None:
        while True:
            try:
                ev = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = ev["event"]
            if kind == zmq.EVENT_CONNECTED:
                self.connected += 1
                self._in_handshake = True
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshakes += 1
                self._in_handshake = False
            elif kind == zmq.EVENT_DISCONNECTED:
                if getattr(self, "_in_handshake", False):
                    self.closed_early += 1
                self._in_handshake = False
            elif kind == zmq.EVENT_CONNECT_RETRIED:
                self.refused = errno.ECONNREFUSED
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise SecurityError(
                    f"the coordinator at {self.endpoint} refused this peer's CURVE key: it is not "
                    "in the coordinator's allow-list (lowband coordinator --allow ...)"
                )
            elif kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self.closed_early += 1
                self._in_handshake = False
        # unreachable: the loop returns on Again

    def _check_foreign(self) -> None:
        if self.handshakes or self.closed_early < _FOREIGN_AFTER:
            return
        if self.curve:
            raise SecurityError(
                f"the coordinator at {self.endpoint} closes every connection during the CURVE "
                "handshake: its public key is not the coordinator_key given here, or it runs "
                "without CURVE"
            )
        raise TransportError(
            f"something at {self.endpoint} accepts TCP connections but closes them during the "
            "handshake: a coordinator that requires CURVE (pass security=...), or not a lowband "
            "coordinator at all (a torch TCPStore? under torchrun, call init_group() with no "
            "store=; elsewhere start `lowband coordinator --bind HOST:PORT` and pass its address)"
        )

    def diagnose(self) -> str:
        """One sentence for a timeout message: what answered at the coordinator's address."""
        try:
            self._events()
        except SecurityError as e:
            return str(e)
        if self.replied:
            return f"the coordinator at {self.endpoint} answers"
        if self.handshakes:
            return f"a ZeroMQ peer at {self.endpoint} accepted the connection but never replied"
        if self.connected:
            return f"something at {self.endpoint} accepted TCP connections but never completed a handshake"
        return (
            f"nothing answered at {self.endpoint} (connection refused or no route): is "
            "`lowband coordinator` running there, and is the port right?"
        )

    # -- requests ---------------------------------------------------------------------
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
            while not self.sock.poll(0, zmq.POLLOUT):
                self._events()
                self._check_foreign()
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.monitor.poll(max(1, int(min(left, 0.1) * 1000)))
            for i in accept & self._stash.keys():
                return self._result(req, self._stash.pop(i))
            try:
                self.sock.send(json.dumps({**req, "id": rid}).encode(), zmq.NOBLOCK)
            except zmq.Again:
                return None
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                if not self.sock.poll(max(1, int(min(left, 0.2) * 1000))):
                    self._events()
                    self._check_foreign()
                    continue
                try:
                    rep = json.loads(self.sock.recv())
                except (ValueError, RecursionError) as e:
                    raise TransportError(
                        f"coordinator at {self.endpoint} sent a bad reply: {e}"
                    ) from e
                self.replied = True
                self.last_reply = time.monotonic()
                rid_got = rep.get("id") if isinstance(rep, dict) else None
                if not isinstance(rid_got, int):
                    continue  # a liveness probe (id null), or junk
                if rid_got not in accept:
                    # another thread's question (or one nobody waits for any more): kept a while
                    self._stash[rid_got] = rep
                    while len(self._stash) > 64:
                        self._stash.pop(next(iter(self._stash)))
                    continue
                return self._result(req, rep)

    def _result(self, req: dict[str, Any], rep: dict[str, Any]) -> dict[str, Any]:
        if rep.get("ok") is True:
            return rep
        kind, err = rep.get("kind"), str(rep.get("error"))
        if kind == "mismatch":
            raise ConfigMismatch(err)
        if kind == "stale":
            raise StaleEpoch(err)
        if kind == "duplicate":
            raise RankInUse(err)
        if kind == "security":
            raise SecurityError(f"the coordinator at {self.endpoint} refused {req.get('op')!r}: {err}")
        if kind == "unknown":
            raise UnknownToCoordinator(err)
        raise TransportError(f"coordinator refused {req.get('op')!r}: {err}")

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)
        self.sock.close(0)
