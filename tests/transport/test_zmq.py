"""The ZeroMQ carrier over real sockets on loopback: striping, heartbeats, loss, re-sends,
hostile frames. Carriers of one test share a process (threads) unless the test is about
processes; the coordinator always runs in its own process."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import threading
import time

import pytest
import zmq

from lowband.errors import ConfigError, PeerLost
from lowband.testing import spawn_group
from lowband.transport._wire import DATA, pack_header
from lowband.transport._zmq import ZmqCarrier, default_streams
from lowband.transport._zmq_link import identity
from lowband.transport.coordinator import start_coordinator


@pytest.fixture(scope="module")
def coordinator():
    with start_coordinator() as co:
        yield co.address


_groups = iter(range(10**6))


def _carriers(address: str, n: int, **kw) -> list[ZmqCarrier]:
    name = f"g{next(_groups)}-{os.getpid()}"
    out: list[ZmqCarrier | None] = [None] * n
    errors: list[BaseException] = []

    def make(r: int) -> None:
        try:
            out[r] = ZmqCarrier(r, n, coordinator=address, group=name, join_timeout=60, **kw)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=make, args=(r,)) for r in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(90)
    if errors or None in out:
        for c in out:
            if c is not None:
                c.close()
        raise errors[0] if errors else RuntimeError("a carrier did not start")
    return out  # type: ignore[return-value]


def _close(cs: list[ZmqCarrier]) -> None:
    for c in cs:
        c.close()


def test_messages_of_many_sizes_reassemble_exactly(coordinator: str) -> None:
    cs = _carriers(coordinator, 3, streams=4, chunk_size=64 << 10, peer_timeout=10)
    try:
        rng = random.Random(1)
        sizes = [0, 1, 65535, 65536, 65537, 3 << 20]
        for k, size in enumerate(sizes):
            frames = [b"head%d" % k, rng.randbytes(size), b""]
            cs[0].send(1, (0, k, 0), frames, payload_bytes=size)
            cs[2].send(1, (0, k, 0), frames[::-1], payload_bytes=size)
        for k in reversed(range(len(sizes))):  # out of order on purpose
            got = cs[1].recv(0, (0, k, 0), timeout=30)
            assert len(got) == 3 and bytes(got[0]) == b"head%d" % k and len(got[1]) == sizes[k]
            assert bytes(cs[1].recv(2, (0, k, 0), timeout=30)[2]) == b"head%d" % k
        st = cs[1].stats
        assert st.bytes_received == 2 * sum(sizes)
        assert st.transport_bytes_received > st.bytes_received  # headers, heartbeats and acks counted
        assert cs[0].stats.per_peer[1].bytes_sent == sum(sizes)
    finally:
        _close(cs)


def _big_transfer(rank: int, n: int, address: str, group: str, size: int) -> str:
    c = ZmqCarrier(rank, n, coordinator=address, group=group, streams=4, peer_timeout=20, join_timeout=60)
    try:
        if rank == 0:
            data = random.Random(size).randbytes(size)
            c.send(1, (0, 0, 0), [b"h", data], payload_bytes=size)
            c.recv(1, (0, 0, 1), timeout=120)  # wait for the receiver's "done"
            return hashlib.sha256(data).hexdigest()
        got = c.recv(0, (0, 0, 0), timeout=120)
        c.send(0, (0, 0, 1), [b"done"], payload_bytes=0)
        return hashlib.sha256(got[1]).hexdigest()
    finally:
        c.close()


@pytest.mark.slow
@pytest.mark.parametrize("size", [1 << 20, 100 << 20])
def test_large_message_across_processes(coordinator: str, size: int) -> None:
    sent, received = spawn_group(2, _big_transfer, coordinator, f"big{size}-{os.getpid()}", size, timeout=240)
    assert sent == received


def test_slow_transfer_is_not_a_failure_and_silence_is(coordinator: str) -> None:
    # 2.5 MiB at 1 MiB/s takes longer than peer_timeout: heartbeats and progress keep it alive
    cs = _carriers(coordinator, 3, streams=2, chunk_size=64 << 10, peer_timeout=1.0, rate_limit=1 << 20)
    try:
        data = os.urandom(5 << 19)
        t0 = time.monotonic()
        cs[0].send(1, (0, 1, 0), [data], payload_bytes=len(data))
        assert bytes(cs[1].recv(0, (0, 1, 0), timeout=60)[0]) == data
        assert time.monotonic() - t0 > 1.0  # the transfer did outlast peer_timeout
        assert cs[1].alive() == {0, 1, 2}
        cs[2].close()  # rank 2 falls silent
        with pytest.raises(PeerLost) as e:
            cs[0].recv(2, (0, 2, 0), timeout=60)
        assert e.value.peers == (2,)
        assert 2 not in cs[0].alive() and 0 in cs[1].alive()
    finally:
        _close(cs)


class _CuttableProxy:
    """A TCP relay on loopback whose connections the test can cut (a link failure)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.settimeout(0.2)
        self.port = self.lsock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.stop = False
        self.cuts = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stop:
            try:
                a, _ = self.lsock.accept()
            except OSError:
                continue
            b = socket.create_connection(self.target)
            with self.lock:
                self.conns += [a, b]
            for src, dst in ((a, b), (b, a)):
                t = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                t.start()
                self.threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self.stop:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self.lock:
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.conns.clear()
            self.cuts += 1

    def close(self) -> None:
        self.stop = True
        self.cut()
        self.lsock.close()
        for t in self.threads:
            t.join(2)


