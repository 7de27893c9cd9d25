"""A ``DistributedDataParallel`` communication hook that compresses gradient buckets.

>>> hook = lowband.optim.ddp_comm_hook(group, "q4")        # doctest: +SKIP
>>> ddp_model.register_comm_hook(None, hook)              # doctest: +SKIP

``group`` is a ``lowband.init_group`` group (reduce-scatter/all-gather of the
codec, DESIGN.md "Data flow") or a ``torch.distributed`` process group, for which
each peer's payload is all-gathered as bytes and every peer decodes and averages
them in rank order (so results are identical on every peer).

Over a lowband group the hook returns at once a ``torch.futures.Future`` that the
group's worker completes when the bucket's collective is done, so DDP overlaps the
communication of each bucket with the rest of the backward pass; the buckets' collectives
run one after another in launch order, which DDP keeps the same on every rank. Over a
process group the hook's all-gathers run before it returns (its future is complete).

Error feedback (Seide et al. 2014; Karimireddy et al. 2019) is kept per parameter,
not per bucket index: DDP rebuilds its buckets after the first iteration (and on
``static_graph`` changes), and the residual of every parameter moves with it into
whichever bucket it lands in.
"""

import hashlib
from typing import Any

import torch
import torch.distributed as dist

from lowband._frames import join_frames, split_frames
from lowband.errors import CodecError, ConfigError
from lowband.optim._common import resolve_codec, resolve_error_feedback
from lowband.transport import CommStats

__all__ = ["DDPCommHook", "ddp_comm_hook"]


def ddp_comm_hook(
    group_or_process_group: Any, codec: Any, *, error_feedback: Any = True
) -> "DDPCommHook":
    """A hook for ``DistributedDataParallel.register_comm_hook(None, hook)``; see :class:`DDPCommHook`."""
    return DDPCommHook(group_or_process_group, codec, error_feedback=error_feedback)


