"""Measuring probes that run on emulated hosts: a bulk sink and source, an echo server and ping.

Used by the tests and the calibration benchmark through :meth:`LinkEmulator.spawn`. Each probe
reports through a ``multiprocessing`` connection (``report``) and uses ``time.monotonic()``,
which is one clock for every process on the machine, so the sink's last byte and the source's
first byte can be compared. Data is pseudo-random and hashed on both sides when asked, so any
byte lost, duplicated or reordered inside a connection changes the digest.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from lowband.wan.addressing import connect_address, local_address

if TYPE_CHECKING:
    from lowband.wan.emulator import LinkEmulator

__all__ = ["sink", "source", "echo_server", "ping", "transfer", "round_trips"]

_BLOCK = 1 << 20
_DEADLINE = 600.0


def _pattern(seed: int) -> bytes:
    return random.Random(seed).randbytes(_BLOCK + 4099)  # odd length: offsets drift per block


def _listen(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((local_address() or "127.0.0.1", port))
    s.listen(64)
    s.settimeout(_DEADLINE)
    return s


def sink(port: int, connections: int, report: Any, *, digest: bool = False) -> None:
    """Accept ``connections`` connections, read each to EOF; report per-connection results."""
    lsock = _listen(port)
    report.send(("ready", lsock.getsockname()[1]))
    results: list[dict[str, Any]] = [{} for _ in range(connections)]

    def drain(k: int, conn: socket.socket) -> None:
        h = hashlib.blake2b(digest_size=16) if digest else None
        buf = bytearray(_BLOCK)
        view = memoryview(buf)
        total, first, marked = 0, None, 0
        samples: list[tuple[float, int]] = []  # (time, bytes since the last sample), every >= 1 MiB
        with conn:
            conn.settimeout(_DEADLINE)
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                if first is None:
                    first = time.monotonic()
                total += n
                if total - marked >= _BLOCK:
                    samples.append((time.monotonic(), total - marked))
                    marked = total
                if h is not None:
                    h.update(view[:n])
            last = time.monotonic()
            samples.append((last, total - marked))
            conn.sendall(b"k")  # tells the source that everything arrived
        results[k] = {
            "bytes": total,
            "first": first,
            "last": last,
            "samples": samples,
            "digest": h.hexdigest() if h else None,
        }

    threads = []
    with lsock:
        for k in range(connections):
            conn, _ = lsock.accept()
            t = threading.Thread(target=drain, args=(k, conn), daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join(_DEADLINE)
    report.send(("done", results))


def source(
    ip: str,
    port: int,
    nbytes: int,
    report: Any,
    *,
    streams: int = 1,
    digest: bool = False,
    congestion: str | None = None,
    sndbuf: int | None = None,
) -> None:
    """Open ``streams`` connections to ``(ip, port)`` and send ``nbytes`` split across them.

    Reports ``start`` (monotonic time of the first send, after every handshake) and each
    stream's digest.
    """
    addr = connect_address(ip, port)
    socks = []
    for _ in range(streams):
        s = socket.socket()
        if congestion:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
        if sndbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        s.settimeout(_DEADLINE)
        s.connect(addr)
        socks.append(s)
    shares = [nbytes // streams + (1 if k < nbytes % streams else 0) for k in range(streams)]
    digests: list[str | None] = [None] * streams

    def pump(k: int) -> None:
        view = memoryview(_pattern(k))
        h = hashlib.blake2b(digest_size=16) if digest else None
        s, share, sent = socks[k], shares[k], 0
        while sent < share:
            off = sent % 4099
            chunk = view[off : off + min(share - sent, _BLOCK)]
            s.sendall(chunk)
            if h is not None:
                h.update(chunk)
            sent += len(chunk)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)
        s.close()
        digests[k] = h.hexdigest() if h else None

    start = time.monotonic()
    threads = [threading.Thread(target=pump, args=(k,), daemon=True) for k in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(_DEADLINE)
    report.send(("done", {"start": start, "end": time.monotonic(), "digests": digests}))


def _timing_priority() -> bool:
    """Run ahead of ordinary work when allowed (root): a ping measures the path, not the load.

    The two timing probes sleep almost all the time, so real-time priority costs others nothing.
    Without the right to it they run as they are; returns whether it was granted.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(5))  # below the delay line's 10
    except (OSError, AttributeError):
        return False
    return True