def test_link_cut_resends_unacknowledged_chunks_and_drops_duplicates(coordinator: str) -> None:
    cs = _carriers(coordinator, 2, streams=3, chunk_size=64 << 10, peer_timeout=30, rate_limit=8 << 20)
    host, port = cs[1].io.data_endpoint.removeprefix("tcp://").rsplit(":", 1)
    proxy = _CuttableProxy((host, int(port)))
    try:
        # route rank 0's data streams to rank 1 through the proxy (nothing was sent yet)
        info = {"data": f"tcp://127.0.0.1:{proxy.port}", "hb": cs[1].io.hb_endpoint,
                "incarnation": cs[1].incarnation + 1}
        cs[0].io.call("connect", 1, info, None)
        # the rerouted link carries a made-up incarnation, which the coordinator would rightly
        # call a gone process (a new one holds the rank): rank 0 stops asking it about closed
        # peers (its lease thread, which does that, is stopped; the test is shorter than a lease)
        cs[0]._lease_stop.set()
        data = os.urandom(16 << 20)  # about 2 s at the 8 MiB/s cap
        cs[0].send(1, (0, 1, 0), [b"x", data], payload_bytes=len(data))
        link = cs[0].io.links[1]
        done = threading.Event()

        def cutter() -> None:  # cut the link every 50 ms until a re-send happened a few times
            for _ in range(200):
                if done.is_set() or link.resent >= 3:
                    return
                time.sleep(0.05)
                proxy.cut()

        t = threading.Thread(target=cutter)
        t.start()
        try:
            got = cs[1].recv(0, (0, 1, 0), timeout=60)
        finally:
            done.set()
            t.join(15)
        assert bytes(got[1]) == data
        assert proxy.cuts > 0 and link.resent > 0  # unacknowledged chunks went again
        assert cs[1].alive() == {0, 1}
    finally:
        _close(cs)
        proxy.close()


