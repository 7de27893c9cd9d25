"""The delay line of ``netns`` mode: a process in the core namespace that holds each packet.

The core namespace routes every packet that arrives from host ``i`` into a TUN device
``t<i>`` (after ``i``'s uplink rate limiter). This process reads the packets, holds each for
the one-way delay of its (source, destination) pair plus jitter, and writes it back into the
same TUN device, where the kernel routes it on to the destination's downlink. Packets of one
pair leave in the order they came, so jitter never reorders a TCP flow.

The TUN devices pass GSO super-packets (``IFF_VNET_HDR`` + ``TUNSETOFFLOAD``): one read can
carry up to 64 KiB of TCP payload, so a Python loop keeps up with about a gigabit per second
instead of a few hundred megabits with 1500-byte packets.

Run as ``python -m lowband.wan._delayline CONFIG_JSON``. It prints ``ready`` once the devices
exist, then reads commands on stdin, one per line: ``cut A B``, ``restore A B``,
``stall H SECONDS``, ``stats`` (answers one JSON line) and ``quit``.
"""

from __future__ import annotations

import fcntl
import heapq
import json
import os
import random
import select
import struct
import sys
import time

from lowband.wan._schedule import PairClock

__all__ = ["main", "open_tun"]

_TUNSETIFF = 0x400454CA
_TUNSETOFFLOAD = 0x400454D0
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_TUN_F_CSUM, _TUN_F_TSO4, _TUN_F_TSO6 = 0x01, 0x02, 0x04
_VNET_HDR = 10  # struct virtio_net_hdr, the default TUNSETVNETHDRSZ
_MAX_PACKET = 1 << 18
_READS_PER_WAKE = 128


def open_tun(name: str, *, offload: bool) -> int:
    """Create the TUN device ``name`` in this namespace; it lives as long as the fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    flags = _IFF_TUN | _IFF_NO_PI | (_IFF_VNET_HDR if offload else 0)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    if offload:
        fcntl.ioctl(fd, _TUNSETOFFLOAD, _TUN_F_CSUM | _TUN_F_TSO4 | _TUN_F_TSO6)
    return fd


class DelayLine:
    """Holds packets per (source, destination) pair; one thread, ``select`` with us timeouts."""

    def __init__(self, config: dict) -> None:
        self.offload = bool(config["offload"])
        self.hdr = _VNET_HDR if self.offload else 0
        self.clock = PairClock(config["delay"], config["jitter"], seed=int(config.get("seed", 0)))
        self.unknown_last = 0.0
        self.loss = float(config["loss"])
        self.host_of: dict[bytes, int] = {
            bytes(map(int, ip.split("."))): i for i, ip in enumerate(config["hosts"])
        }
        self.fds = [open_tun(name, offload=self.offload) for name in config["tuns"]]
        self.heap: list[tuple[float, int, int, bytes]] = []
        self.cut: set[tuple[int, int]] = set()
        self.stall_until: dict[int, float] = {}
        self.rng = random.Random(int(config.get("seed", 0)) + 1)
        self.seq = 0
        self.stats = {
            "packets": 0,
            "bytes": 0,
            "dropped_loss": 0,
            "dropped_cut": 0,
            "unknown": 0,
            "late_max_s": 0.0,
            "late_sum_s": 0.0,
            "late_over_1ms": 0,
            "max_held": 0,
        }

    def _pair(self, pkt: bytes) -> tuple[int, int] | None:
        h = self.hdr
        if len(pkt) < h + 20 or pkt[h] >> 4 != 4:
            return None
        src = self.host_of.get(pkt[h + 12 : h + 16])
        dst = self.host_of.get(pkt[h + 16 : h + 20])
        return None if src is None or dst is None else (src, dst)

    def take(self, fd: int, pkt: bytes, now: float) -> None:
        pair = self._pair(pkt)
        if pair is None:  # not between two hosts (e.g. to the hub): pass it on in order
            self.stats["unknown"] += 1
            release = max(now, self.unknown_last)
            self.unknown_last = release
        else:
            a, b = pair
            if (min(a, b), max(a, b)) in self.cut:
                self.stats["dropped_cut"] += 1
                return
            if self.loss and self.rng.random() < self.loss:
                self.stats["dropped_loss"] += 1
                return
            hold = max(self.stall_until.get(a, 0.0), self.stall_until.get(b, 0.0))
            release = self.clock.release(a, b, now, not_before=hold)
        self.seq += 1
        heapq.heappush(self.heap, (release, self.seq, fd, pkt))
        self.stats["max_held"] = max(self.stats["max_held"], len(self.heap))

    def release_due(self, now: float) -> None:
        heap, st = self.heap, self.stats
        while heap and heap[0][0] <= now:
            release, _, fd, pkt = heapq.heappop(heap)
            try:
                os.write(fd, pkt)
            except OSError:
                continue  # the kernel refused it (e.g. a full queue): a loss, as on a real link
            late = now - release
            st["packets"] += 1
            st["bytes"] += len(pkt) - self.hdr
            st["late_sum_s"] += late
            st["late_max_s"] = max(st["late_max_s"], late)
            if late > 1e-3:
                st["late_over_1ms"] += 1

    def command(self, line: str) -> bool:
        parts = line.split()
        if not parts or parts[0] == "quit":
            return False
        op = parts[0]
        if op in ("cut", "restore"):
            a, b = int(parts[1]), int(parts[2])
            key = (min(a, b), max(a, b))
            (self.cut.add if op == "cut" else self.cut.discard)(key)
        elif op == "stall":
            host, seconds = int(parts[1]), float(parts[2])
            self.stall_until[host] = time.monotonic() + seconds
        elif op == "stats":
            print(json.dumps(self.stats), flush=True)
        return True

    def run(self) -> None:
        stdin = sys.stdin.fileno()
        try:  # a late packet is a wrong delay: run ahead of ordinary work on a shared machine
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        except (OSError, AttributeError) as exc:
            print(
                f"delay line: no real-time priority ({exc}); delays may run late under load",
                file=sys.stderr,
                flush=True,
            )
        print("ready", flush=True)
        buffered = b""
        rlist = [stdin, *self.fds]
        while True:
            now = time.monotonic()
            self.release_due(now)
            timeout = max(0.0, self.heap[0][0] - time.monotonic()) if self.heap else None
            ready, _, _ = select.select(rlist, [], [], timeout)
            for fd in ready:
                if fd == stdin:
                    chunk = os.read(stdin, 4096)
                    if not chunk:
                        return
                    buffered += chunk
                    while b"\n" in buffered:
                        line, buffered = buffered.split(b"\n", 1)
                        if not self.command(line.decode()):
                            return
                    continue
                for _ in range(_READS_PER_WAKE):
                    try:
                        pkt = os.read(fd, _MAX_PACKET)
                    except BlockingIOError:
                        break
                    self.take(fd, pkt, time.monotonic())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    DelayLine(json.loads(args[0])).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