class DDPCommHook:
    """Average each gradient bucket over the peers, compressed with ``codec``.

    ``stats`` counts payload bytes. Over a lowband group they are the exact counts of
    the hook's collectives (each ``Work``'s). Over a ``torch.distributed`` process
    group the hook counts each peer's payload once per other peer (what an
    all-gather delivers); torch's own length exchange and padding are not counted.
    """

    def __init__(self, group: Any, codec: Any, *, error_feedback: Any = True) -> None:
        # DDP reads a hook's ``__name__`` and ``__qualname__``, as if it were a function
        self.__name__ = self.__qualname__ = "lowband_ddp_comm_hook"
        self.codec = resolve_codec(codec)
        self.error_feedback = resolve_error_feedback(error_feedback, self.codec)
        self.group = group
        self._torch = isinstance(group, dist.ProcessGroup)
        if not self._torch and not hasattr(group, "all_reduce"):
            raise ConfigError(
                f"ddp_comm_hook needs a lowband group or a torch ProcessGroup, got {type(group).__name__}"
            )
        self._stats = CommStats()
        # id(param) -> (bucket key, start, stop): where each parameter's residual lives
        self._where: dict[int, tuple[str, int, int]] = {}

    @property
    def stats(self) -> CommStats:
        return self._stats

    # Annotations are evaluated (no ``from __future__ import annotations`` here): DDP
    # compares them with ``dist.GradBucket`` and ``Future[Tensor]`` themselves.
    def __call__(
        self, state: object, bucket: dist.GradBucket
    ) -> torch.futures.Future[torch.Tensor]:
        flat = bucket.buffer()
        key = self._key(bucket, flat)
        if self._torch:
            flat.copy_(self._all_gather_mean(flat, key).reshape(-1))
            done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
            done.set_result(flat)
            return done
        # A lowband group: the collective runs on the group's worker while DDP goes on with
        # the backward pass; the future is completed by that worker, with the averaged
        # bucket written into DDP's own buffer (in place for a CPU fp32 bucket).
        in_place = flat.device.type == "cpu" and flat.dtype == torch.float32 and flat.is_contiguous()
        work = self.group.all_reduce(
            flat,
            codec=self.codec,
            op="mean",
            error_feedback=self.error_feedback,
            key=key,
            out=flat if in_place else None,
        )
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()

        def complete(w: Any) -> None:
            self._stats.add(w.stats)
            self._stats.count_sync()
            if w._error is not None:
                fut.set_exception(w._error)  # type: ignore[arg-type]  # torch stubs type it as T
                return
            try:
                if not in_place:
                    flat.copy_(w._result.reshape(-1))
            except BaseException as e:  # handed to DDP through the future
                fut.set_exception(e)  # type: ignore[arg-type]
                return
            fut.set_result(flat)

        work.add_done_callback(complete)
        return fut

    # -- error feedback keyed by parameters ------------------------------------------

    def _key(self, bucket: dist.GradBucket, flat: torch.Tensor) -> str:
        params = bucket.parameters()
        key = "ddp." + hashlib.sha1(repr([id(p) for p in params]).encode()).hexdigest()[:16]
        ef = self.error_feedback
        if ef is None or key in ef.residuals:
            return key
        # A bucket not seen before (first iteration, or DDP rebuilt its buckets): move
        # each parameter's residual from wherever it was into the new bucket's layout.
        offsets = _offsets(bucket, flat)
        fresh = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
        for p, start in zip(params, offsets):
            old = self._where.get(id(p))
            if old is not None and old[0] in ef.residuals:
                fresh[start : start + p.numel()] = ef.residuals[old[0]][old[1] : old[2]]
        for p, start in zip(params, offsets):
            self._where[id(p)] = (key, start, start + p.numel())
        live = {k for k, _, _ in self._where.values()}
        for stale in [k for k in ef.residuals if k.startswith("ddp.") and k not in live]:
            del ef.residuals[stale]
        ef.residuals[key] = fresh
        return key

    # -- torch.distributed path ---------------------------------------------------------

    def _all_gather_mean(self, flat: torch.Tensor, key: str) -> torch.Tensor:
        world = dist.get_world_size(self.group)
        rank = dist.get_rank(self.group)
        x = flat.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
        if self.codec is None:
            out = x.clone()
            dist.all_reduce(out, group=self.group)
            for peer in range(world):
                if peer != rank:
                    self._stats.count_send(peer, out.nbytes)
                    self._stats.count_recv(peer, out.nbytes)
            return out.div_(world).to(flat.device)
        ef = self.error_feedback
        payload = ef.encode(x, key=key) if ef is not None else self.codec.encode(x)
        blob = _pack(payload.to_frames())
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([blob.numel()], dtype=torch.int64), group=self.group)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: blob.numel()] = blob
        gathered = [torch.empty(longest, dtype=torch.uint8) for _ in range(world)]
        dist.all_gather(gathered, padded, group=self.group)
        from lowband.compress import Payload

        payloads = []
        for peer, (data, size) in enumerate(zip(gathered, sizes)):
            p = Payload.from_frames(
                _unpack(data[: int(size.item())]), codec=self.codec, max_bytes=blob.numel() * 4 + (1 << 20)
            )
            if p.numel != x.numel():
                raise CodecError(f"peer {peer} sent {p.numel} values for a bucket of {x.numel()}")
            payloads.append(p)
            if peer != rank:
                self._stats.count_send(peer, payload.nbytes)
                self._stats.count_recv(peer, p.nbytes)
        out = torch.zeros(x.numel(), dtype=torch.float32)
        for p in payloads:  # rank order: identical bits on every peer
            self.codec.decode_into(p, out, accumulate=True)
        self._stats.count_sync()
        return out.div_(world).to(flat.device)


def _offsets(bucket: dist.GradBucket, flat: torch.Tensor) -> list[int]:
    """Start of each parameter's gradient inside the bucket's flat buffer."""
    grads = bucket.gradients()
    size = flat.element_size()
    offsets = [(g.data_ptr() - flat.data_ptr()) // size for g in grads]
    params = bucket.parameters()
    if any(o < 0 or o + p.numel() > flat.numel() for o, p in zip(offsets, params)):
        raise ConfigError(
            "DDP bucket gradients are not views of its buffer; cannot key error feedback"
        )
    return offsets


def _pack(frames: list[Any]) -> torch.Tensor:
    """Frames as one uint8 tensor: count, lengths (int64 each), then the bytes."""
    return torch.frombuffer(bytearray(join_frames(frames)), dtype=torch.uint8)


def _unpack(data: torch.Tensor) -> list[bytes]:
    return split_frames(data.numpy().tobytes(), what="gradient payload from a peer", max_frames=64)
