"""``proxy`` mode: a userspace TCP relay that emulates the links without root.

A relay listener stands for one (source host, destination address) pair. The relay reads
what the source writes and passes it through a model of the path: the source's uplink
(a FIFO at the uplink rate, bounded queue), the one-way delay and jitter, the destination's
downlink (a FIFO at its rate), then writes it to the destination. The rates it is given are
frame rates (the launcher converts a topology's rates, see ``topology.py``); it charges modelled
wire bytes (payload plus 66 bytes of Ethernet/IP/TCP header per 1448-byte segment), as the rate
limiters do in ``netns`` mode.

A relay ends each TCP connection locally, so alone it would let one stream fill any link. The
window model stops that: each direction of a connection may have at most ``cwnd`` bytes in
flight, read but not yet acknowledged (an acknowledgement returns one reverse delay after
delivery). ``cwnd`` starts at 10 segments and grows by the bytes acknowledged (slow start,
doubling per round trip) up to ``window``, the in-flight bytes a real sender's socket buffer
allows (calibrated against ``netns`` mode; see docs/wan.md). Data also waits one round trip for
the handshake before the first byte leaves.

Run as ``python -m lowband.wan._proxy CONFIG_JSON``; prints ``ready`` and serves a line
protocol on the Unix socket ``config["control"]``: ``route SRC IP PORT`` -> ``IP PORT``,
``cut A B``, ``restore A B``, ``stall H SECONDS``, ``bytes`` and ``stats`` -> one JSON line.
It exits when its stdin closes.
"""

from __future__ import annotations

import heapq
import json
import os
import select
import socket
import sys
import time
from collections import deque

from lowband._frames import recv_line
from lowband.errors import ConfigError
from lowband.wan._schedule import PairClock

__all__ = ["main"]

_MSS, _HDR = 1448, 66  # a full segment is a 1514-byte Ethernet frame
_CHUNK = 64 << 10
_INIT_CWND = 10 * _MSS
_MIN_READ = 16 << 10