def test_close_does_not_wait_for_a_peer_that_closed_first(coordinator: str) -> None:
    """The last rank out of a final exchange closes first; what the other rank still holds
    for it can never be acknowledged, so that rank's close must not wait out its patience
    (it used to wait 10 s and warn). A peer merely slow to acknowledge is still waited for."""
    cs = _carriers(coordinator, 2, streams=2, peer_timeout=60)
    try:
        cs[0].send(1, (0, 1, 0), [b"hello"], payload_bytes=5)
        assert bytes(cs[1].recv(0, (0, 1, 0), timeout=30)[0]) == b"hello"
        cs[1].close()
        link = cs[0].io.links[1]
        deadline = time.monotonic() + 30
        while not link.gone(time.monotonic(), 0.0) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert link.gone(time.monotonic(), 0.0), "rank 0 never saw rank 1's connections close"
        cs[0].send(1, (0, 2, 0), [b"never acknowledged"], payload_bytes=18)
        result: list[bool] = []
        t = threading.Thread(target=lambda: result.append(cs[0].io.drain(patience=120)))
        t.start()
        t.join(60)
        assert not t.is_alive(), "close waited on a peer that had closed"
        if cs[0].io.is_lost(1):
            # the coordinator confirmed that rank 1 left before the send: it is lost at once
            # (not after peer_timeout), and what was queued for it is void
            assert "coordinator says its process is gone" in cs[0].io.lost_reason(1)
            assert result == [True]
        else:
            assert result == [False]  # skipped as gone: something was left, and drain says so
    finally:
        _close(cs)


def test_hostile_frames_are_rejected_and_the_sender_cut_off(coordinator: str) -> None:
    cs = _carriers(coordinator, 2, streams=2, chunk_size=64 << 10, peer_timeout=30)
    ctx = zmq.Context()
    socks = []
    try:
        target = cs[1].io.data_endpoint

        def dealer(ident: bytes | None) -> zmq.Socket:
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            if ident is not None:
                s.identity = ident
            s.connect(target)
            socks.append(s)
            return s

        rng = random.Random(3)
        junk = dealer(None)  # not a lowband routing id at all
        for _ in range(20):
            junk.send_multipart([rng.randbytes(rng.randrange(1, 300)), rng.randbytes(50)])
        liar = dealer(identity(0, 7, 12345))  # claims rank 0 with a wrong length table
        head = pack_header(DATA, sender=0, group=cs[1].group_id, incarnation=12345, key=(0, 1, 0),
                           lengths=(100,), link_seq=1, chunk_size=64 << 10, payload_bytes=100)
        liar.send_multipart([head, b"short"])
        liar.send_multipart([head, b"x" * 100])  # valid now, but the sender is already cut off
        big = dealer(identity(0, 8, 777))  # bigger than MAXMSGSIZE: libzmq drops the connection
        big.send_multipart([b"y" * 32, b"z" * (4 << 20)])
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        raw = socket.create_connection((host, int(port)))
        raw.settimeout(10)
        try:
            raw.sendall(os.urandom(1 << 16))  # not even ZMTP
            closed = raw.recv(1 << 16) == b"" or raw.recv(1 << 16) == b""
        except (ConnectionResetError, BrokenPipeError):
            closed = True
        raw.close()
        assert closed
        deadline = time.monotonic() + 20
        liar_id = identity(0, 7, 12345)
        while (cs[1].io.rejected < 22 or liar_id not in cs[1].io.banned) and time.monotonic() < deadline:
            time.sleep(0.05)  # the rejections come from several connections, in any order
        assert cs[1].io.rejected >= 22
        # the junk and the liar connections are cut off (the raw bytes may parse as an old-ZMTP
        # peer and be cut off too); the oversized message never got through
        assert identity(0, 7, 12345) in cs[1].io.banned and len(cs[1].io.banned) >= 2
        assert identity(0, 8, 777) not in cs[1].io.banned
        cs[0].send(1, (0, 2, 0), [b"still fine"], payload_bytes=10)  # the real peer is unaffected
        assert bytes(cs[1].recv(0, (0, 2, 0), timeout=30)[0]) == b"still fine"
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
        _close(cs)


def test_stream_count_follows_the_bandwidth_delay_product() -> None:
    assert default_streams(1e9, 0.1) == 6
    assert default_streams(1e8, 0.1) == 1
    assert default_streams(1e10, 0.3) == 16
    with pytest.raises(ConfigError):
        default_streams(0, 0.1)
    with pytest.raises(ConfigError):
        ZmqCarrier(0, 2, coordinator="127.0.0.1:1", streams=0)
    with pytest.raises(ConfigError):
        ZmqCarrier(2, 2, coordinator="127.0.0.1:1")


