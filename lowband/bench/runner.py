"""The launcher of ``lowband bench``: link emulator, coordinator, workers, progress, results.

Layout of a run: a :class:`~lowband.wan.LinkEmulator` with one host per worker (every
host has the same access link: rate up and down, one-way delay, jitter), the
coordinator on the emulator's hub (reached without the emulated delay, as a
rendezvous service would be), and one spawned worker process per host
(:mod:`lowband.bench.worker`). Workers train the methods one after the other in the
same processes, so each method pays no process start-up and all see the same links.

The launcher collects the workers' events, shows progress bars, reads the emulator's
link-byte counters at each method's start and end (a ``multiprocessing`` barrier,
not the emulated links, marks those edges) and hands everything to
:mod:`lowband.bench.report`. Ctrl-C (or any failure) ends the workers, the
coordinator and the emulator, which removes its namespaces and devices.
"""

from __future__ import annotations

import logging
import queue
import re
import selectors
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lowband.bench.worker import WorkerSpec, run_worker
from lowband.errors import TransportError

__all__ = ["LinkSettings", "RunOutput", "run_workers"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkSettings:
    bandwidth_bps: float
    delay_s: float  # one way
    jitter_s: float
    mode: str = "auto"  # auto | netns | proxy


@dataclass
class RunOutput:
    """What the workers reported, by method: per-rank results, eval curves and link bytes."""

    emulator_mode: str
    results: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    curves: dict[str, dict[int, list[dict[str, float]]]] = field(default_factory=dict)
    link: dict[str, dict[int, dict[str, int]]] = field(default_factory=dict)


def _start_coordinator(net: Any, timeout: float = 60.0) -> tuple[Any, str]:
    """Run ``lowband coordinator`` on the hub; returns (process, "host:port").

    :mod:`lowband.bench._coordinator` is that command, less the warning that the hub's
    emulated address is bound without CURVE (the launcher says it once for every host).
    """
    import subprocess

    argv = [sys.executable, "-m", "lowband.bench._coordinator", "--bind", f"{net.hub_address}:0"]
    proc = net.popen(-1, argv, stdout=subprocess.PIPE, text=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if sel.select(0.2):
                line = proc.stdout.readline()
                m = re.match(r"listening on (?:tcp://)?(\S+)", line)
                if m:
                    return proc, m.group(1)
                if not line:
                    break
    finally:
        sel.close()
    raise TransportError(f"the coordinator did not start (exit code {proc.poll()})")


class _Progress:
    """One tqdm bar per method, advanced to the slowest worker's step (tqdm imported lazily)."""

    def __init__(self, methods: tuple[str, ...], steps: int, world: int, enabled: bool) -> None:
        self.steps, self.world = steps, world
        self.bars: dict[str, Any] = {}
        self.at: dict[str, list[int]] = {m: [0] * world for m in methods}
        self.loss: dict[str, float] = {}
        self._tqdm = None
        if enabled:
            try:
                from tqdm import tqdm

                self._tqdm = tqdm
            except ImportError:
                log.warning(
                    "tqdm is not installed: no progress bars (pip install 'lowband[bench]')"
                )

    def update(self, method: str, rank: int, step: int, loss: float) -> None:
        if self._tqdm is None:
            return
        if method not in self.bars:
            self.bars[method] = self._tqdm(
                total=self.steps, desc=f"{method:<20}", unit="step", leave=True
            )
        self.at[method][rank] = step
        bar = self.bars[method]
        low = min(self.at[method])
        if low > bar.n:
            bar.update(low - bar.n)
        if rank == 0:
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def run_workers(
    spec_kwargs: dict[str, Any],
    *,
    workers: int,
    link: LinkSettings,
    progress: bool = True,
    start_timeout: float = 300.0,
    on_method_done: Callable[[RunOutput, str], None] | None = None,
    islands: tuple[int, ...] = (),
) -> RunOutput:
    """Start the emulator, coordinator and ``workers`` processes; train every method; collect.

    ``spec_kwargs`` are the :class:`WorkerSpec` fields other than ``world_size`` and ``store``.
    ``on_method_done(out, method)`` runs as soon as every worker has finished a method (its
    link bytes included), so a long run keeps the methods it finished if it is stopped later.

    ``islands`` (ranks per island): one emulated host per island, ``sum(islands)`` processes,
    those of island ``k`` on host ``k`` (they share its access link); results are by process.
    """
    import multiprocessing

    from lowband.wan import LinkEmulator, Topology

    hosts = len(islands) if islands else workers
    topo = Topology.uniform(
        hosts, rate=link.bandwidth_bps, rtt=2 * link.delay_s, jitter=link.jitter_s
    )
    host_of = list(range(workers))
    ports: tuple[int, ...] = ()
    if islands:
        from lowband.bench.worker import locate

        workers = sum(islands)
        host_of = [locate(r, islands)[0] for r in range(workers)]
        ports = tuple(_free_port() for _ in islands)
    ctx = multiprocessing.get_context("spawn")
    events: Any = ctx.Queue()
    barrier: Any = ctx.Barrier(workers + 1)
    methods: tuple[str, ...] = tuple(spec_kwargs["methods"])
    bars = _Progress(methods, spec_kwargs["train"].steps, workers, progress)
    with LinkEmulator(topo, mode=link.mode) as net:
        out = RunOutput(emulator_mode=net.mode)
        log.info("link emulator up (%s mode)", net.mode)
        coord, address = _start_coordinator(net)
        log.info("coordinator listening on %s", address)
        spec = WorkerSpec(
            world_size=workers,
            store=address,
            backend="zmq",
            bandwidth_bps=link.bandwidth_bps,
            rtt_s=2 * link.delay_s,
            islands=tuple(islands),
            island_ports=ports,
            **spec_kwargs,
        )
        procs = [
            net.spawn(host_of[r], run_worker, args=(r, spec, events, barrier), name=f"bench-worker{r}")
            for r in range(workers)
        ]
        edges = _EdgeReader(net, barrier, methods)
        edges.start()
        try:
            _collect(
                out, events, procs, edges, bars, workers, methods, start_timeout, on_method_done
            )
        except BaseException:
            barrier.abort()
            for p in procs:  # Ctrl-C or a failure: end every worker now, not after a timeout
                if p.is_alive():
                    p.terminate()
            raise
        finally:
            bars.close()
            for p in procs:
                p.join(timeout=10)
            coord.terminate()
        log.info("workers ended")
        edges.join(timeout=5)
        return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _EdgeReader(threading.Thread):
    """The launcher's side of the method barriers: reads link bytes at each method's edges."""

    def __init__(self, net: Any, barrier: Any, methods: tuple[str, ...]) -> None:
        super().__init__(name="bench-edges", daemon=True)
        self.net, self.barrier, self.methods = net, barrier, methods
        self.deltas: dict[str, dict[int, dict[str, int]]] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for m in self.methods:
                self.barrier.wait()
                start = self.net.link_bytes()
                self.barrier.wait()
                self.barrier.wait()
                end = self.net.link_bytes()
                # Set before the last wait: workers report "done" only after it.
                self.deltas[m] = {
                    h: {k: end[h][k] - start.get(h, {}).get(k, 0) for k in end[h]} for h in end
                }
                self.barrier.wait()
        except threading.BrokenBarrierError as e:
            self.error = e


def _collect(
    out: RunOutput,
    events: Any,
    procs: list[Any],
    edges: _EdgeReader,
    bars: _Progress,
    workers: int,
    methods: tuple[str, ...],
    start_timeout: float,
    on_method_done: Callable[[RunOutput, str], None] | None,
) -> None:
    ready: set[int] = set()
    done: dict[str, set[int]] = {m: set() for m in methods}
    t_start = time.monotonic()
    while any(len(d) < workers for d in done.values()):
        try:
            ev = events.get(timeout=1.0)
        except queue.Empty:
            ev = None
        if ev is None:
            dead = [
                i for i, p in enumerate(procs) if not p.is_alive() and p.exitcode not in (None, 0)
            ]
            if dead:
                codes = [procs[i].exitcode for i in dead]
                raise TransportError(f"bench worker(s) {dead} exited with codes {codes}")
            if len(ready) < workers and time.monotonic() - t_start > start_timeout:
                raise TransportError(
                    f"only {len(ready)} of {workers} workers joined the group in {start_timeout:.0f} s"
                )
            continue
        kind, rank = ev[0], ev[1]
        if kind != "progress":
            log.info("event %s from rank %d after %.1f s", kind, rank, time.monotonic() - t_start)
        if kind == "ready":
            ready.add(rank)
        elif kind == "progress":
            bars.update(ev[2], rank, ev[3], ev[4])
        elif kind == "eval":
            out.curves.setdefault(ev[2], {}).setdefault(rank, []).append(ev[3])
        elif kind == "done":
            out.results.setdefault(ev[2], {})[rank] = ev[3]
            done[ev[2]].add(rank)
            if len(done[ev[2]]) == workers:
                # Workers send "done" after the end barrier, so the link bytes are read.
                out.link[ev[2]] = edges.deltas[ev[2]]
                if on_method_done is not None:
                    on_method_done(out, ev[2])
        elif kind == "error":
            raise TransportError(f"bench worker {rank} failed during {ev[2]!r}:\n{ev[3]}")
