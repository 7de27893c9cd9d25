"""Islands: a fast cluster (one ``torch.distributed`` process group) inside, lowband between.

An *island* is a node or cluster whose ranks train one replica together over a fast
interconnect (FSDP2, DDP, HSDP over NCCL; gloo on CPU). Islands are joined by internet
links. ``lowband.init_group(island=dist.group.WORLD)`` returns an :class:`IslandGroup`.

The outer reduction runs over a *canonical layout* of the whole model that does not
depend on how any island shards it: the flat concatenation of the full trainable
parameters in optimizer order, cut into ``segments`` contiguous segments (default: the
least common multiple of the island sizes). In an island of ``L`` ranks, local rank
``r`` owns segments ``s`` with ``s * L // segments == r``. Each segment has its own WAN
group (a *flow*): one member per island, the owner of that segment there, ranked by
island id. Same-shaped islands of ``L`` ranks therefore use ``L`` flows, local rank ``i``
with local rank ``i`` of every other island (as INTELLECT-1 did); an island of 1 beside
islands of 2 takes part in both flows from its one rank. Because every flow reduces the
same canonical segment with the same members in the same order, the result does not
depend on the island shapes (docs/islands.md).

The optimizers map each rank's shards onto the canonical segments with
``lowband.transport._shards``; this module only builds the groups.

A restarted island (torchrun restarts all its ranks; issue 16's join path): its leader
finds the run going (the coordinator's status of segment 0's flow names the island
sizes and segments in its config), so the island skips the directory, and every rank
asks to join all its flows at once (one thread each: an island of 1 beside islands of
2 is admitted on both flows at the same boundary). The members admit it after a sync
on which every flow saw it waiting, and each flow's member sends that segment's state
(DiLoCo: ``optim/diloco.py``).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from typing import Any

from lowband.errors import ConfigError
from lowband.transport._stats import CommStats
from lowband.transport.group import Group

__all__ = ["IslandGroup", "init_island_group", "segment_owner"]

log = logging.getLogger(__name__)

#: More segments than this means many WAN groups per rank: ask for ``segments=`` then.
MAX_SEGMENTS = 64

ENV_ISLAND = "LOWBAND_ISLAND"
ENV_ISLANDS = "LOWBAND_ISLANDS"
ENV_COORDINATOR = "LOWBAND_COORDINATOR"


def segment_owner(segment: int, island_size: int, segments: int) -> int:
    """The local rank that owns canonical ``segment`` in an island of ``island_size`` ranks."""
    return segment * island_size // segments


class IslandGroup:
    """This rank's place among the islands, and the WAN groups (flows) it takes part in.

    Attributes:
        island: the ``torch.distributed`` process group of this rank's island.
        island_id, islands: this island's id and the number of islands.
        sizes: the number of ranks of every island, by island id.
        local_rank, local_size: this rank in its island.
        segments: the number of canonical segments.
        flows: ``{segment: Group}`` for the segments this rank owns; each Group has one
            member per island (rank = island id).
    """

    def __init__(
        self,
        *,
        island: Any,
        island_id: int,
        sizes: tuple[int, ...],
        local_rank: int,
        segments: int,
        flows: dict[int, Group],
    ) -> None:
        self.island = island
        self.island_id = island_id
        self.sizes = sizes
        self.islands = len(sizes)
        self.local_rank = local_rank
        self.local_size = sizes[island_id]
        self.segments = segments
        self.flows = flows

    # GroupLike's rank/world_size: this rank's island among the islands
    @property
    def rank(self) -> int:
        return self.island_id

    @property
    def world_size(self) -> int:
        return self.islands

    @property
    def on_failure(self) -> str:
        return next(iter(self.flows.values())).on_failure

    def owner(self, segment: int, island_id: int | None = None) -> int:
        """The local rank owning ``segment`` in island ``island_id`` (default: this one)."""
        size = self.sizes[self.island_id if island_id is None else island_id]
        return segment_owner(segment, size, self.segments)

    def owned(self) -> list[int]:
        """The canonical segments this rank owns, in order."""
        return [s for s in range(self.segments) if self.owner(s) == self.local_rank]

    @property
    def island_flows(self) -> int:
        """WAN flows of this whole island: one per segment, whichever rank owns it."""
        return self.segments

    @property
    def stats(self) -> CommStats:
        """The sum of this rank's flows; ``per_peer`` is keyed by island id; ``flows`` counts them."""
        out = CommStats()
        for g in self.flows.values():
            out.add(g.stats)
        out.flows = len(self.flows)
        return out

    def close(self) -> None:
        for g in self.flows.values():
            g.close()

    @property
    def joined_at(self) -> tuple[int, int, int] | None:
        """For an island that entered a running run (a restart): the latest commit key that
        admitted one of this rank's flows; ``None`` at a first start."""
        keys = [getattr(g, "joined_at", None) for g in self.flows.values()]
        return None if any(k is None for k in keys) else max(keys)

    def __enter__(self) -> IslandGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"IslandGroup(island={self.island_id}/{self.islands}, sizes={self.sizes}, "
            f"local_rank={self.local_rank}, segments={self.segments}, flows={sorted(self.flows)})"
        )