def test_restarted_peer_rejoins_at_the_next_admission(coordinator: str) -> None:
    cs = _carriers(coordinator, 3, streams=2, peer_timeout=1.0)
    joiner: list[ZmqCarrier] = []
    try:
        cs[2].close()  # rank 2 dies
        with pytest.raises(PeerLost):
            cs[0].recv(2, (0, 1, 0), timeout=30)
        with pytest.raises(PeerLost):
            cs[1].recv(2, (0, 1, 0), timeout=30)
        out: dict[int, tuple[int, ...]] = {}

        def commit(r: int, key: tuple[int, int, int]) -> None:
            out[r] = cs[r].commit(key, [0, 1, 2], admit=True)

        ts = [threading.Thread(target=commit, args=(r, (0, 1, 9))) for r in (0, 1)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert out == {0: (0, 1), 1: (0, 1)} and cs[0].membership_epoch == 1

        # a fresh process for rank 2 joins the running group and waits for the next commit
        t = threading.Thread(target=lambda: joiner.append(
            ZmqCarrier(2, 3, coordinator=coordinator, group=cs[0].group_name, streams=2, peer_timeout=1.0,
                       join_timeout=60)))
        t.start()
        time.sleep(1.0)
        ts = [threading.Thread(target=commit, args=(r, (1, 2, 9))) for r in (0, 1)]
        for th in ts:
            th.start()
        for th in ts:
            th.join(60)
        t.join(60)
        assert out == {0: (0, 1), 1: (0, 1)}  # the joiner takes part from the next collective on
        assert joiner and joiner[0].joined_at == (1, 2, 9) and joiner[0].members == (0, 1, 2)
        assert cs[0].members == (0, 1, 2) and cs[0].membership_epoch == 2
        cs[0].send(2, (2, 3, 0), [b"welcome back"], payload_bytes=12)
        joiner[0].send(1, (2, 3, 0), [b"hello"], payload_bytes=5)
        assert bytes(joiner[0].recv(0, (2, 3, 0), timeout=30)[0]) == b"welcome back"
        assert bytes(cs[1].recv(2, (2, 3, 0), timeout=30)[0]) == b"hello"
        assert cs[0].alive() == {0, 1, 2}
    finally:
        _close(cs[:2] + joiner)


class _CountingRelay:
    """A TCP relay per endpoint on loopback that counts the bytes it carries."""

    def __init__(self) -> None:
        self.carried = 0
        self.endpoints: dict[str, str] = {}
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []

    def map(self, endpoint: str) -> str:
        with self._lock:
            if endpoint not in self.endpoints:
                host, port = endpoint[len("tcp://") :].rsplit(":", 1)
                lsock = socket.create_server(("127.0.0.1", 0))
                self._socks.append(lsock)
                threading.Thread(target=self._accept, args=(lsock, (host, int(port))), daemon=True).start()
                self.endpoints[endpoint] = f"tcp://127.0.0.1:{lsock.getsockname()[1]}"
            return self.endpoints[endpoint]

    def _accept(self, lsock: socket.socket, target: tuple[str, int]) -> None:
        while True:
            try:
                a, _ = lsock.accept()
            except OSError:
                return
            b = socket.create_connection(target, timeout=10)
            b.settimeout(None)
            self._socks += [a, b]
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                with self._lock:
                    self.carried += len(data)
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        for s in self._socks:
            s.close()


def test_connect_map_routes_every_peer_connection(coordinator: str) -> None:
    """A launcher's endpoint map (lowband.wan.connect_endpoint in proxy mode) carries all data."""
    relay = _CountingRelay()
    cs = _carriers(coordinator, 2, streams=3, peer_timeout=10, connect_map=relay.map)
    try:
        payload = os.urandom(2 << 20)
        cs[0].send(1, (0, 0, 0), [payload], payload_bytes=len(payload))
        assert bytes(cs[1].recv(0, (0, 0, 0), timeout=30)[0]) == payload
        assert len(relay.endpoints) == 4  # data + heartbeat endpoint of each of the 2 peers
        assert relay.carried >= len(payload)
    finally:
        _close(cs)
        relay.close()
