"""``backend="torch"``: the Carrier over torch.distributed point-to-point (gloo).

For peers inside one datacenter, where torch's own transport is the natural
choice. Rendezvous goes through torch's real ``TCPStore`` (hosted by torchrun's
agent, by ``lowband coordinator`` or by :func:`lowband.testing.start_store`),
under a per-group ``PrefixStore`` so several groups can share one store.

The collectives stay the ones in ``_collectives.py``: this module only moves
messages. Each message is two gloo sends on the same tag, which gloo delivers in
order per peer: a fixed header ``int64[6] = (epoch, seq, phase, n_frames,
data_bytes, payload_bytes)`` and one ``uint8`` buffer holding the frame lengths
(``int64`` each) followed by the frames. A receiver reads messages from a peer in
order and buffers the ones for other keys. Payload bytes are always staged on the
CPU, so the same code serves CPU and CUDA tensors; collectives on CUDA tensors
return their results on the tensor's device (the bytes cross gloo, not nccl).

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

from lowband.errors import CollectiveTimeout, ConfigError, PeerLost, TransportError
from lowband.transport._carrier import Frame, Key
from lowband.transport._stats import CommStats

__all__ = ["TorchCarrier", "open_carrier"]

log = logging.getLogger(__name__)
_HEAD = 6
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
        self._pending: list[tuple[Any, int, torch.Tensor, torch.Tensor]] = []
        self._inbox: dict[tuple[int, Key], tuple[int, list[Frame]]] = {}
        self._floor = 0
        self._lost: set[int] = set()
        self._lock = threading.Lock()
        self._closed = False

    def send(self, peer: int, key: Key, frames: Sequence[Frame], *, payload_bytes: int) -> None:
        self._check(peer)
        if peer in self._lost:
            raise PeerLost(f"peer {peer} was lost", peers=(peer,))
        views = [np.frombuffer(f, dtype=np.uint8) for f in frames]
        lengths = [v.size for v in views]
        data = torch.empty(8 * len(lengths) + sum(lengths), dtype=torch.uint8)
        raw = data.numpy()
        raw[: 8 * len(lengths)] = np.asarray(lengths, dtype="<i8").view(np.uint8)
        off = 8 * len(lengths)
        for v in views:
            raw[off : off + v.size] = v
            off += v.size
        head = torch.tensor([*key, len(lengths), data.numel(), payload_bytes], dtype=torch.int64)
        with self._lock:
            self._reap()
            try:
                w1 = self.pg.send([head], peer, _TAG)
                w2 = self.pg.send([data], peer, _TAG) if data.numel() else None
            except RuntimeError as e:
                self._lost.add(peer)
                raise PeerLost(f"peer {peer}: {e}", peers=(peer,)) from None
            self._pending.append((w1, peer, head, data))
            if w2 is not None:
                self._pending.append((w2, peer, head, data))
        self.stats.count_send(peer, payload_bytes, 8 * _HEAD + data.numel())

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
        head = torch.empty(_HEAD, dtype=torch.int64)
        self._wait(self.pg.recv([head], peer, _TAG), peer, timeout)
        epoch, seq, phase, nframes, nbytes, payload_bytes = (int(v) for v in head.tolist())
        if not (0 <= nframes <= MAX_FRAMES and 8 * nframes <= nbytes <= MAX_MESSAGE_BYTES and payload_bytes >= 0):
            self._lost.add(peer)
            raise TransportError(f"peer {peer} sent a malformed header {head.tolist()}")
        data = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            self._wait(self.pg.recv([data], peer, _TAG), peer, timeout)
        lengths = data[: 8 * nframes].view(torch.int64).tolist() if nframes else []
        if any(n < 0 for n in lengths) or 8 * nframes + sum(lengths) != nbytes:
            self._lost.add(peer)
            raise TransportError(f"peer {peer} sent frame lengths {lengths} that do not add up to {nbytes}")
        view = memoryview(data.numpy())
        frames: list[Frame] = []
        off = 8 * nframes
        for n in lengths:
            frames.append(view[off : off + n])
            off += n
        self.stats.count_recv(peer, payload_bytes, 8 * _HEAD + nbytes)
        return (epoch, seq, phase), payload_bytes, frames

    def commit(self, key: Key, alive: Sequence[int]) -> tuple[int, ...]:
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
            for work, peer, _, _ in self._pending:
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
