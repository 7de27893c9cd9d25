"""``lowband.init_group``: rendezvous, pick a backend's Carrier, and shake hands.

``init_group()`` with no arguments reads the variables torchrun sets (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); explicit arguments win and
nothing is read from the environment for an argument that was given.

Under torchrun (``TORCHELASTIC_RUN_ID`` set) ``MASTER_ADDR:MASTER_PORT`` is torch's
``TCPStore``, served by torchrun's agent, not a lowband coordinator. With
``backend="zmq"`` and no ``store=``, the first rank to ask starts a coordinator
process beside its agent (in a session of its own, ending when that agent ends:
``--exit-with``), bound to the address that reaches ``MASTER_ADDR``, and posts
its address in the store; every rank reads it from there. So membership still
never lives inside a trainer, and a restarted worker finds the same coordinator. The
handshake that ends it exchanges, between every pair of peers, the lowband and
wire-format versions, the backend, ``on_failure`` and the caller's ``config``
(codec, ``sync_every``, fragments, parameter shapes...), and raises
``ConfigMismatch`` naming the first differences instead of deadlocking later.
"""

from __future__ import annotations

import atexit
import datetime
import importlib
import logging
import os
import weakref
from collections.abc import Mapping
from typing import Any

from lowband._endpoint import Endpoint
from lowband.errors import ConfigError
from lowband.transport.group import Group

__all__ = ["init_group", "parse_address"]

log = logging.getLogger(__name__)
BACKENDS = ("zmq", "torch")
# Groups still open when the interpreter exits are closed then: a script that ends right after
# its last collective (no group.close(), as in the README's first lines) has sent its share of
# it, but the peers may not have received all of it yet; close() waits for their acks.
_open_groups: weakref.WeakSet[Group] = weakref.WeakSet()
_exit_hook_registered = False


def _close_open_groups() -> None:
    for group in list(_open_groups):
        try:
            group.close()
        except Exception as e:  # at exit: say what went wrong, never mask the exit status
            log.warning("closing group at exit: %s", e)


def _close_at_exit(group: Group) -> None:
    """Close ``group`` at interpreter exit unless it was closed before.

    atexit runs its hooks last registered first. pyzmq's garbage collector (which carries
    zero-copy sends) registers its own hook, which shuts it down, when it is imported; so it
    is imported first and this hook registered after it, to run while sends still work.
    """
    global _exit_hook_registered
    _open_groups.add(group)
    if not _exit_hook_registered:
        try:
            importlib.import_module("zmq.utils.garbage")
        except ImportError:  # no pyzmq: no zmq group either
            pass
        atexit.register(_close_open_groups)
        _exit_hook_registered = True


