"""The delay line of ``netns`` mode: a process in the core namespace that holds each packet.

The core namespace routes every packet that arrives from host ``i`` into a TUN device
``t<i>`` (after ``i``'s uplink rate limiter). This process reads the packets, holds each for
the one-way delay of its (source, destination) pair plus jitter, and writes it back into the
same TUN device, where the kernel routes it on to the destination's downlink. Packets of one
pair leave in the order they came, so jitter never reorders a TCP flow.

Two engines run the packet loop. ``c`` (csrc/lb_delayline.c, in ``lowband/_native.so``) runs
read -> hold -> write without the GIL while a Python thread answers commands; its own work is
1-2 us a packet. ``python`` (this file) adds about 10 us a packet. Both share one limit: a
write into a TUN device runs the packet's onward path through the kernel inline (10-30 us a
packet on a small VM; ``write_s`` in the stats), so one thread falls behind near 20K packets/s
(docs/wan.md, "Where the delay line stops keeping up"). ``c`` runs when the library has it,
else ``python`` with a WARNING on stderr; ``LOWBAND_DELAYLINE=python`` or ``=c`` forces one
(``c`` fails when it cannot run). The ``stats`` answer names the engine that ran.

The TUN devices pass GSO super-packets (``IFF_VNET_HDR`` + ``TUNSETOFFLOAD``): one read can
carry up to 64 KiB of TCP payload; the vnet header goes back out untouched.

Run as ``python -m lowband.wan._delayline CONFIG_JSON``. It prints ``ready`` once the devices
exist, then reads commands on stdin, one per line: ``cut A B``, ``restore A B``,
``stall H SECONDS``, ``stats`` (answers one JSON line) and ``quit``.
"""

from __future__ import annotations

import ctypes
import fcntl
import heapq
import json
import logging
import os
import random
import select
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from lowband.errors import BackendUnavailable, ConfigError
from lowband.wan._schedule import PairClock

__all__ = ["main", "open_tun", "DelayLine", "NativeDelayLine", "native_library", "ENGINE_ENV"]

log = logging.getLogger(__name__)

ENGINE_ENV = "LOWBAND_DELAYLINE"
_TUNSETIFF = 0x400454CA
_TUNSETOFFLOAD = 0x400454D0
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_TUN_F_CSUM, _TUN_F_TSO4, _TUN_F_TSO6 = 0x01, 0x02, 0x04
_VNET_HDR = 10  # struct virtio_net_hdr, the default TUNSETVNETHDRSZ
_MAX_PACKET = 1 << 18
_READS_PER_WAKE = 128
_HELD_CAP = 256 << 20  # bytes held at most; packets beyond it are dropped (dropped_full)
_NATIVE_ABI = 1


def open_tun(name: str, *, offload: bool) -> int:
    """Create the TUN device ``name`` in this namespace; it lives as long as the fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    flags = _IFF_TUN | _IFF_NO_PI | (_IFF_VNET_HDR if offload else 0)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    if offload:
        fcntl.ioctl(fd, _TUNSETOFFLOAD, _TUN_F_CSUM | _TUN_F_TSO4 | _TUN_F_TSO6)
    return fd


def _new_stats() -> dict[str, Any]:
    return {
        "packets": 0,
        "bytes": 0,
        "dropped_loss": 0,
        "dropped_cut": 0,
        "dropped_full": 0,
        "unknown": 0,
        "write_errors": 0,
        "late_max_s": 0.0,
        "late_sum_s": 0.0,
        "late_over_1ms": 0,
        "max_held": 0,
        "write_s": 0.0,
    }


class _Engine(Protocol):
    def cut(self, a: int, b: int, on: bool) -> None: ...
    def stall(self, host: int, seconds: float) -> None: ...
    def stats(self) -> dict[str, Any]: ...


def _command(engine: _Engine, line: str) -> bool:
    """Apply one command line; False on ``quit`` (or an empty line: the parent is gone)."""
    parts = line.split()
    if not parts or parts[0] == "quit":
        return False
    op = parts[0]
    if op in ("cut", "restore"):
        engine.cut(int(parts[1]), int(parts[2]), op == "cut")
    elif op == "stall":
        engine.stall(int(parts[1]), float(parts[2]))
    elif op == "stats":
        print(json.dumps(engine.stats()), flush=True)
    else:
        log.warning("unknown command %r", line.strip())
    return True


def _realtime() -> None:
    """A late packet is a wrong delay: run ahead of ordinary work on a shared machine."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (OSError, AttributeError) as exc:
        log.warning("no real-time priority (%s); delays may run late under load", exc)