def _env_int(name: str, what: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise ConfigError(f"init_group(island=...) needs {what}: pass it or set ${name}")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"${name} must be an integer, got {value!r}") from None


def init_island_group(
    island: Any,
    *,
    island_id: int | None,
    islands: int | None,
    store: str | None,
    segments: int | None,
    group_name: str,
    join: Any,
    security: Any = None,
    backend: str = "zmq",
) -> IslandGroup:
    """Build an :class:`IslandGroup`; ``join(rank, world_size, store, group_name, config)``
    joins one lowband group (``init_group`` with the caller's other arguments)."""
    import torch
    import torch.distributed as dist

    if island_id is None:
        island_id = _env_int(ENV_ISLAND, "island_id= (this island's id, 0..islands-1)")
    if islands is None:
        islands = _env_int(ENV_ISLANDS, "islands= (the number of islands)")
    if store is None:
        store = os.environ.get(ENV_COORDINATOR)
    if store is None:
        raise ConfigError(
            "islands need one lowband coordinator shared by every island: start it with "
            "`lowband coordinator --bind HOST:PORT` and pass init_group(island=..., store='HOST:PORT') "
            f"or set ${ENV_COORDINATOR} (the coordinator torchrun would start is per job, so it "
            "cannot join islands launched by separate torchrun commands)"
        )
    if not dist.is_initialized():
        raise ConfigError("init_group(island=...) needs torch.distributed initialized first (the island)")
    if islands < 1 or not 0 <= island_id < islands:
        raise ConfigError(f"island_id {island_id} is not in [0, islands={islands})")
    local_rank = dist.get_rank(island)
    local_size = dist.get_world_size(island)
    leader = dist.get_global_rank(island, 0) if island is not dist.group.WORLD else 0

    # Island sizes: the island leaders tell each other (a small lowband group), then
    # each leader tells its island. A restarted island reads them from the running run.
    box: list[Any] = [None]
    if local_rank == 0:
        running = _running_layout(store, f"{group_name}/seg0", security) if backend == "zmq" else None
        if running is not None:
            log.info("island %d: run %r is going (sizes %s, %d segments): joining it", island_id,
                     group_name, list(running[0]), running[1])
            box[0] = (*running, True)
        else:
            directory = join(island_id, islands, store, f"{group_name}/islands", {"role": "directory"})
            try:
                onehot = torch.zeros(islands)
                onehot[island_id] = float(local_size)
                summed = directory.all_reduce(onehot, op="sum").wait()
                box[0] = (tuple(int(v) for v in summed.tolist()), segments, False)
            finally:
                _close_after_barrier(directory)
    dist.broadcast_object_list(box, src=leader, group=island)
    sizes, running_segments, restart = box[0]
    if restart:
        if len(sizes) != islands or sizes[island_id] != local_size:
            raise ConfigError(
                f"island {island_id} restarts with {local_size} ranks of {islands} islands, but the "
                f"running run {group_name!r} has island sizes {list(sizes)}: restart it with its shape"
            )
        if segments is not None and segments != running_segments:
            raise ConfigError(f"segments={segments}, but the running run {group_name!r} has {running_segments}")
        segments = running_segments
    if min(sizes) < 1:
        raise ConfigError(f"island sizes {sizes}: every island needs at least one rank")
    if segments is None:
        segments = math.lcm(*sizes)
        if segments > MAX_SEGMENTS:
            raise ConfigError(
                f"island sizes {sizes} give {segments} canonical segments (their lcm), over "
                f"{MAX_SEGMENTS}: pass segments= (a multiple of the largest island's size)"
            )
    if segments < max(sizes):
        raise ConfigError(f"segments={segments} is below the largest island's size {max(sizes)}")
    config = {"islands": list(sizes), "segments": segments}
    flows: dict[int, Group] = {}
    mine = [s for s in range(segments) if segment_owner(s, local_size, segments) == local_rank]
    try:
        if restart:
            flows.update(_join_all(mine, lambda s: join(island_id, islands, store, f"{group_name}/seg{s}", config)))
            # all anew: the old run had ended (every member gone) and this is a first start of
            # the same shape after all (its flows' handshakes check it); some anew: a mixed state
            new = [s for s, g in flows.items() if getattr(g, "joined_at", None) is None]
            if new and len(new) < len(flows):
                raise ConfigError(
                    f"island {island_id} restarted into run {group_name!r}, but the flows of segments "
                    f"{new} started anew (the run ended meanwhile?): start every island again"
                )
        else:
            for s in mine:  # in segment order on every rank, so no join waits in a cycle
                flows[s] = join(island_id, islands, store, f"{group_name}/seg{s}", config)
    except BaseException:
        for g in flows.values():
            g.close()
        raise
    group = IslandGroup(
        island=island, island_id=island_id, sizes=sizes, local_rank=local_rank,
        segments=segments, flows=flows,
    )
    log.info("joined islands as %r", group)
    return group


