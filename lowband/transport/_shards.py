"""Map an island's shards onto the canonical layout of the whole model, and back.

Inside an island (docs/islands.md) a parameter is either sharded along dim 0
(FSDP2: a ``DTensor`` with ``Shard(0)``, or ``Replicate`` on some mesh dims as in
HSDP) or replicated on every rank (DDP, or a plain model in an island of one). The
outer reduction between islands runs over a canonical layout that no island's
sharding changes: the flat concatenation of the full trainable parameters in optimizer
order; a streaming fragment is a run of whole parameters (``split_fragments``); each
fragment is cut into ``segments`` contiguous segments and each segment into buckets of
at most ``bucket_bytes`` (or, with ``cut="params"``, into ``segments`` runs of whole
parameters, for optimizers whose state follows a parameter's shape, as DeMo's DCT tiles
do). Segment ``s`` belongs to local rank ``s * L // segments`` of an
island of ``L`` ranks (``IslandGroup.owner``), which reduces it over that segment's WAN
flow.

:meth:`ShardPlan.gather` is a collective of the island: every rank sends the pieces of
its local shards that lie in buckets owned by another rank (point-to-point, packed into
one message per pair of ranks), and each owner gets its buckets as flat fp32 tensors.
:meth:`ShardPlan.scatter` is its inverse: each owner sends new values to every rank that
holds a piece of its buckets. With replicated parameters an owner already holds its
buckets and only the scatter moves data (as DDP's all-gather would).

Moving values never changes them (fp32 holds bf16 and fp16 exactly), so the outer step
of a bucket sees the same bits whatever the island's shape.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lowband.errors import ConfigError
from lowband.transport._start import agree_on_start
from lowband.transport._stats import CommStats

__all__ = ["CanonBucket", "ShardPlan", "agree_on_start_islands", "island_admits", "is_island_group"]

logger = logging.getLogger(__name__)


def is_island_group(group: Any) -> bool:
    return hasattr(group, "flows") and hasattr(group, "island")


@dataclass(frozen=True)
class CanonBucket:
    """A contiguous range ``[start, stop)`` of the canonical flat model, owned by this rank.

    ``index`` is its position among this rank's buckets; ``key`` its canonical number,
    the same on every island (error feedback and the wire use it).
    """

    index: int
    key: int
    fragment: int
    segment: int
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class _Piece:
    """Elements ``[lo, hi)`` of parameter ``param`` (its flat, full index) at ``offset`` of a bucket."""

    param: int
    lo: int
    hi: int
    bucket: int  # the canonical key
    offset: int


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def _held_range(p: Any) -> tuple[int, int]:
    """The flat range of the full parameter that this rank's local tensor holds."""
    if not _is_dtensor(p):
        return 0, p.numel()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if tuple(shape[1:]) != tuple(p.shape[1:]) or any(o != 0 for o in offset[1:]):
        raise ConfigError(
            f"a DTensor parameter of shape {tuple(p.shape)} with placements {p.placements} is "
            "sharded along a dim other than 0: islands support Shard(0) (FSDP2) and Replicate"
        )
    row = p[0].numel() if p.dim() > 0 else 1
    lo = offset[0] * row if p.dim() > 0 else 0
    return lo, lo + (shape[0] * row if p.dim() > 0 else 1)


