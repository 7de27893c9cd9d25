"""``LinkEmulator``: one API over the two modes, and the processes that run on its hosts.

``mode="netns"`` is faithful (the real kernel TCP stack sees the emulated round trip, see
``_netns``); ``mode="proxy"`` needs no root (a relay with a sender-window model, see
``_proxy``); ``mode="auto"`` picks netns when it can build namespaces here, else proxy, and
logs the choice. Everything the emulator creates (namespaces, devices, relay, processes started
with :meth:`spawn`/:meth:`popen`) is removed on ``__exit__``, on SIGTERM and at interpreter exit.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any

from lowband.errors import BackendUnavailable, ConfigError
from lowband.wan._netns import HUB_ADDRESS, NetnsLinks, enter_namespace, netns_available
from lowband.wan._proxylinks import ProxyLinks
from lowband.wan.addressing import ENV_VAR
from lowband.wan.topology import Topology

__all__ = ["LinkEmulator", "HUB"]

log = logging.getLogger(__name__)

#: Host index of the hub: where a coordinator runs, reachable from every host. In netns mode it
#: is the core namespace (no delay or uplink limit on the way in); in proxy mode the normal one.
HUB = -1

_PR_SET_PDEATHSIG = 1
_live: set[LinkEmulator] = set()
_live_lock = threading.Lock()
_hooks_installed = False
_previous_sigterm: Any = None


def _close_all() -> None:
    with _live_lock:
        emulators = list(_live)
    for emu in emulators:
        emu.close()


def _on_sigterm(signum: int, frame: Any) -> None:
    _close_all()
    if callable(_previous_sigterm):
        _previous_sigterm(signum, frame)
    raise SystemExit(128 + signum)


def _install_hooks() -> None:
    global _hooks_installed, _previous_sigterm
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_close_all)
    if threading.current_thread() is threading.main_thread():
        _previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)


def _die_with_parent(parent: int) -> None:
    """Ask Linux to kill this process when its parent dies (even by SIGKILL): nothing outlives a run."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _watched_parent() -> int:
    """This pid if children may die with it, else 0.

    Linux sends the parent-death signal when the *thread* that started the child ends, so only
    children started from the main thread (which lives as long as the process) ask for it.
    """
    return os.getpid() if threading.current_thread() is threading.main_thread() else 0


def _run_on_host(
    parent: int,
    namespace: str | None,
    env: dict[str, str],
    target: Callable[..., Any],
    args: tuple,
    kwargs: dict[str, Any],
) -> Any:
    """Child side of :meth:`LinkEmulator.spawn`: join the host's namespace, then run ``target``."""
    if parent:
        _die_with_parent(parent)
    if namespace is not None:
        enter_namespace(namespace)
    os.environ.update(env)
    return target(*args, **kwargs)