def _close_after_barrier(group: Group) -> None:
    # a leader that closes first could strand a peer still receiving its last message
    try:
        group.barrier(timeout=60.0)
    finally:
        group.close()


def _running_layout(store: str, flow: str, security: Any) -> tuple[tuple[int, ...], int] | None:
    """The island sizes and segments of a running run (its segment-0 flow has started), or
    ``None`` when it has not started (a first start: the islands meet in the directory)."""
    import zmq

    from lowband.transport._coord_client import CoordinatorClient

    ctx = zmq.Context()
    client = None
    try:
        client = CoordinatorClient(ctx, store, security=security)
        rep = client.ask({"op": "status", "group": flow}, timeout=10.0)
    finally:
        if client is not None:
            client.close()
        ctx.term()
    if rep is None or not rep.get("started"):
        return None
    config = rep.get("config")
    sizes = config.get("islands") if isinstance(config, dict) else None
    segments = config.get("segments") if isinstance(config, dict) else None
    if not (isinstance(sizes, list) and sizes and all(isinstance(v, int) and v > 0 for v in sizes)
            and isinstance(segments, int) and segments > 0):
        return None  # a coordinator that does not say (an older one): the directory decides
    return tuple(sizes), segments


def _join_all(segments: list[int], join_one: Any) -> dict[int, Group]:
    """Join the flows of ``segments`` at once, one thread each: a restarted rank waits to be
    admitted on every flow, and the members admit it only once it waits on all of them."""
    out: dict[int, Group] = {}
    errors: list[BaseException] = []

    def one(s: int) -> None:
        try:
            g = join_one(s)
        except BaseException as e:  # noqa: BLE001 - raised below, in the caller's thread
            errors.append(e)
            return
        out[s] = g

    threads = [threading.Thread(target=one, args=(s,), name=f"lowband-join-seg{s}", daemon=True)
               for s in segments]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for g in out.values():
            g.close()
        raise errors[0]
    return out