class ShardPlan:
    """The canonical buckets of ``params`` and the island traffic that maps shards onto them.

    Collective at construction (one small all-gather of the held ranges in the island).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        group: Any,
        *,
        bucket_bytes: int,
        runs: Sequence[int] | None = None,
        cut: str = "even",
    ) -> None:
        """``runs``: the number of parameters of each streaming fragment (default: one
        fragment of all); ``cut``: ``"even"`` (segments of equal size) or ``"params"``."""
        if bucket_bytes < 4:
            raise ConfigError(f"bucket_bytes must be >= 4, got {bucket_bytes}")
        self.params = list(params)
        self.group = group
        self.pg = group.island
        self.me = group.local_rank
        L = group.local_size
        numels = [p.numel() for p in self.params]
        self.shapes = [list(p.shape) for p in self.params]
        offsets = [0]
        for n in numels:
            offsets.append(offsets[-1] + n)
        self.offsets = offsets
        mine = [_held_range(p) for p in self.params]
        for p, (lo, hi) in zip(self.params, mine):
            local = p.to_local() if _is_dtensor(p) else p  # type: ignore[attr-defined]
            if local.numel() != hi - lo:
                raise ConfigError(f"a local shard holds {local.numel()} values, its range {hi - lo}")
        held: list[Any] = [None] * L
        dist.all_gather_object(held, mine, group=self.pg)
        self.held: list[list[tuple[int, int]]] = [[tuple(r) for r in h] for h in held]  # [rank][param]
        backend = dist.get_backend(self.pg)
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        )

        # canonical buckets: fragment -> segment -> buckets of at most bucket_bytes
        limit = bucket_bytes // 4
        self.all_buckets: list[list[tuple[int, int, int, int]]] = []  # [fragment] (key, segment, start, stop)
        key = 0
        if cut not in ("even", "params"):
            raise ConfigError(f"cut must be 'even' or 'params', got {cut!r}")
        runs = [len(self.params)] if runs is None else list(runs)
        if sum(runs) != len(self.params) or min(runs) < 1:
            raise ConfigError(f"fragment runs {runs} do not cover {len(self.params)} parameters")
        first = 0
        for count_ in runs:
            i0, i1 = first, first + count_
            first = i1
            f0, f1 = offsets[i0], offsets[i1]
            n = f1 - f0
            frag = []
            for s in range(group.segments):
                if cut == "even":
                    a, b = f0 + n * s // group.segments, f0 + n * (s + 1) // group.segments
                else:
                    a, b = (offsets[i0 + j] for j in _param_cut(numels[i0:i1], group.segments, s))
                count = -(-(b - a) // limit) if cut == "even" else int(b > a)
                for j in range(count):
                    lo, hi = a + (b - a) * j // count, a + (b - a) * (j + 1) // count
                    frag.append((key, s, lo, hi))
                    key += 1
            self.all_buckets.append(frag)
        self.owned: list[list[CanonBucket]] = []
        pos = 0
        for f, frag in enumerate(self.all_buckets):
            run_ = []
            for k, s, lo, hi in frag:
                if group.owner(s) == self.me:
                    run_.append(CanonBucket(pos, k, f, s, lo, hi))
                    pos += 1
            self.owned.append(run_)
        self.buckets = [b for run in self.owned for b in run]
        self._route_cache: dict[int, list[tuple[Any, ...]]] = {}

    # -- the layout ------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What every island must agree on (checked at the handshake and in checkpoints)."""
        return {
            "shapes": self.shapes,
            "segments": self.group.segments,
            "buckets": [[[k, s, lo, hi] for k, s, lo, hi in frag] for frag in self.all_buckets],
        }

    def flow(self, bucket: CanonBucket) -> Any:
        return self.group.flows[bucket.segment]

    def _pieces(self, start: int, stop: int, key: int) -> list[_Piece]:
        out = []
        i = bisect.bisect_right(self.offsets, start) - 1  # the parameter holding `start`
        while i < len(self.params) and self.offsets[i] < stop:
            a, b = max(start, self.offsets[i]), min(stop, self.offsets[i + 1])
            if a < b:
                base = self.offsets[i]
                out.append(_Piece(i, a - base, b - base, key, a - start))
            i += 1
        return out

    def _local(self, i: int, *, grads: bool, create: bool = False) -> torch.Tensor | None:
        p = self.params[i]
        t = p.grad if grads else p
        if t is None:
            if not create:
                return None
            p.grad = torch.zeros_like(p)
            t = p.grad
        local = t.to_local() if _is_dtensor(t) else t  # type: ignore[attr-defined]
        local = local.detach()
        if not local.is_contiguous():
            raise ConfigError("a local shard is not contiguous; islands need contiguous shards")
        return local.view(-1)

    def _routes(self, fragment: int) -> list[tuple[Any, ...]]:
        """``(piece, owner, holders...)``: each piece of the fragment's buckets split so
        that one rank holds all of it; the owner is listed with every rank that holds it.
        Computed once per fragment (the layout never changes)."""
        if fragment in self._route_cache:
            return self._route_cache[fragment]
        routes: list[tuple[Any, ...]] = []
        for k, s, lo, hi in self.all_buckets[fragment]:
            owner = self.group.owner(s)
            for piece in self._pieces(lo, hi, k):
                # cut the piece at every holder boundary, so each part has one set of holders
                cuts = {piece.lo, piece.hi}
                for r in range(len(self.held)):
                    h0, h1 = self.held[r][piece.param]
                    cuts.update(c for c in (h0, h1) if piece.lo < c < piece.hi)
                edges = sorted(cuts)
                for a, b in zip(edges, edges[1:]):
                    holders = [r for r in range(len(self.held))
                               if self.held[r][piece.param][0] <= a and b <= self.held[r][piece.param][1]]
                    if not holders:
                        raise ConfigError(f"no rank of the island holds values {a}..{b} of parameter {piece.param}")
                    part = _Piece(piece.param, a, b, k, piece.offset + a - piece.lo)
                    routes.append((part, owner, *holders))
        self._route_cache[fragment] = routes
        return routes

    # -- collectives of the island ------------------------------------------------------

    def _exchange(
        self, sends: dict[int, list[torch.Tensor]], recvs: dict[int, int]
    ) -> dict[int, torch.Tensor]:
        """Point-to-point within the island: one packed fp32 message per pair and direction."""
        works: list[Any] = []
        got: dict[int, torch.Tensor] = {}
        for peer in sorted(set(sends) | set(recvs)):
            dst = dist.get_global_rank(self.pg, peer)
            # the lower rank sends first: both orders are posted as non-blocking anyway
            if peer in sends:
                buf = torch.cat([t.to(device=self.device, dtype=torch.float32) for t in sends[peer]])
                works.append(dist.isend(buf, dst, group=self.pg))
            if peer in recvs:
                got[peer] = torch.empty(recvs[peer], dtype=torch.float32, device=self.device)
                works.append(dist.irecv(got[peer], dst, group=self.pg))
        for w in works:
            w.wait()
        return got

    def gather(self, fragment: int, *, grads: bool = False) -> list[torch.Tensor]:
        """Collective: this rank's buckets of ``fragment`` as fresh flat fp32 CPU tensors,
        filled with the island's values (or gradients: a missing one counts as zeros)."""
        outs = {b.key: torch.zeros(b.numel, dtype=torch.float32) for b in self.owned[fragment]}
        sends: dict[int, list[torch.Tensor]] = {}
        recvs: dict[int, int] = {}
        incoming: dict[int, list[_Piece]] = {}
        for piece, owner, *holders in self._routes(fragment):
            src = owner if owner in holders else holders[0]
            n = piece.hi - piece.lo
            if src == self.me:
                local = self._local(piece.param, grads=grads)
                h0 = self.held[self.me][piece.param][0]
                if owner == self.me:
                    if local is not None:
                        outs[piece.bucket][piece.offset : piece.offset + n].copy_(
                            local[piece.lo - h0 : piece.hi - h0]
                        )
                else:
                    values = (
                        local[piece.lo - h0 : piece.hi - h0]
                        if local is not None
                        else torch.zeros(n, dtype=torch.float32)
                    )
                    sends.setdefault(owner, []).append(values)
            elif owner == self.me:
                recvs[src] = recvs.get(src, 0) + n
                incoming.setdefault(src, []).append(piece)
        got = self._exchange(sends, recvs)
        for src, pieces in incoming.items():
            buf, at = got[src].cpu(), 0
            for piece in pieces:
                n = piece.hi - piece.lo
                outs[piece.bucket][piece.offset : piece.offset + n].copy_(buf[at : at + n])
                at += n
        return [outs[b.key] for b in self.owned[fragment]]

    def scatter(
        self,
        fragment: int,
        values: Sequence[torch.Tensor],
        *,
        grads: bool = False,
        weight: float | None = None,
    ) -> None:
        """Collective: write this rank's buckets of ``fragment`` (``values``, in order) into
        every holder's local tensors: a copy, or ``local.lerp_(new, weight)`` with ``weight``."""
        by_key = {b.key: v.reshape(-1) for b, v in zip(self.owned[fragment], values)}
        sends: dict[int, list[torch.Tensor]] = {}
        recvs: dict[int, int] = {}
        incoming: dict[int, list[_Piece]] = {}
        writes: list[tuple[_Piece, torch.Tensor]] = []
        for piece, owner, *holders in self._routes(fragment):
            n = piece.hi - piece.lo
            if owner == self.me:
                src = by_key[piece.bucket][piece.offset : piece.offset + n]
                for r in sorted(set(holders)):
                    if r == self.me:
                        writes.append((piece, src))
                    else:
                        sends.setdefault(r, []).append(src)
            elif self.me in holders:
                recvs[owner] = recvs.get(owner, 0) + n
                incoming.setdefault(owner, []).append(piece)
        got = self._exchange(sends, recvs)
        for owner, pieces in incoming.items():
            at = 0
            for piece in pieces:
                n = piece.hi - piece.lo
                writes.append((piece, got[owner][at : at + n]))
                at += n
        for piece, src in writes:
            local = self._local(piece.param, grads=grads, create=grads)
            assert local is not None
            h0 = self.held[self.me][piece.param][0]
            dst = local[piece.lo - h0 : piece.hi - h0]
            new = src.to(device=dst.device, dtype=dst.dtype)
            if weight is None:
                dst.copy_(new)
            else:
                dst.lerp_(new, weight)

    # -- this rank's own shards (checkpoints) -----------------------------------------

    def local_copies(self) -> list[torch.Tensor]:
        """This rank's local shards as fp32 copies (exact for bf16 and fp16)."""
        return [t.clone().float().cpu() for t in (self._local(i, grads=False) for i in range(len(self.params)))]  # type: ignore[union-attr]

    def load_local(self, saved: Sequence[torch.Tensor]) -> None:
        if len(saved) != len(self.params):
            raise ConfigError(f"checkpoint holds {len(saved)} local shards, this rank has {len(self.params)}")
        for i, s in enumerate(saved):
            local = self._local(i, grads=False)
            assert local is not None
            if s.numel() != local.numel():
                raise ConfigError(
                    f"checkpoint's shard of parameter {i} has {s.numel()} values, this rank holds "
                    f"{local.numel()}: resume with the same island shape"
                )
            local.copy_(s.reshape(-1).to(device=local.device, dtype=local.dtype))


