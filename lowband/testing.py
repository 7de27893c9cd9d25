"""Helpers for tests (and users' tests): in-process groups and local process groups.

In-process, fast (threads, no sockets)::

    from lowband.testing import ThreadGroup

    def step(group, x):                      # runs once per rank, on its own thread
        return group.all_reduce(x * (group.rank + 1), codec="q8").wait()

    with ThreadGroup(4) as tg:               # on_failure="raise"|"drop", peer_timeout=...
        results = tg.run(step, torch.ones(10))   # list indexed by rank; re-raises a rank's error
        tg.groups[0].stats                   # each rank's Group (real Group, real collectives)
        tg.kill(2)                           # rank 2 "crashes": the others see PeerLost
        tg.rejoin(2)                         # ...and comes back at the next commit (drop mode)

``tg.run(fn, *args, timeout=120, return_exceptions=False, ranks=None)`` calls
``fn(group, *args)`` on one thread per rank (``ranks`` to run a subset) and
returns the results by rank; with ``return_exceptions=True`` a rank's exception
is returned in its place instead of raised. A rank still running after
``timeout`` seconds raises ``CollectiveTimeout``.

Real processes, spawned once and reused across tests (each fresh process pays
seconds of ``import torch``)::

    from lowband.testing import spawn_group, start_store

    def worker(rank, world_size, addr):      # module level, so a spawned process can import it
        group = lowband.init_group(rank, world_size, store=addr, backend="torch")
        try:
            return group.all_reduce(torch.ones(4)).wait()
        finally:
            group.close()

    store, addr = start_store()              # a real torch TCPStore, served from this process
    results = spawn_group(4, worker, addr, timeout=60)   # ``fn(rank, world_size, *args)`` per process

Small models and data that the optimizer tests share (ranks as threads share torch's
global generator, so ``seeded`` holds a lock while it draws)::

    model = tiny_mlp(16, 96, 4, seed=0)                      # Linear/Tanh/Linear, seeded
    x, y = regression_batch(rank, step, rows=32, features=16, outputs=4,
                            target=lambda v: torch.tanh(1.5 * v), noise=0.05)
    loss = train_step(model, opt, x, y)                       # zero_grad, MSE, backward, step
    RecordingGroup(group).calls                               # the collectives called, in order

``spawn_group`` runs on the shared :class:`ProcessPool` (``default_pool()``; the
``process_pool`` fixture of ``tests/conftest.py`` closes it at the end of the
session, and an ``atexit`` hook does as well). A worker that dies (``kill_self()``
is a real ``SIGKILL``) or overruns ``timeout`` is killed and replaced; its slot
in the results holds a :class:`ProcessDied` (with ``return_exceptions=True``, as
do errors raised by ``fn``) or the first error is raised.

Peers that die and come back, as under a launcher (``torchrun --max-restarts``)::

    from lowband.testing import Launcher, random_kills

    with Launcher(4, train, coordinator_address, max_restarts=3) as ln:   # train(rank, world, addr)
        kills = random_kills(seed=0, world=4, n=2, between=(1.0, 5.0))  # (seconds, rank), rank 0 too
        results = ln.run(timeout=120, kills=kills)   # SIGKILLs on the way; dead ranks run again
        ln.restarts, ln.events                       # who was restarted, and the story
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import io
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from typing import Any

import torch

from lowband.errors import CollectiveTimeout
from lowband.transport._local import LocalHub
from lowband.transport.group import Group

__all__ = [
    "interruptible",
    "ProcessDied",
    "Launcher",
    "ProcessPool",
    "RecordingGroup",
    "Regression",
    "ThreadGroup",
    "random_kills",
    "default_pool",
    "flat_params",
    "flood_requests",
    "kill_self",
    "load_state_bytes",
    "regression_batch",
    "rss_bytes",
    "seeded",
    "spawn_group",
    "start_store",
    "state_bytes",
    "tiny_mlp",
    "train_step",
    "zmq_carriers",
]


class ThreadGroup:
    """``world_size`` ranks in this process, each with its own :class:`Group` over a shared hub."""

    def __init__(
        self,
        world_size: int,
        *,
        on_failure: str = "raise",
        peer_timeout: float = 30.0,
        timeout: float | None = None,
    ) -> None:
        self.hub = LocalHub(world_size, peer_timeout=peer_timeout)
        self.world_size = world_size
        self._group_args = {"on_failure": on_failure, "timeout": timeout}
        self.groups = [
            Group(self.hub.carrier(r), on_failure=on_failure, timeout=timeout) for r in range(world_size)
        ]

    def rejoin(self, rank: int, *, timeout: float = 60.0) -> Group:
        """A "restarted" ``rank`` rejoins: blocks until the others' next commit admits it,
        then returns its new Group (also stored in ``groups[rank]``)."""
        self.groups[rank] = Group(self.hub.join(rank, timeout=timeout), **self._group_args)
        return self.groups[rank]

    def kill(self, rank: int) -> None:
        """Simulate a crash of ``rank``: the others' waits on it raise PeerLost."""
        self.hub.kill(rank)

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        timeout: float = 120.0,
        return_exceptions: bool = False,
        ranks: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Call ``fn(group, *args, **kwargs)`` on one thread per rank; results by rank."""
        ranks = list(range(self.world_size)) if ranks is None else list(ranks)
        results: list[Any] = [None] * self.world_size
        errors: dict[int, BaseException] = {}

        def target(r: int) -> None:
            try:
                results[r] = fn(self.groups[r], *args, **kwargs)
            except BaseException as e:  # reported below, by rank
                errors[r] = e

        threads = [threading.Thread(target=target, args=(r,), name=f"rank-{r}", daemon=True) for r in ranks]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
        stuck = [r for r, t in zip(ranks, threads) if t.is_alive()]
        if stuck:
            for r in stuck:
                self.hub.kill(r)  # release whatever they wait on, so the threads end
            raise CollectiveTimeout(f"ranks {stuck} still running after {timeout}s")
        if return_exceptions:
            for r, e in errors.items():
                results[r] = e
        elif errors:
            raise errors[min(errors)]
        return results

    def close(self) -> None:
        self.hub.shutdown()
        for g in self.groups:
            g.close()

    def __enter__(self) -> ThreadGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RecordingGroup:
    """A group seen through a log of the collectives called on it (delegation, no patching)."""

    def __init__(self, group: Any) -> None:
        self._group = group
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._group, name)

    def all_reduce(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(f"all_reduce:{kwargs.get('key', '')}")
        return self._group.all_reduce(tensor, *args, **kwargs)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Any:
        self.calls.append("broadcast")
        return self._group.broadcast(tensor, src)

    def verify(self, config: Any, **kwargs: Any) -> None:
        self.calls.append("verify")
        self._group.verify(config, **kwargs)


# -- small models and data ----------------------------------------------------------------------

_SEED_LOCK = threading.Lock()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """``torch.manual_seed(seed)`` for the block, one thread at a time: the ranks of a
    :class:`ThreadGroup` share torch's global generator."""
    with _SEED_LOCK:
        torch.manual_seed(seed)
        yield