def parse_address(addr: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``; ConfigError if malformed
    (the rule is :class:`lowband._endpoint.Endpoint`'s)."""
    ep = Endpoint.parse(addr, "store address")
    return ep.host, ep.port


def _from_env(name: str) -> str:
    value = os.environ.get(name)
    if value is None:
        raise ConfigError(f"init_group() without {name.lower()!r} reads ${name} (as torchrun sets it); it is not set")
    return value


def init_group(
    rank: int | None = None,
    world_size: int | None = None,
    store: str | None = None,
    backend: str = "zmq",
    *,
    security: Any = None,
    peer_timeout: float = 30.0,
    on_failure: str = "raise",
    config: Mapping[str, Any] | None = None,
    group_name: str = "default",
    init_timeout: float = 300.0,
    timeout: float | None = None,
    island: Any = None,
    island_id: int | None = None,
    islands: int | None = None,
    segments: int | None = None,
    **options: Any,
) -> Group:
    """Join a group of ``world_size`` peers as ``rank``; see DESIGN.md, "The public contract".

    ``store`` is the rendezvous address ``"host:port"`` (the coordinator for
    ``backend="zmq"``, a torch ``TCPStore`` for ``backend="torch"``).
    ``config`` is checked against every peer's at the handshake. ``options`` go
    to the backend's carrier (for ZeroMQ: streams per peer, rate cap, ...).

    ``island=`` (a ``torch.distributed`` process group, e.g. ``dist.group.WORLD``) joins
    this rank's island to the other islands and returns a
    :class:`lowband.transport.islands.IslandGroup` (docs/islands.md): ``island_id`` and
    ``islands`` (else ``$LOWBAND_ISLAND``, ``$LOWBAND_ISLANDS``) and ``store`` (else
    ``$LOWBAND_COORDINATOR``) are then required, ``rank`` and ``world_size`` not taken.
    """
    if island is not None:
        from lowband.transport.islands import init_island_group

        if rank is not None or world_size is not None:
            raise ConfigError("with island=, pass island_id= and islands=, not rank/world_size")

        def join(r: int, n: int, addr: str, name: str, cfg: Mapping[str, Any]) -> Group:
            return init_group(
                r, n, addr, backend, security=security, peer_timeout=peer_timeout,
                on_failure=on_failure, config={**dict(config or {}), **cfg}, group_name=name,
                init_timeout=init_timeout, timeout=timeout, _coordinator_config=dict(cfg), **options,
            )

        return init_island_group(  # type: ignore[return-value]
            island, island_id=island_id, islands=islands, store=store, segments=segments,
            group_name=group_name, join=join, security=security, backend=backend,
        )
    if island_id is not None or islands is not None or segments is not None:
        raise ConfigError("island_id=, islands= and segments= need island=")
    env = rank is None and world_size is None and store is None
    under_torchrun = store is None and "TORCHELASTIC_RUN_ID" in os.environ
    if rank is None:
        rank = _int("RANK", _from_env("RANK"))
    if world_size is None:
        world_size = _int("WORLD_SIZE", _from_env("WORLD_SIZE"))
    if store is None:
        store = f"{_from_env('MASTER_ADDR')}:{_from_env('MASTER_PORT')}"
        if under_torchrun and backend == "zmq":
            store = _torchrun_coordinator(store, group_name, security, init_timeout)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if peer_timeout <= 0:
        raise ConfigError(f"peer_timeout must be > 0, got {peer_timeout}")
    host, port = parse_address(store)
    # an island flow's layout goes to the coordinator too (zmq): a restarted island reads it
    # there (its status of a running group), and a join with another layout is refused at once
    coordinator_config = options.pop("_coordinator_config", None)

    if backend == "torch":
        if on_failure != "raise":
            raise ConfigError(
                "backend='torch' supports on_failure='raise' only (torch.distributed cannot continue "
                "after a rank dies); use backend='zmq' for peers that come and go"
            )
        carrier = _torch_carrier(
            rank, world_size, host, port, env=env, security=security, peer_timeout=peer_timeout,
            group_name=group_name, init_timeout=init_timeout, options=options,
        )
    else:
        zmq_backend = importlib.import_module("lowband.transport._zmq")
        options.setdefault("join_timeout", init_timeout)
        if coordinator_config is not None:
            options["config"] = coordinator_config
        # a peer whose process ended is lost at once, in drop mode too: a restart of it waits
        # at the coordinator until its old incarnation is out (issue 16), so no race remains
        options.setdefault("closed_is_lost", True)
        carrier = zmq_backend.open_carrier(
            rank=rank, world_size=world_size, store=store, security=security, peer_timeout=peer_timeout,
            group_name=group_name, **options,
        )
    group = Group(carrier, on_failure=on_failure, timeout=timeout)
    try:
        # A late joiner cannot shake hands (the others are mid-run); the coordinator checked
        # its versions when it joined.
        if group.joined_at is None:
            group.verify(_handshake(backend, world_size, on_failure, config), timeout=init_timeout)
    except BaseException:
        group.close()
        raise
    log.info("rank %d/%d joined group %r over %s (store %s)", rank, world_size, group_name, backend, store)
    _close_at_exit(group)
    return group


def _torchrun_coordinator(torch_store: str, group_name: str, security: Any, timeout: float) -> str:
    """The lowband coordinator of this torchrun job: started here if no rank has yet."""
    import torch.distributed as dist

    from lowband.errors import TransportError
    from lowband.transport._coord_client import route_source
    from lowband.transport.coordinator import start_coordinator

    if security is not None:
        raise ConfigError(
            "with CURVE, start the coordinator yourself (`lowband coordinator --curve-secret ... "
            "--allow ...`) and pass init_group(store='HOST:PORT', security=...): its key must come "
            "from a file you trust, never from torchrun's store"
        )
    host, port = parse_address(torch_store)
    try:
        tcp = dist.TCPStore(
            host, port, None, False, datetime.timedelta(seconds=timeout), wait_for_workers=False
        )
    except (RuntimeError, OSError) as e:
        raise TransportError(
            f"cannot reach torchrun's TCPStore at {torch_store}: {e}{_loopback_hint(host)}"
        ) from None
    run = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    key = f"lowband/{run}/{group_name}/coordinator"
    me = f"{os.uname().nodename}:{os.getpid()}"
    # one starter per job: the first compare_set wins, every other rank waits for the address
    if tcp.compare_set(key + "/starter", "", me).decode() == me:
        bind = route_source(host, port)
        proc = start_coordinator(
            f"[{bind}]:0" if ":" in bind else f"{bind}:0",
            args=["--exit-with", str(os.getppid())],
            timeout=min(timeout, 60.0),
            detach=True,
        )
        if proc.proc.stdout is not None:
            proc.proc.stdout.close()  # it printed its address; it writes nothing more there
        log.info("started lowband coordinator at %s for torchrun job %r", proc.address, run)
        tcp.set(key, proc.address)
    try:
        tcp.wait([key], datetime.timedelta(seconds=timeout))
    except (RuntimeError, OSError) as e:
        raise TransportError(
            f"no lowband coordinator address appeared in torchrun's store within {timeout:g}s: {e}"
        ) from None
    return tcp.get(key).decode()


def _loopback_hint(host: str) -> str:
    """Why a worker on node N > 0 cannot reach MASTER_ADDR, when the reason is plain to see.

    torchrun's c10d rendezvous hands its workers rank 0's node's hostname unless ``--local_addr``
    is given; where that name resolves to a loopback address (as on hosts whose /etc/hosts maps
    it to 127.0.x.1), the workers of every other node look for the store on themselves.
    """
    import ipaddress
    import socket

    if os.environ.get("GROUP_RANK", "0") == "0":
        return ""
    try:
        addrs = {ipaddress.ip_address(a[4][0]) for a in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (OSError, ValueError):
        return ""
    if not addrs or not all(a.is_loopback for a in addrs):
        return ""
    return (
        f"; MASTER_ADDR {host!r} resolves to {', '.join(sorted(map(str, addrs)))} on this node "
        f"(node {os.environ['GROUP_RANK']}): pass torchrun --local_addr ADDRESS (an address the other "
        "nodes reach) on every node, or make the hostname resolve to it"
    )


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"${name} must be an integer, got {value!r}") from None


def _handshake(backend: str, world_size: int, on_failure: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
    from lowband._version import WIRE_VERSION, __version__

    return {
        "lowband": __version__,
        "wire_version": WIRE_VERSION,
        "backend": backend,
        "world_size": world_size,
        "on_failure": on_failure,
        "config": dict(config or {}),
    }


def _torch_carrier(
    rank: int,
    world_size: int,
    host: str,
    port: int,
    *,
    env: bool,
    security: Any,
    peer_timeout: float,
    group_name: str,
    init_timeout: float,
    options: Mapping[str, Any],
) -> Any:
    import torch.distributed as dist

    from lowband.transport import _torch

    if options:
        raise ConfigError(f"backend='torch' takes no options {sorted(options)}")
    # torch's env:// convention: rank 0 hosts the store unless torchrun's agent already does.
    is_master = env and rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    try:
        tcp = dist.TCPStore(
            host, port, world_size if is_master else None, is_master,
            datetime.timedelta(seconds=init_timeout), wait_for_workers=False,
        )
    except (RuntimeError, OSError) as e:
        from lowband.errors import TransportError

        raise TransportError(f"cannot reach the TCPStore at {host}:{port}: {e}") from None
    return _torch.open_carrier(
        rank=rank, world_size=world_size, store=tcp, store_host=host, security=security,
        peer_timeout=peer_timeout, group_name=group_name,
    )