def _param_cut(numels: Sequence[int], segments: int, s: int) -> tuple[int, int]:
    """Segment ``s`` of ``segments`` as parameter positions ``[j0, j1)``: whole parameters,
    each starting where the running total of elements first reaches ``s / segments``."""
    total = sum(numels)
    starts = []
    acc = 0
    for n in numels:
        starts.append(acc)
        acc += n
    def first_at(k: int) -> int:
        if k == 0:
            return 0
        if k == segments:
            return len(numels)
        return next((j for j, a in enumerate(starts) if a * segments >= total * k), len(numels))
    return first_at(s), first_at(s + 1)


def agree_on_start_islands(
    group: Any, config: dict[str, Any], plans: Sequence[tuple[ShardPlan, list[torch.Tensor]]],
    *, stats: CommStats | None = None,
) -> bool:
    """Collective of every rank of every island: check ``config`` on each of this rank's
    flows, compare a digest of each owned segment with island 0's, take island 0's values
    where they differ (:func:`lowband.transport.agree_on_start` per flow), and write them
    into the island's shards. ``plans`` pairs each plan with this rank's gathered buckets
    (in ``plan.buckets`` order; updated in place). With ``stats``, the flows' collectives
    are counted in it. Returns whether any value changed (on every rank of the island alike)."""
    changed = False
    if group.islands > 1:
        for s in sorted(group.flows):
            mine = [v for plan, values in plans for b, v in zip(plan.buckets, values) if b.segment == s]
            if agree_on_start(group.flows[s], config, mine, stats=stats):
                logger.info("segment %d differed between islands: took island 0's values", s)
                changed = True
    flag_t = torch.tensor([1.0 if changed else 0.0], device=plans[0][0].device)
    dist.all_reduce(flag_t, op=dist.ReduceOp.MAX, group=group.island)
    if float(flag_t[0]) == 0:
        return False
    with torch.no_grad():
        for plan, values in plans:
            for f in range(len(plan.owned)):
                first = plan.owned[f][0].index if plan.owned[f] else 0
                plan.scatter(f, values[first : first + len(plan.owned[f])])
    return True


def island_admits(group: Any, works: Sequence[Any]) -> bool:
    """Collective of the island, after a sync's ``works`` (one per canonical bucket, on the
    buckets' flows) finished: whether to admit the islands waiting to join now, the same
    answer on every rank of every live island. Yes when some island waits and every island
    that waits did so on every bucket's flow (so it waits on all flows: a restarted island
    asks for each of its flows at once, and admitted on some only it would stall the rest)."""
    if group.on_failure != "drop":
        return False  # a raise-mode group never changes
    counts = torch.zeros(group.islands + 1, dtype=torch.float64)
    counts[0] = len(works)
    for w in works:
        for j in getattr(w, "waiting", ()):
            counts[1 + int(j)] += 1
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group.island)
    seen = counts[1:]
    return bool((seen > 0).any()) and bool(((seen == 0) | (seen == counts[0])).all())