def _wire(n: int) -> int:
    return n + -(-n // _MSS) * _HDR


class _Link:
    """One direction of an access link: a FIFO served at ``Bps`` bytes per second."""

    def __init__(self, bps: float, queue: int) -> None:
        self.Bps = bps / 8.0
        self.queue = queue
        self.free_at = 0.0
        self.payload = 0

    def backlog(self, now: float) -> float:
        return max(0.0, self.free_at - now) * self.Bps

    def send(self, now: float, nbytes: int) -> float:
        """Queue ``nbytes`` that are all here at ``now``; the time their last byte leaves."""
        self.free_at = max(now, self.free_at) + _wire(nbytes) / self.Bps
        return self.free_at

    def forward(self, last: float, spread: float, nbytes: int) -> float:
        """Queue bytes that arrive over ``[last - spread, last]`` (cut-through, as packets do)."""
        start = max(last - spread, self.free_at)
        self.free_at = max(last, start + _wire(nbytes) / self.Bps)
        return self.free_at


class _Flow:
    """One direction of one relayed connection."""

    def __init__(
        self,
        src: int,
        dst: int,
        rsock: socket.socket,
        wsock: socket.socket,
        window: int,
        ready_at: float,
    ) -> None:
        self.src, self.dst, self.rsock, self.wsock = src, dst, rsock, wsock
        self.window, self.cwnd, self.inflight = window, min(_INIT_CWND, window), 0
        self.ready_at = ready_at
        self.out: deque[tuple[memoryview, float, int]] = deque()  # (bytes left, due, chunk size)
        self.held: deque[bytes] = deque()
        self.eof_read = False
        self.eof_out = False  # the EOF reached the destination's side
        self.done = False
        self.peer: _Flow | None = None


class Relay:
    """The event loop: sockets, a heap of timed events, and the link model."""

    def __init__(self, config: dict) -> None:
        self.delay: list[list[float]] = config["delay"]
        self.clock = PairClock(config["delay"], config["jitter"], seed=int(config.get("seed", 0)))
        self.up = [_Link(h["up_bps"], h["queue_bytes"]) for h in config["hosts"]]
        self.down = [_Link(h["down_bps"], h["queue_bytes"]) for h in config["hosts"]]
        self.addresses: dict[str, int] = {ip: i for i, ip in enumerate(config["addresses"])}
        self.window = int(config["window"])
        self.control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.control.bind(config["control"])
        self.control.listen(64)
        self.listeners: dict[socket.socket, tuple[int, int, str, int]] = {}
        self.routes: dict[tuple[int, str, int], tuple[str, int]] = {}
        self.flows: list[_Flow] = []
        self.by_rsock: dict[socket.socket, _Flow] = {}
        self.by_wsock: dict[socket.socket, _Flow] = {}
        self.events: list[tuple[float, int, int, _Flow, bytes]] = []
        self.seq = 0
        self.cut: set[tuple[int, int]] = set()
        self.stall_until: dict[int, float] = {}
        self.stats = {
            "chunks": 0,
            "late_max_s": 0.0,
            "late_sum_s": 0.0,
            "late_over_1ms": 0,
            "connections": 0,
        }

    # -- control -----------------------------------------------------------------------------
    def route(self, src: int, ip: str, port: int) -> tuple[str, int]:
        dst = self.addresses.get(ip)
        if dst is None or dst == src:
            return ip, port  # not an emulated host (the hub), or the host itself: no link crossed
        key = (src, ip, port)
        if key not in self.routes:
            lsock = socket.socket()
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(128)
            lsock.setblocking(False)
            self.listeners[lsock] = (src, dst, ip, port)
            self.routes[key] = lsock.getsockname()[:2]
        return self.routes[key]

    def handle_control(self) -> None:
        conn, _ = self.control.accept()
        with conn:
            conn.settimeout(2.0)
            try:
                data = recv_line(conn, error=ConfigError)
            except ConfigError:
                return  # not a control line: the connection closes unanswered
            if not data.endswith(b"\n"):
                return
            reply = self.command(data.decode().split())
            conn.sendall((reply + "\n").encode())

    def command(self, parts: list[str]) -> str:
        op = parts[0] if parts else ""
        if op == "route":
            ip, port = self.route(int(parts[1]), parts[2], int(parts[3]))
            return f"{ip} {port}"
        if op in ("cut", "restore"):
            a, b = int(parts[1]), int(parts[2])
            key = (min(a, b), max(a, b))
            (self.cut.add if op == "cut" else self.cut.discard)(key)
            return "ok"
        if op == "stall":
            self.stall_until[int(parts[1])] = time.monotonic() + float(parts[2])
            return "ok"
        if op == "bytes":
            return json.dumps(
                {
                    i: {"up": u.payload, "down": d.payload}
                    for i, (u, d) in enumerate(zip(self.up, self.down))
                }
            )
        if op == "stats":
            return json.dumps(self.stats)
        return f"error unknown command {op!r}"

    # -- connections -------------------------------------------------------------------------
    def accept(self, lsock: socket.socket, now: float) -> None:
        src, dst, ip, port = self.listeners[lsock]
        try:
            insock, _ = lsock.accept()
        except BlockingIOError:
            return
        try:
            outsock = socket.create_connection((ip, port), timeout=5.0)
        except OSError:
            insock.close()  # nothing listens there: the source sees the connection end
            return
        rtt = self.delay[src][dst] + self.delay[dst][src]
        for s in (insock, outsock):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # a small receive buffer: backpressure reaches the application's own socket soon
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _CHUNK)
        fwd = _Flow(src, dst, insock, outsock, self.window, now + rtt)
        rev = _Flow(dst, src, outsock, insock, self.window, now + rtt)
        fwd.peer, rev.peer = rev, fwd
        for f in (fwd, rev):
            self.flows.append(f)
            self.by_rsock[f.rsock] = f
            self.by_wsock[f.wsock] = f
        self.stats["connections"] += 1

    def close(self, flow: _Flow) -> None:
        for f in (flow, flow.peer):
            if f is None or f.done:
                continue
            f.done = True
            self.clock.forget(id(f))
            self.flows.remove(f)
            self.by_rsock.pop(f.rsock, None)
            self.by_wsock.pop(f.wsock, None)
        for s in (flow.rsock, flow.wsock):
            s.close()

    # -- the link model ----------------------------------------------------------------------
    def _push(self, t: float, kind: int, flow: _Flow, data: bytes) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, flow, data))

    def can_read(self, f: _Flow, now: float) -> float:
        """0 when ``f`` may read now, else the time to look again (inf: an event will tell)."""
        if f.eof_read or f.done:
            return float("inf")
        if now < f.ready_at:
            return f.ready_at
        if f.inflight >= f.cwnd:
            return float("inf")
        up = self.up[f.src]
        need = min(_MIN_READ, up.queue // 2)  # read in pieces worth a system call
        if up.backlog(now) > up.queue - need:
            return up.free_at - (up.queue - need) / up.Bps
        return 0.0

    def read(self, f: _Flow, now: float) -> None:
        up = self.up[f.src]
        room = int(up.queue - up.backlog(now)) * _MSS // (_MSS + _HDR)  # stay within the queue
        try:
            data = f.rsock.recv(max(1, min(_CHUNK, f.cwnd - f.inflight, room)))
        except BlockingIOError:
            return
        except OSError:
            self.close(f)
            return
        if not data:
            f.eof_read = True
        else:
            f.inflight += len(data)
            up.payload += len(data)
        t = up.send(now, len(data)) if data else max(now, up.free_at)
        t = self.clock.release(f.src, f.dst, t, key=id(f))
        self._push(t, 0, f, data)

    def blocked(self, f: _Flow, now: float) -> bool:
        key = (min(f.src, f.dst), max(f.src, f.dst))
        return key in self.cut or now < max(
            self.stall_until.get(f.src, 0.0), self.stall_until.get(f.dst, 0.0)
        )

    def arrive(self, f: _Flow, data: bytes, now: float) -> None:
        """``data`` reaches ``f.dst``'s downlink at ``now`` (its scheduled time, not the loop's)."""
        if f.held or self.blocked(f, now):
            f.held.append(data)
            return
        down = self.down[f.dst]
        spread = _wire(len(data)) / self.up[f.src].Bps  # the chunk left the uplink over this long
        t = down.forward(now, spread, len(data)) if data else max(now, down.free_at)
        self._push(t, 1, f, data)

    def deliver(self, f: _Flow, data: bytes, t: float) -> None:
        if f.done:
            return
        f.out.append((memoryview(data), t, len(data)))
        self.flush(f, time.monotonic())

    def flush(self, f: _Flow, now: float) -> None:
        while f.out:
            view, t, size = f.out[0]
            if not len(view):  # the EOF marker
                f.out.popleft()
                f.eof_out = True
                try:
                    f.wsock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                if f.peer is not None and f.peer.eof_out:
                    self.close(f)
                return
            try:
                n = f.wsock.send(view)
            except BlockingIOError:
                return
            except OSError:
                self.close(f)
                return
            self.down[f.dst].payload += n
            if n < len(view):
                f.out[0] = (view[n:], t, size)
                return
            f.out.popleft()
            late = now - t
            st = self.stats
            st["chunks"] += 1
            st["late_sum_s"] += late
            st["late_max_s"] = max(st["late_max_s"], late)
            st["late_over_1ms"] += late > 1e-3
            self._push(now + self.delay[f.dst][f.src], 2, f, b"%d" % size)

    def ack(self, f: _Flow, chunk: int) -> None:
        """The acknowledgement of ``chunk`` bytes reached the sender: slow start grows cwnd."""
        f.inflight -= chunk
        f.cwnd = min(f.window, f.cwnd + chunk)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        stdin = sys.stdin.fileno()
        try:  # keep the schedule on a shared machine when allowed (root); else run as is
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
            self.stats["realtime"] = True
        except (OSError, AttributeError):
            self.stats["realtime"] = False
        print("ready", flush=True)
        while True:
            self._run_due_events()
            rlist, wlist, wake = self._interest(time.monotonic())
            watch: list[socket.socket | int] = [stdin, self.control, *self.listeners, *rlist]
            ready_r, ready_w, _ = select.select(watch, wlist, [], max(0.0, wake - time.monotonic()))
            now = time.monotonic()
            for ws in ready_w:
                flow = self.by_wsock.get(ws)
                if flow is not None:
                    self.flush(flow, now)
            for r in ready_r:
                if isinstance(r, int):  # stdin: the parent closed it
                    if not os.read(r, 4096):
                        return
                elif r is self.control:
                    self.handle_control()
                elif r in self.listeners:
                    self.accept(r, now)
                else:
                    flow = self.by_rsock.get(r)
                    if flow is not None and not flow.done:
                        self.read(flow, now)

    def _run_due_events(self) -> None:
        now = time.monotonic()
        while self.events and self.events[0][0] <= now:
            t, _, kind, f, data = heapq.heappop(self.events)
            if kind == 0:
                self.arrive(f, data, t)
            elif kind == 1:
                self.deliver(f, data, t)
            else:
                self.ack(f, int(data))
            now = time.monotonic()

    def _interest(self, now: float) -> tuple[list[socket.socket], list[socket.socket], float]:
        """Sockets to read and to write now, and when to look again at the latest."""
        wake = self.events[0][0] if self.events else now + 1.0
        rlist: list[socket.socket] = []
        wlist: list[socket.socket] = []
        for f in list(self.flows):
            if f.held and not self.blocked(f, now):  # a cut was restored or a stall ended
                held, f.held = f.held, deque()
                for data in held:
                    self.arrive(f, data, now)
            elif f.held:
                wake = min(wake, now + 0.01)
            w = self.can_read(f, now)
            if w == 0.0:
                rlist.append(f.rsock)
            else:
                wake = min(wake, w)
            if f.out:
                wlist.append(f.wsock)
        return rlist, wlist, wake


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    Relay(json.loads(args[0])).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
