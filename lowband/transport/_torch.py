"""``backend="torch"``: the Carrier over torch.distributed point-to-point (gloo).

For peers inside one datacenter, where torch's own transport is the natural
choice. Rendezvous goes through torch's real ``TCPStore`` (hosted by torchrun's
agent, by ``lowband coordinator`` or by :func:`lowband.testing.start_store`),
under a per-group ``PrefixStore`` so several groups can share one store.

The collectives stay the ones in ``_collectives.py``: this module only moves
messages. Each message is a run of gloo sends on one tag, which gloo delivers in
order per peer: a fixed header ``int64[5 + 64] = (epoch, seq, phase, n_frames,
payload_bytes, frame lengths...)`` then one ``uint8`` tensor per non-empty frame,
sent without a copy when the frame is writable (payload buffers are). A receiver
reads messages from a peer in order and buffers the ones for other keys. Payload
bytes are always staged on the CPU, so the same code serves CPU and CUDA tensors;
collectives on CUDA tensors return their results on the tensor's device (the
bytes cross gloo, not nccl).

torch.distributed cannot continue after a rank dies, so this backend supports
``on_failure="raise"`` only: a closed connection raises ``PeerLost`` naming the
peer. Use ``backend="zmq"`` for peers that come and go.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lowband._frames import check_lengths
from lowband.errors import CollectiveTimeout, ConfigError, PeerLost, TransportError
from lowband.transport._carrier import Frame, Key
from lowband.transport._stats import CommStats

__all__ = ["TorchCarrier", "open_carrier"]

log = logging.getLogger(__name__)
_HEAD = 5  # epoch, seq, phase, n_frames, payload_bytes; then MAX_FRAMES frame lengths
_TAG = 0
#: Largest message a peer may announce (frames plus lengths), 16 GiB.
MAX_MESSAGE_BYTES = 1 << 34
MAX_FRAMES = 64
#: At close, how long queued sends may take to reach live peers.
CLOSE_FLUSH_SECONDS = 3.0


class TorchCarrier:
    """Carrier over a gloo ``ProcessGroup`` of its own (not torch's default group)."""

    def __init__(
        self, store: dist.Store, *, rank: int, world_size: int, peer_timeout: float, local_host: str | None = None
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.stats = CommStats()
        self.peer_timeout = peer_timeout
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = datetime.timedelta(seconds=peer_timeout)
        if local_host is not None:
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host)]
        else:
            opts._devices = [dist.ProcessGroupGloo.create_default_device()]
        self.pg = dist.ProcessGroupGloo(store, rank, world_size, opts)
        self._pending: list[tuple[Any, int, torch.Tensor]] = []
        self._inbox: dict[tuple[int, Key], tuple[int, list[Frame]]] = {}
        self._floor = 0
        self._lost: set[int] = set()
        self._lock = threading.Lock()
        self._closed = False

    def send(self, peer: int, key: Key, frames: Sequence[Frame], *, payload_bytes: int) -> None:
        self._check(peer)
        if peer in self._lost:
            raise PeerLost(f"peer {peer} was lost", peers=(peer,))
        if len(frames) > MAX_FRAMES:
            raise TransportError(f"a message has at most {MAX_FRAMES} frames, got {len(frames)}")
        tensors = [_as_tensor(f) for f in frames]
        head = torch.zeros(_HEAD + MAX_FRAMES, dtype=torch.int64)
        head[:_HEAD] = torch.tensor([*key, len(tensors), payload_bytes], dtype=torch.int64)
        head[_HEAD : _HEAD + len(tensors)] = torch.tensor([t.numel() for t in tensors], dtype=torch.int64)
        with self._lock:
            self._reap()
            try:
                self._pending.append((self.pg.send([head], peer, _TAG), peer, head))
                for t in tensors:
                    if t.numel():
                        self._pending.append((self.pg.send([t], peer, _TAG), peer, t))
            except RuntimeError as e:
                self._lost.add(peer)
                raise PeerLost(f"peer {peer}: {e}", peers=(peer,)) from None
        self.stats.count_send(peer, payload_bytes, head.nbytes + sum(t.numel() for t in tensors))

    def _reap(self) -> None:
        self._pending = [p for p in self._pending if not p[0].is_completed()]

    def recv(self, peer: int, key: Key, *, timeout: float | None = None) -> list[Frame]:
        self._check(peer)
        while True:
            got = self._inbox.pop((peer, key), None)
            if got is not None:
                payload_bytes, frames = got
                return frames
            if peer in self._lost:
                raise PeerLost(f"peer {peer} was lost", peers=(peer,))
            k, payload_bytes, frames = self._read(peer, timeout)
            if k[0] < self._floor:
                continue
            self._inbox[(peer, k)] = (payload_bytes, frames)

    def _wait(self, work: Any, peer: int, timeout: float | None) -> None:
        try:
            if timeout is None:
                work.wait()
            else:
                work.wait(datetime.timedelta(seconds=timeout))
        except RuntimeError as e:
            self._lost.add(peer)
            if "imeout" in str(e) or "imed out" in str(e):
                raise CollectiveTimeout(f"no message from peer {peer} in time: {e}") from None
            raise PeerLost(f"peer {peer}: {e}", peers=(peer,)) from None

    def _read(self, peer: int, timeout: float | None) -> tuple[Key, int, list[Frame]]:
        head = torch.empty(_HEAD + MAX_FRAMES, dtype=torch.int64)
        self._wait(self.pg.recv([head], peer, _TAG), peer, timeout)
        values = head.tolist()
        epoch, seq, phase, nframes, payload_bytes = values[:_HEAD]
        lengths = values[_HEAD : _HEAD + max(0, min(nframes, MAX_FRAMES))]

        def bad(why: str) -> TransportError:
            self._lost.add(peer)
            return TransportError(f"peer {peer} sent a malformed header {values[:_HEAD]}: {why}")

        if not 0 <= nframes <= MAX_FRAMES or payload_bytes < 0:
            raise bad(f"{nframes} frames, {payload_bytes} payload bytes")
        check_lengths(lengths, what="message", max_frames=MAX_FRAMES, max_bytes=MAX_MESSAGE_BYTES, error=bad)
        frames: list[Frame] = []
        for n in lengths:
            t = torch.empty(n, dtype=torch.uint8)
            if n:
                self._wait(self.pg.recv([t], peer, _TAG), peer, timeout)
            frames.append(memoryview(t.numpy()))
        self.stats.count_recv(peer, payload_bytes, head.nbytes + sum(lengths))
        return (epoch, seq, phase), payload_bytes, frames

    def commit(self, key: Key, alive: Sequence[int], *, admit: bool = False) -> tuple[int, ...]:
        missing = set(range(self.world_size)) - set(alive)
        if missing:
            raise PeerLost(f"backend='torch' cannot continue without ranks {sorted(missing)}", peers=tuple(missing))
        return tuple(range(self.world_size))

    def forget(self, epoch: int) -> None:
        self._floor = max(self._floor, epoch)
        for k in [k for k in self._inbox if k[1][0] < epoch]:
            del self._inbox[k]

    def alive(self) -> set[int]:
        return set(range(self.world_size)) - self._lost

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Let queued sends reach live peers (one may still be reading them), for a bounded time.
        deadline = time.monotonic() + min(self.peer_timeout, CLOSE_FLUSH_SECONDS)
        with self._lock:
            for work, peer, _ in self._pending:
                left = deadline - time.monotonic()
                if peer in self._lost or left <= 0:
                    continue
                try:
                    work.wait(datetime.timedelta(seconds=left))
                except RuntimeError:
                    self._lost.add(peer)  # that peer is gone; nothing more to deliver
            self._pending.clear()
        self._inbox.clear()

    def _check(self, peer: int) -> None:
        if self._closed:
            raise TransportError("the carrier is closed")
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise ConfigError(f"peer {peer} is not another rank of a group of {self.world_size}")