class LinkEmulator:
    """Emulated internet links between ``topology.n`` hosts.

    >>> with LinkEmulator(Topology.uniform(2, rate="100mbit", rtt="100ms")) as net:  # doctest: +SKIP
    ...     p = net.spawn(1, serve, args=(net.host_address(1), 5000))
    ...     net.spawn(0, fetch, args=(net.host_address(1), 5000)).join()
    """

    def __init__(
        self,
        topology: Topology,
        mode: str = "auto",
        *,
        offload: bool = True,
        window: int | None = None,
        seed: int = 0,
    ) -> None:
        if mode not in ("auto", "netns", "proxy"):
            raise ConfigError(f"mode must be 'auto', 'netns' or 'proxy', got {mode!r}")
        if window is not None and window < 1448:
            raise ConfigError(f"window must be at least one segment (1448 bytes), got {window}")
        if mode == "auto":
            ok, why = netns_available()
            mode = "netns" if ok else "proxy"
            if ok:
                log.info("link emulator: netns mode")
            else:  # the faithful mode is missing: say so louder
                log.warning("link emulator: proxy mode, a calibrated model (%s)", why)
        self.topology = topology
        self.mode = mode
        self._links: NetnsLinks | ProxyLinks = (
            NetnsLinks(topology, offload=offload, seed=seed)
            if mode == "netns"
            else ProxyLinks(topology, window=window, seed=seed)
        )
        self._procs: list[multiprocessing.process.BaseProcess | subprocess.Popen] = []
        self._started = False
        self._lock = threading.Lock()

    # -- life cycle --------------------------------------------------------------------------
    def __enter__(self) -> LinkEmulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if self._started:
            return
        _install_hooks()
        with _live_lock:
            _live.add(self)
        try:
            self._links.start()
        except BaseException:
            self.close()
            raise
        self._started = True

    def close(self) -> None:
        """End every process started on the hosts, then remove links, devices and namespaces."""
        with self._lock:
            procs, self._procs = self._procs, []
        for p in procs:
            _end_process(p)
        self._links.stop()
        self._started = False
        with _live_lock:
            _live.discard(self)

    def _check(self, host: int) -> None:
        if not self._started:
            raise BackendUnavailable("the link emulator is not started (use it in a with block)")
        if host != HUB and not 0 <= host < self.topology.n:
            raise ConfigError(f"no host {host}: hosts are 0..{self.topology.n - 1} (or HUB = -1)")

    # -- addressing --------------------------------------------------------------------------
    def host_address(self, host: int) -> str:
        """The IP that processes on ``host`` bind and advertise (``HUB`` gives the hub's)."""
        self._check(host)
        if host == HUB:
            return self.hub_address
        return self._links.host_address(host)

    @property
    def hub_address(self) -> str:
        """The address every host reaches the hub (coordinator) at."""
        return HUB_ADDRESS if self.mode == "netns" else "127.0.0.1"

    def connect_address(self, src: int, ip: str, port: int) -> tuple[str, int]:
        """Where a process on ``src`` connects to reach ``(ip, port)`` through the links."""
        self._check(src)
        if isinstance(self._links, NetnsLinks) or src == HUB:
            return ip, int(port)
        return self._links.connect_address(src, ip, port)

    def env(self, host: int) -> dict[str, str]:
        """Environment for a process on ``host`` (read by :mod:`lowband.wan.addressing`)."""
        self._check(host)
        info: dict[str, Any] = {
            "mode": self.mode,
            "host": host,
            "address": self.host_address(host),
            "hub": self.hub_address,
        }
        if isinstance(self._links, ProxyLinks):
            info["control"] = self._links.control_path
        return {ENV_VAR: json.dumps(info)}

    # -- processes on hosts ------------------------------------------------------------------
    def spawn(
        self,
        host: int,
        target: Callable[..., Any],
        args: Sequence[Any] = (),
        *,
        kwargs: dict[str, Any] | None = None,
        name: str | None = None,
        daemon: bool | None = None,
    ) -> multiprocessing.process.BaseProcess:
        """Start ``target(*args, **kwargs)`` in a new process on ``host`` (spawn start method).

        In netns mode the child joins the host's namespace before it runs ``target``. The
        process is ended when the emulator closes, if it has not ended by then.
        """
        self._check(host)
        namespace = self._links.namespace(host) if isinstance(self._links, NetnsLinks) else None
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(
            target=_run_on_host,
            args=(_watched_parent(), namespace, self.env(host), target, tuple(args), kwargs or {}),
            name=name or f"wan-host{host}",
            daemon=daemon,
        )
        proc.start()
        with self._lock:
            self._procs.append(proc)
        return proc

    def command(self, host: int, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs on ``host`` (``ip netns exec`` in netns mode)."""
        self._check(host)
        if isinstance(self._links, NetnsLinks):
            return self._links.command(host, list(argv))
        return list(argv)

    def popen(self, host: int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """``subprocess.Popen`` of ``argv`` on ``host``, with :meth:`env` added to its environment."""
        env = {**(kwargs.pop("env", None) or os.environ), **self.env(host)}
        if _watched_parent():
            kwargs.setdefault("preexec_fn", functools.partial(_die_with_parent, os.getpid()))
        proc = subprocess.Popen(self.command(host, argv), env=env, **kwargs)
        with self._lock:
            self._procs.append(proc)
        return proc

    # -- faults and counters -----------------------------------------------------------------
    def cut(self, a: int, b: int) -> None:
        """Cut the path between hosts ``a`` and ``b`` (both ways) until :meth:`restore`.

        netns: packets are dropped, so TCP retransmits with back-off; proxy: bytes wait.
        """
        self._check(a)
        self._check(b)
        self._links.cut(a, b)

    def restore(self, a: int, b: int) -> None:
        """Undo :meth:`cut`."""
        self._check(a)
        self._check(b)
        self._links.restore(a, b)

    def stall(self, host: int, seconds: float) -> None:
        """Hold every packet to or from ``host`` for the next ``seconds`` (then deliver them)."""
        self._check(host)
        if not 0.0 <= seconds <= 3600.0:
            raise ConfigError(f"stall seconds must be in [0, 3600], got {seconds}")
        self._links.stall(host, seconds)

    def link_bytes(self) -> dict[int, dict[str, int]]:
        """Bytes that crossed each host's access link since start: ``{host: {"up", "down"}}``.

        netns mode counts whole frames on the veth (Ethernet, IP and TCP headers included);
        proxy mode counts TCP payload bytes (it never sees headers).
        """
        self._check(0)
        return self._links.link_bytes()

    def line_stats(self) -> dict[str, Any]:
        """How well the delay line or relay kept its schedule (late_max_s, late_sum_s, ...)."""
        self._check(0)
        if isinstance(self._links, NetnsLinks):
            return self._links.delayline_stats()
        return self._links.relay_stats()

    @property
    def namespaces(self) -> list[str]:
        """The namespaces this emulator made (empty in proxy mode)."""
        if isinstance(self._links, NetnsLinks):
            return [self._links.core, *self._links.hosts]
        return []


def _end_process(p: multiprocessing.process.BaseProcess | subprocess.Popen) -> None:
    try:
        if isinstance(p, subprocess.Popen):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
        else:
            if p.is_alive():
                p.terminate()
                p.join(timeout=3)
                if p.is_alive():
                    p.kill()
            p.join(timeout=5)
    except (OSError, ValueError, AssertionError):
        log.warning("could not end process %r", p)