class DelayLine:
    """The Python engine: a heap of packets, one thread, ``select`` with us timeouts."""

    engine = "python"

    def __init__(self, config: dict[str, Any]) -> None:
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
        self.held_bytes = 0
        self.cuts: set[tuple[int, int]] = set()
        self.stall_until: dict[int, float] = {}
        self.rng = random.Random(int(config.get("seed", 0)) + 1)
        self.seq = 0
        self.st = _new_stats()

    def cut(self, a: int, b: int, on: bool) -> None:
        key = (min(a, b), max(a, b))
        (self.cuts.add if on else self.cuts.discard)(key)

    def stall(self, host: int, seconds: float) -> None:
        self.stall_until[host] = time.monotonic() + seconds

    def stats(self) -> dict[str, Any]:
        return {**self.st, "engine": self.engine}

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
            self.st["unknown"] += 1
            release = max(now, self.unknown_last)
            self.unknown_last = release
        else:
            a, b = pair
            if (min(a, b), max(a, b)) in self.cuts:
                self.st["dropped_cut"] += 1
                return
            if self.loss and self.rng.random() < self.loss:
                self.st["dropped_loss"] += 1
                return
            if self.held_bytes + len(pkt) > _HELD_CAP:
                self.st["dropped_full"] += 1
                return
            hold = max(self.stall_until.get(a, 0.0), self.stall_until.get(b, 0.0))
            release = self.clock.release(a, b, now, not_before=hold)
        self.seq += 1
        heapq.heappush(self.heap, (release, self.seq, fd, pkt))
        self.held_bytes += len(pkt)
        self.st["max_held"] = max(self.st["max_held"], len(self.heap))

    def release_due(self) -> None:
        """Write every packet whose time has come; lateness is measured at each write."""
        heap, st = self.heap, self.st
        while heap and heap[0][0] <= (now := time.monotonic()):
            release, _, fd, pkt = heapq.heappop(heap)
            self.held_bytes -= len(pkt)
            start = time.monotonic()
            try:
                os.write(fd, pkt)
            except OSError:  # the kernel refused it (e.g. a full queue): a loss, as on a real link
                st["write_errors"] += 1
                continue
            st["write_s"] += time.monotonic() - start
            late = now - release
            st["packets"] += 1
            st["bytes"] += len(pkt) - self.hdr
            st["late_sum_s"] += late
            st["late_max_s"] = max(st["late_max_s"], late)
            if late > 1e-3:
                st["late_over_1ms"] += 1

    def run(self) -> None:
        stdin = sys.stdin.fileno()
        _realtime()
        print("ready", flush=True)
        buffered = b""
        rlist = [stdin, *self.fds]
        while True:
            self.release_due()
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
                        if not _command(self, line.decode()):
                            return
                    continue
                for _ in range(_READS_PER_WAKE):
                    try:
                        pkt = os.read(fd, _MAX_PACKET)
                    except BlockingIOError:
                        break
                    self.take(fd, pkt, time.monotonic())


