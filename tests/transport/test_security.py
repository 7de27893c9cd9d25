"""CURVE: allowed keys join and talk; a wrong key can neither join nor inject; key files."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import zmq
import zmq.auth

from lowband import cli
from lowband.errors import CollectiveTimeout, ConfigError, SecurityError, TransportError
from lowband.transport._wire import DATA, pack_header
from lowband.transport._zmq import ZmqCarrier
from lowband.transport._zmq_link import identity
from lowband.transport.coordinator import start_coordinator
from lowband.transport.security import Curve, generate_keys, is_loopback


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    for name in ("coord", "rank0", "rank1"):
        generate_keys(d / "ok", name)
    generate_keys(d / "bad", "mallory")
    return d


def test_keys_generate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["keys", "generate", "--dir", str(tmp_path), "--name", "alice"]) == 0
    pub, sec = tmp_path / "alice.key", tmp_path / "alice.key_secret"
    public, secret = zmq.auth.load_certificate(str(sec))
    assert secret is not None and zmq.auth.load_certificate(str(pub))[0] == public
    assert os.stat(sec).st_mode & 0o777 == 0o600
    assert public.decode() in capsys.readouterr().out
    assert cli.main(["keys", "generate", "--dir", str(tmp_path), "--name", "alice"]) == 2  # no overwrite


def test_curve_config_checks() -> None:
    with pytest.raises(ConfigError):
        Curve(b"short", b"x" * 40)
    with pytest.raises(ConfigError):
        Curve.from_files("/nonexistent/key_secret")
    pub, sec = zmq.curve_keypair()
    c = Curve(pub, sec)
    assert c.allowed == {pub}
    with pytest.raises(SecurityError):
        c.check_allowed(zmq.curve_keypair()[0], "rank 3")
    assert is_loopback("127.0.0.5") and is_loopback("::1") and not is_loopback("10.0.0.1")


def _curve(keys: Path, name: str, folder: str = "ok") -> Curve:
    return Curve.from_files(keys / folder / f"{name}.key_secret", allowed=[keys / "ok"],
                            coordinator=keys / "ok" / "coord.key")


def test_curve_group_works_and_strangers_are_refused(keys: Path) -> None:
    args = ["--curve-secret", str(keys / "ok" / "coord.key_secret"), "--allow", str(keys / "ok")]
    with start_coordinator(args=args) as co:
        out: list[ZmqCarrier | None] = [None, None]

        def make(r: int) -> None:
            out[r] = ZmqCarrier(r, 2, coordinator=co.address, security=_curve(keys, f"rank{r}"),
                                peer_timeout=10, streams=2, join_timeout=60)

        ts = [threading.Thread(target=make, args=(r,)) for r in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(90)
        assert None not in out
        c0, c1 = out  # type: ignore[misc]
        try:
            c0.send(1, (0, 1, 0), [b"sealed"], payload_bytes=6)
            assert bytes(c1.recv(0, (0, 1, 0), timeout=30)[0]) == b"sealed"

            # a stranger's key cannot join through the coordinator, and hears why at once (a
            # SecurityError from the refused handshake, long before its 60 s join_timeout)
            mallory = Curve.from_files(keys / "bad" / "mallory.key_secret", allowed=[keys / "ok"],
                                       coordinator=keys / "ok" / "coord.key")
            with pytest.raises(SecurityError, match="refused this peer's CURVE key"):
                ZmqCarrier(1, 2, coordinator=co.address, security=mallory, join_timeout=60)

            # ...nor inject frames straight into a peer's data socket, even knowing its key
            ctx = zmq.Context()
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            mallory.client(s, _curve(keys, "rank1").public_key)
            s.identity = identity(0, 5, c0.incarnation)
            mon = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            s.connect(c1.io.data_endpoint)
            head = pack_header(DATA, sender=0, group=c1.group_id, incarnation=c0.incarnation, key=(0, 2, 0),
                               lengths=(5,), link_seq=10**6, chunk_size=c1.chunk_size, payload_bytes=5)
            try:
                s.send_multipart([head, b"evil!"], zmq.NOBLOCK)
            except zmq.Again:
                pass  # never connected at all: even better
            assert mon.poll(20_000), "the CURVE handshake of a stranger should fail"
            with pytest.raises(CollectiveTimeout):
                c1.recv(0, (0, 2, 0), timeout=1.0)
            s.disable_monitor()
            mon.close(0)
            s.close(0)
            ctx.term()
            assert c1.alive() == {0, 1}
        finally:
            c0.close()
            c1.close()


def test_plaintext_peer_cannot_reach_a_curve_group(keys: Path) -> None:
    args = ["--curve-secret", str(keys / "ok" / "coord.key_secret"), "--allow", str(keys / "ok")]
    with start_coordinator(args=args) as co:
        # told why: the handshake never completes (at once when the coordinator closes the
        # connections, else at join_timeout with the same diagnosis)
        with pytest.raises((TransportError, CollectiveTimeout), match="handshake"):
            ZmqCarrier(0, 2, coordinator=co.address, join_timeout=10)