def echo_server(port: int, report: Any) -> None:
    """Echo every byte back on each accepted connection until the peer closes."""
    _timing_priority()
    lsock = _listen(port)
    report.send(("ready", lsock.getsockname()[1]))

    def echo(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(65536):
                conn.sendall(data)

    with lsock:
        while True:
            conn, _ = lsock.accept()
            threading.Thread(target=echo, args=(conn,), daemon=True).start()


def ping(ip: str, port: int, count: int, interval: float, report: Any) -> None:
    """Send one byte and wait for its echo, ``count`` times; report the round trips (s).

    Reports ``("ready", None)`` once connected, then ``("done", round_trips)``.
    """
    _timing_priority()
    with socket.create_connection(connect_address(ip, port), timeout=_DEADLINE) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        report.send(("ready", None))
        rtts = []
        for _ in range(count):
            t = time.monotonic()
            s.sendall(b"p")
            if not s.recv(1):
                break
            rtts.append(time.monotonic() - t)
            time.sleep(interval)
    report.send(("done", rtts))


def _expect(conn: Any, what: str, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError(f"probe did not report {what!r} within {timeout:.0f} s")
    tag, value = conn.recv()
    if tag != what:
        raise RuntimeError(f"probe said {tag!r}, expected {what!r}")
    return value


def transfer(
    net: LinkEmulator,
    src: int,
    dst: int,
    nbytes: int,
    *,
    streams: int = 1,
    digest: bool = False,
    congestion: str | None = None,
    port: int = 0,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Send ``nbytes`` from host ``src`` to host ``dst`` over ``streams`` TCP connections.

    Returns ``seconds`` (first byte sent to last byte received), ``bytes`` received, ``mbps``
    (payload megabits per second over ``seconds``), ``steady_mbps`` (payload rate from the moment
    a quarter of the bytes had arrived to the end: slow start left out) and, with ``digest``,
    whether every stream arrived intact.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    sink_end, sink_rep = ctx.Pipe(duplex=False)
    src_end, src_rep = ctx.Pipe(duplex=False)
    p_sink = net.spawn(dst, sink, args=(port, streams, sink_rep), kwargs={"digest": digest})
    try:
        bound = _expect(sink_end, "ready", 120.0)
        p_src = net.spawn(
            src,
            source,
            args=(net.host_address(dst), bound, nbytes, src_rep),
            kwargs={"streams": streams, "digest": digest, "congestion": congestion},
        )
        sent = _expect(src_end, "done", timeout)
        got = _expect(sink_end, "done", 30.0)
        p_src.join(30)
    finally:
        p_sink.join(10)
    last = max(r["last"] for r in got)
    total = sum(r["bytes"] for r in got)
    seconds = last - sent["start"]
    intact = None
    if digest:
        intact = sorted(r["digest"] for r in got) == sorted(sent["digests"]) and total == nbytes
    marks = sorted(m for r in got for m in r["samples"])
    acc, t_quarter, at_quarter = 0, marks[-1][0], total
    for t, n in marks:
        acc += n
        if acc >= total / 4:
            t_quarter, at_quarter = t, acc
            break
    steady = (
        (total - at_quarter) * 8 / (last - t_quarter) / 1e6 if last > t_quarter else float("nan")
    )
    return {
        "seconds": seconds,
        "bytes": total,
        "mbps": total * 8 / seconds / 1e6,
        "steady_mbps": steady,
        "intact": intact,
    }


def round_trips(
    net: LinkEmulator,
    src: int,
    dst: int,
    *,
    count: int = 10,
    interval: float = 0.05,
) -> list[float]:
    """Round trips (seconds) of ``count`` one-byte pings from ``src`` to an echo server on ``dst``."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    srv_end, srv_rep = ctx.Pipe(duplex=False)
    ping_end, ping_rep = ctx.Pipe(duplex=False)
    p_srv = net.spawn(dst, echo_server, args=(0, srv_rep))
    try:
        port = _expect(srv_end, "ready", 120.0)
        net.spawn(src, ping, args=(net.host_address(dst), port, count, interval, ping_rep))
        _expect(ping_end, "ready", 120.0)
        return list(_expect(ping_end, "done", 120.0 + count * (interval + 5.0)))
    finally:
        p_srv.terminate()
        p_srv.join(5)