def tiny_mlp(*widths: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Sequential:
    """``Linear`` layers of ``widths`` (``tiny_mlp(16, 96, 4)``) with ``Tanh`` between, drawn
    under :func:`seeded`."""
    layers: list[torch.nn.Module] = []
    with seeded(seed):
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            if i:
                layers.append(torch.nn.Tanh())
            layers.append(torch.nn.Linear(a, b))
        return torch.nn.Sequential(*layers).to(dtype)


def regression_batch(
    rank: int,
    step: int,
    *,
    rows: int,
    features: int,
    outputs: int,
    target: Callable[[torch.Tensor], torch.Tensor],
    noise: float,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch of step ``step``: ``x`` normal, ``y = target(x[:, :outputs])``
    plus ``noise`` times normal noise, from a generator seeded by (rank, step)."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(rows, features, generator=g)
    y = target(x[:, :outputs]) + noise * torch.randn(rows, outputs, generator=g)
    return x.to(dtype), y.to(dtype)


def train_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> float:
    """One step of mean-squared error on ``(x, y)`` (the loss in fp32); returns the loss."""
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
    loss.backward()
    opt.step()
    return float(loss.detach())


@dataclasses.dataclass(frozen=True)
class Regression:
    """A small regression problem of a test suite: the model (:func:`tiny_mlp` of
    ``widths``), each rank's batch of each step (:func:`regression_batch`) and one training
    step on it, so a suite names its problem once instead of wrapping the three again."""

    widths: tuple[int, ...]
    rows: int
    target: Callable[[torch.Tensor], torch.Tensor]
    noise: float

    def model(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        return tiny_mlp(*self.widths, seed=seed, dtype=dtype)

    def batch(
        self, rank: int, step: int, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return regression_batch(
            rank, step, rows=self.rows, features=self.widths[0], outputs=self.widths[-1],
            target=self.target, noise=self.noise, dtype=dtype,
        )  # fmt: skip

    def train_step(self, model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> float:
        """One step on rank ``rank``'s batch of step ``step``, in the model's dtype."""
        return train_step(model, opt, *self.batch(rank, step, next(model.parameters()).dtype))


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter of ``model``, in fp32, end to end."""
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> bytes:
    """Model and optimizer state as ``torch.save`` writes them (what a resume reads back)."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    return buf.getvalue()


def load_state_bytes(saved: bytes) -> dict[str, Any]:
    """What :func:`state_bytes` wrote: ``{"model": ..., "opt": ...}``."""
    return torch.load(io.BytesIO(saved), weights_only=True)


# -- real processes -----------------------------------------------------------------------------


class ProcessDied(RuntimeError):
    """A pool worker ended (killed, crashed, or stopped for overrunning its timeout)."""

    def __init__(self, rank: int, exitcode: int | None) -> None:
        super().__init__(f"rank {rank}: worker process ended with exit code {exitcode}")
        self.rank = rank
        self.exitcode = exitcode


def kill_self() -> None:
    """``kill -9`` the calling process: a real crash, no cleanup, no goodbye on any socket."""
    os.kill(os.getpid(), signal.SIGKILL)


def _worker_main(conn: Connection) -> None:
    import torch

    torch.set_num_threads(1)  # the pool shares a few cores with the test process
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        fn, args, kwargs = task
        try:
            reply: tuple[str, Any] = ("ok", fn(*args, **kwargs))
        except BaseException as e:  # sent back to the test, which re-raises it
            reply = ("err", e)
        try:
            conn.send(reply)
        except Exception as e:  # an unpicklable result or error: say so instead
            conn.send(("err", RuntimeError(f"could not send the result back: {e!r}")))


class _Worker:
    def __init__(self, ctx: Any) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="lowband-pool")
        self.proc.start()
        child.close()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)
        self.conn.close()


class ProcessPool:
    """Worker processes (spawn start method) that run one task each per :meth:`run`."""

    def __init__(self) -> None:
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def run(
        self,
        n: int,
        fn: Callable[..., Any],
        *args: Any,
        timeout: float = 120.0,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """Call ``fn(rank, n, *args, **kwargs)`` in ``n`` worker processes; results by rank."""
        with self._lock:
            for i, w in enumerate(self._workers):
                if not w.proc.is_alive():
                    w.kill()
                    self._workers[i] = _Worker(self._ctx)
            while len(self._workers) < n:
                self._workers.append(_Worker(self._ctx))
            workers = self._workers[:n]
            for r, w in enumerate(workers):
                w.conn.send((fn, (r, n, *args), kwargs))
            results: list[Any] = [None] * n
            pending = set(range(n))
            deadline = time.monotonic() + timeout
            while pending and time.monotonic() < deadline:
                for r in sorted(pending):
                    w = workers[r]
                    try:
                        if w.conn.poll(0.05):
                            status, value = w.conn.recv()
                            results[r] = value if status == "ok" else _Raised(value)
                            pending.discard(r)
                    except (EOFError, OSError):
                        w.proc.join(5)
                        results[r] = ProcessDied(r, w.proc.exitcode)
                        pending.discard(r)
            for r in pending:  # overran the timeout: end it, and report it
                workers[r].kill()
                results[r] = ProcessDied(r, None)
        if pending and not return_exceptions:
            raise CollectiveTimeout(f"ranks {sorted(pending)} still running after {timeout}s (killed)")
        errors = [(r, v) for r, v in enumerate(results) if isinstance(v, (_Raised, ProcessDied))]
        if errors and not return_exceptions:
            r, v = errors[0]
            raise v.error if isinstance(v, _Raised) else v
        return [v.error if isinstance(v, _Raised) else v for v in results]

    def close(self) -> None:
        """End every worker (politely, then SIGKILL after a few seconds)."""
        with self._lock:
            for w in self._workers:
                try:
                    w.conn.send(None)
                except (OSError, ValueError):
                    pass
            deadline = time.monotonic() + 5.0
            for w in self._workers:
                w.proc.join(max(0.0, deadline - time.monotonic()))
                w.kill()
            self._workers.clear()


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_pool: ProcessPool | None = None


def default_pool() -> ProcessPool:
    """The process-wide pool, created on first use and closed at exit."""
    global _pool
    if _pool is None:
        _pool = ProcessPool()
        atexit.register(_pool.close)
    return _pool


class Launcher:
    """``fn(rank, world, *args)`` in one real process per rank, restarted when it dies, as
    ``torchrun --max-restarts`` or systemd would: the same function runs again for that rank,
    with no flag (a restarted peer finds out from its group that it joined a running one).

    Restarts take a warm spare process (``torch`` already imported) so a test does not pay
    seconds of start-up per kill; a real launcher pays them, and the protocol does not care.
    :meth:`kill` sends a signal to a rank's process now; :meth:`run` waits for every rank to
    return (its last attempt's result), killing ranks at the times of ``kills`` on the way
    (see :func:`random_kills`). Every process it started is ended when :meth:`close` (or the
    ``with`` block) ends::

        with Launcher(4, train, coordinator_address) as ln:
            results = ln.run(timeout=120, kills=random_kills(seed=0, world=4, n=2, between=(3, 10)))
            ln.restarts                  # {rank: times restarted}
    """

    def __init__(
        self, world: int, fn: Callable[..., Any], *args: Any, max_restarts: int = 3, spares: int = 1
    ) -> None:
        self.world, self.fn, self.args = world, fn, args
        self.max_restarts = max_restarts
        self._ctx = mp.get_context("spawn")
        self._spares = [_Worker(self._ctx) for _ in range(spares)]
        self._workers = [_Worker(self._ctx) for _ in range(world)]
        for w in self._workers + self._spares:  # warm: kill times count from a started group
            w.conn.send((os.getpid, (), {}))
        for w in self._workers + self._spares:
            if not w.conn.poll(300):
                raise CollectiveTimeout("a launcher process did not start within 300s")
            w.conn.recv()
        self.restarts = {r: 0 for r in range(world)}
        #: (seconds since run() began, rank, what): "started", "killed", "died", "restarted", "done"
        self.events: list[tuple[float, int, str]] = []
        self._t0 = time.monotonic()

    def _note(self, rank: int, what: str) -> None:
        self.events.append((time.monotonic() - self._t0, rank, what))

    def kill(self, rank: int, sig: int = signal.SIGKILL) -> bool:
        """Send ``sig`` to ``rank``'s process; False if it is not running."""
        w = self._workers[rank]
        if not w.proc.is_alive() or w.proc.pid is None:
            return False
        try:
            os.kill(w.proc.pid, sig)
        except ProcessLookupError:
            return False
        self._note(rank, "killed")
        return True

    def _restart(self, rank: int) -> None:
        old = self._workers[rank]
        old.kill()
        self._workers[rank] = self._spares.pop(0) if self._spares else _Worker(self._ctx)
        self._spares.append(_Worker(self._ctx))  # the next restart's spare warms up meanwhile
        self.restarts[rank] += 1
        self._workers[rank].conn.send((self.fn, (rank, self.world, *self.args), {}))
        self._note(rank, "restarted")

    def run(
        self,
        *,
        timeout: float = 120.0,
        kills: Sequence[tuple[float, int]] = (),
        clock_from: Callable[[], bool] | None = None,
    ) -> list[Any]:
        """Run every rank to completion; results by rank (a rank that died more than
        ``max_restarts`` times, or overran ``timeout``, gives a :class:`ProcessDied`;
        an error ``fn`` raised is returned in its place). The times of ``kills`` count from
        the start, or from the first moment ``clock_from()`` is true (say, once every rank
        reported that it trains)."""
        self._t0 = time.monotonic()
        for r, w in enumerate(self._workers):
            w.conn.send((self.fn, (r, self.world, *self.args), {}))
            self._note(r, "started")
        todo = sorted(kills)
        origin = None if clock_from is not None else self._t0
        results: list[Any] = [None] * self.world
        pending = set(range(self.world))
        deadline = self._t0 + timeout
        while pending and time.monotonic() < deadline:
            if origin is None and clock_from is not None and clock_from():
                origin = time.monotonic()
                self._note(-1, "clock")
            now = -1.0 if origin is None else time.monotonic() - origin
            while todo and todo[0][0] <= now:
                _, victim = todo.pop(0)
                if victim in pending:
                    self.kill(victim)
            for r in sorted(pending):
                w = self._workers[r]
                try:
                    if not w.conn.poll(0.02):
                        continue
                    status, value = w.conn.recv()
                except (EOFError, OSError):
                    w.proc.join(5)
                    self._note(r, "died")
                    if self.restarts[r] < self.max_restarts:
                        self._restart(r)
                    else:
                        results[r] = ProcessDied(r, w.proc.exitcode)
                        pending.discard(r)
                    continue
                if status != "ok" and self.restarts[r] < self.max_restarts:
                    # a launcher restarts a process that failed, too (exit code 1): the worker
                    # is ended first, so nothing it left open lingers as a live member
                    self._note(r, f"failed: {value!r}"[:200])
                    self._restart(r)
                    continue
                results[r] = value
                pending.discard(r)
                self._note(r, "done")
        for r in pending:
            self._workers[r].kill()
            results[r] = ProcessDied(r, None)
        return results

    def close(self) -> None:
        for w in self._workers + self._spares:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 5.0
        for w in self._workers + self._spares:
            w.proc.join(max(0.0, deadline - time.monotonic()))
            w.kill()

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def random_kills(
    *, seed: int, world: int, n: int, between: tuple[float, float], ranks: Sequence[int] | None = None,
    gap: float = 0.0,
) -> list[tuple[float, int]]:
    """``n`` kills at random times in ``between`` (seconds after the start), of random ranks
    (rank 0 included), at least ``gap`` seconds apart: a schedule for :meth:`Launcher.run`.
    Times fall anywhere, so inner steps, syncs and joins all get hit."""
    import random

    rng = random.Random(seed)
    pool = list(range(world)) if ranks is None else list(ranks)
    out: list[tuple[float, int]] = []
    t = between[0]
    for i in range(n):
        room = (between[1] - t) / (n - i)
        t = t + rng.uniform(0, max(0.0, room - gap)) if i else rng.uniform(between[0], between[0] + room)
        out.append((t, rng.choice(pool)))
        t += gap
    return out


def spawn_group(n: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
    """``default_pool().run(n, fn, *args, **kwargs)``: ``fn(rank, n, *args)`` in ``n`` processes."""
    return default_pool().run(n, fn, *args, **kwargs)


def interruptible() -> None:
    """``preexec_fn`` for a child process that a test will stop with SIGINT (Ctrl-C).

    A shell starts background jobs with SIGINT ignored, children inherit that, and a Python
    started with SIGINT ignored never raises KeyboardInterrupt: such a test would hang when CI
    runs in the background. This puts SIGINT back to its default before the child starts.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_store(host: str = "127.0.0.1") -> tuple[Any, str]:
    """A torch ``TCPStore`` served from this process on a free port: ``(store, "host:port")``.

    Keep the returned store object alive for as long as the group needs it.
    """
    from lowband.transport._torch import serve_store

    store, port = serve_store(host, 0, timeout=60)  # listens on `host` only
    return store, f"{host}:{port}"


def rss_bytes(pid: int | None = None) -> int:
    """Resident memory of process ``pid`` (this one by default), from ``/proc``."""
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for process {pid}")


def zmq_carriers(address: str, n: int, *, group: str, timeout: float = 90.0, **options: Any) -> list[Any]:
    """``n`` ZeroMQ carriers (ranks ``0..n-1`` of ``group``) in this process, joined through the
    coordinator at ``address``; ``options`` go to each ``ZmqCarrier``. Close them when done."""
    from lowband.transport._zmq import ZmqCarrier

    out: list[Any] = [None] * n
    errors: list[BaseException] = []

    def make(r: int) -> None:
        try:
            out[r] = ZmqCarrier(r, n, coordinator=address, group=group, **options)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=make, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors or None in out:
        for c in out:
            if c is not None:
                c.close()
        raise errors[0] if errors else CollectiveTimeout(f"{n} carriers did not join in {timeout:g}s")
    return out


def flood_requests(address: str, reqs: Any, *, expect: int = 0, timeout: float = 30.0) -> int:
    """Send JSON requests to the coordinator at ``address`` from one raw DEALER, as fast as it
    takes them, reading the replies that come; then wait (at most ``timeout`` s) until the
    coordinator has handled them all and ``expect`` replies came. Returns how many replies
    were refusals (``ok`` false). For attack benchmarks and tests of the coordinator's caps."""
    import json

    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger, s.sndtimeo = 0, int(timeout * 1000)
    s.connect(f"tcp://{address}")
    errors = got = 0
    barrier = False

    def drain(wait_ms: int) -> bool:
        nonlocal errors, got, barrier
        if not s.poll(wait_ms):
            return False
        rep = json.loads(s.recv())
        if rep.get("id") == "barrier":
            barrier = True
        elif rep.get("id") is not None:  # not a liveness probe
            got += 1
            errors += rep["ok"] is False
        return True

    try:
        for req in reqs:
            s.send(json.dumps(req).encode())
            while drain(0):
                pass
        s.send(b'{"op": "ping", "id": "barrier"}')  # answered after every request before it
        end = time.monotonic() + timeout
        while (got < expect or not barrier) and time.monotonic() < end:
            drain(200)
    finally:
        s.close(0)
        ctx.term()
    return errors