class _Stats(ctypes.Structure):
    """``lb_dl_stats`` of csrc/lb_delayline.c, field for field."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "packets",
            "bytes",
            "dropped_loss",
            "dropped_cut",
            "dropped_full",
            "unknown",
            "write_errors",
            "late_over_1ms",
            "max_held",
        )
    ] + [(name, ctypes.c_double) for name in ("late_max_s", "late_sum_s", "write_s")]


def native_library() -> tuple[ctypes.CDLL | None, str]:
    """``lowband/_native.so`` with the C packet loop bound, or None and the reason it is missing.

    The library is found where lowband/kernels/_clib.py finds it (the package's root); this
    module loads it itself because the emulator depends on nothing above the standard library.
    """
    path = Path(__file__).resolve().parents[1] / "_native.so"
    if not path.exists():
        return None, f"{path} was not built (no C compiler at install time?)"
    p, i32 = ctypes.c_void_p, ctypes.c_int
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "lb_dl_abi_version": (i32, []),
        "lb_dl_stats_size": (i32, []),
        "lb_dl_create": (
            p,
            [p, i32, p, i32, p, p, ctypes.c_double, ctypes.c_uint64, i32, ctypes.c_int64],
        ),
        "lb_dl_destroy": (None, [p]),
        "lb_dl_run": (i32, [p]),
        "lb_dl_stop": (None, [p]),
        "lb_dl_cut": (i32, [p, i32, i32, i32]),
        "lb_dl_stall": (i32, [p, i32, ctypes.c_double]),
        "lb_dl_stats_get": (None, [p, ctypes.POINTER(_Stats)]),
    }
    try:
        lib = ctypes.CDLL(str(path))
        for name, (res, args) in signatures.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
    except (OSError, AttributeError) as exc:
        return None, f"{path} has no C delay line ({exc}): rebuild with `pip install -e .`"
    if lib.lb_dl_abi_version() != _NATIVE_ABI or lib.lb_dl_stats_size() != ctypes.sizeof(_Stats):
        return None, f"{path} has another delay-line ABI: rebuild with `pip install -e .`"
    return lib, ""


class NativeDelayLine:
    """The C engine: ``lb_dl_run`` holds the packets; this thread only answers commands."""

    engine = "c"

    def __init__(self, config: dict[str, Any], lib: ctypes.CDLL) -> None:
        self.lib = lib
        hosts = config["hosts"]
        n = len(hosts)
        delay = [float(d) for row in config["delay"] for d in row]
        jitter = [float(j) for row in config["jitter"] for j in row]
        if len(delay) != n * n or len(jitter) != n * n:
            raise ConfigError(f"delay and jitter must be {n} x {n} matrices")
        offload = bool(config["offload"])
        self.hdr = _VNET_HDR if offload else 0
        self.fds = [open_tun(name, offload=offload) for name in config["tuns"]]
        addresses = b"".join(bytes(map(int, ip.split("."))) for ip in hosts)
        fds = (ctypes.c_int * len(self.fds))(*self.fds)
        self.handle = lib.lb_dl_create(
            fds,
            len(self.fds),
            addresses,
            n,
            (ctypes.c_double * (n * n))(*delay),
            (ctypes.c_double * (n * n))(*jitter),
            float(config["loss"]),
            int(config.get("seed", 0)) & (2**64 - 1),
            self.hdr,
            _HELD_CAP,
        )
        if not self.handle:
            raise ConfigError(f"the C delay line refused its configuration: {config}")

    def cut(self, a: int, b: int, on: bool) -> None:
        if self.lib.lb_dl_cut(self.handle, a, b, int(on)) != 0:
            log.warning("no path %d-%d to cut or restore", a, b)

    def stall(self, host: int, seconds: float) -> None:
        if self.lib.lb_dl_stall(self.handle, host, seconds) != 0:
            log.warning("cannot stall host %d for %s s", host, seconds)

    def stats(self) -> dict[str, Any]:
        raw = _Stats()
        self.lib.lb_dl_stats_get(self.handle, ctypes.byref(raw))
        return {**{k: getattr(raw, k) for k in _new_stats()}, "engine": self.engine}

    def _commands(self) -> None:
        try:
            while _command(self, sys.stdin.readline()):
                pass
        finally:
            self.lib.lb_dl_stop(self.handle)

    def run(self) -> None:
        _realtime()  # the command thread, started below, inherits it (it sleeps on stdin)
        print("ready", flush=True)
        commands = threading.Thread(target=self._commands, name="delay-line-commands", daemon=True)
        commands.start()
        rc = self.lib.lb_dl_run(self.handle)  # ctypes releases the GIL for the whole loop
        if rc != 0:  # the command thread may still use the handle: leave it to process exit
            raise OSError(-rc, f"the C delay line's packet loop failed: {os.strerror(-rc)}")
        commands.join(timeout=5)
        self.lib.lb_dl_destroy(self.handle)
        self.handle = None


def _choose(config: dict[str, Any]) -> DelayLine | NativeDelayLine:
    choice = os.environ.get(ENGINE_ENV, "auto")
    if choice not in ("auto", "c", "python"):
        raise ConfigError(f"{ENGINE_ENV} must be 'auto', 'c' or 'python', got {choice!r}")
    if choice == "python":
        return DelayLine(config)
    lib, why = native_library()
    if lib is not None:
        return NativeDelayLine(config, lib)
    if choice == "c":
        raise BackendUnavailable(f"{ENGINE_ENV}=c, but {why}")
    log.warning(
        "the C packet loop is unavailable (%s): the Python loop runs, and falls behind sooner "
        "(1500-byte packets: already at 100 Mbit/s, docs/wan.md)",
        why,
    )
    return DelayLine(config)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="delay line: %(levelname)s: %(message)s"
    )
    args = sys.argv[1:] if argv is None else argv
    _choose(json.loads(args[0])).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