def _as_tensor(frame: Frame) -> torch.Tensor:
    """A uint8 tensor over the frame's bytes: zero-copy when writable, else a copy."""
    mv = memoryview(frame).cast("B")
    if mv.readonly:
        return torch.from_numpy(np.frombuffer(mv, dtype=np.uint8).copy())
    return torch.from_numpy(np.frombuffer(mv, dtype=np.uint8))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def open_carrier(
    *,
    rank: int,
    world_size: int,
    store: dist.Store,
    store_host: str,
    security: object | None = None,
    peer_timeout: float = 30.0,
    group_name: str = "default",
) -> TorchCarrier:
    """A TorchCarrier on ``store`` (already connected), namespaced by ``group_name``."""
    if security is not None:
        raise ConfigError("backend='torch' has no CURVE security; use backend='zmq' for untrusted networks")
    prefixed = dist.PrefixStore(f"lowband/{group_name}/", store)
    local = "127.0.0.1" if _is_loopback(store_host) else None
    return TorchCarrier(prefixed, rank=rank, world_size=world_size, peer_timeout=peer_timeout, local_host=local)


def serve_store(host: str, port: int = 0, *, timeout: float = 3600.0) -> tuple[Any, int]:
    """A torch ``TCPStore`` server listening on ``host`` only: ``(store, port)``.

    torch's own server listens on every interface whatever ``host`` says; here the
    listening socket is bound to ``host`` first and handed over (``master_listen_fd``)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(512)
    except OSError as e:
        sock.close()
        raise TransportError(f"cannot bind a TCPStore to {host}:{port}: {e}") from None
    bound = int(sock.getsockname()[1])
    store = dist.TCPStore(
        host.strip("[]"), bound, None, True, datetime.timedelta(seconds=timeout),
        wait_for_workers=False, master_listen_fd=sock.detach(),
    )
    return store, bound
