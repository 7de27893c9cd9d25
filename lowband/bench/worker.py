"""One ``lowband bench`` worker process: joins the group, trains each method in turn, reports.

Every worker builds the same model from the same seed, so all methods start from
identical weights without a broadcast, and draws its own stream of training
windows from ``(seed, rank)``, the same stream for every method. Between methods
the workers and the launcher meet at a ``multiprocessing`` barrier (not over the
emulated links) so the launcher can read the emulator's byte counters at the
method's edges.

Events go to the launcher on a queue as plain tuples:
``("ready", rank)``, ``("progress", rank, method, step, loss)``,
``("eval", rank, method, record)``, ``("done", rank, method, result)``,
``("error", rank, method, traceback_text)``.

Islands (``lowband bench --islands 2x2``, docs/islands.md): ``spec.islands`` holds the
ranks per island; process ``rank`` is local rank ``local`` of island ``k``. Each island's
processes form a gloo process group (its TCPStore served by its local rank 0 on the
host's loopback at ``spec.island_ports[k]``) and run the model under FSDP2 (an island of
1: the plain model); the island's batch (``batch_size`` sequences, from replica ``k``'s
stream: the same data as worker ``k`` of the flat run) is split between its ranks.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from lowband.bench.methods import TrainConfig, build_method
from lowband.bench.model import CharTransformer, ModelConfig, evaluate_loss
from lowband.transport import CommStats

__all__ = ["WorkerSpec", "run_worker"]

log = logging.getLogger(__name__)

_STAT_FIELDS = CommStats.TOTALS


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, picklable for the spawn start method."""

    world_size: int
    store: str
    backend: str
    methods: tuple[str, ...]
    model: ModelConfig
    train: TrainConfig
    seed: int
    data: str | None
    threads: int
    eval_every: int
    eval_batches: int
    eval_batch_size: int
    bandwidth_bps: float = 1e8  # the emulated link, a hint for the transport's stream count
    rtt_s: float = 0.1
    peer_timeout: float = 60.0
    progress_every: int = 5
    islands: tuple[int, ...] = ()  # ranks per island; () = one whole replica per process
    island_ports: tuple[int, ...] = ()


def locate(rank: int, islands: tuple[int, ...]) -> tuple[int, int]:
    """Process ``rank`` of an islands run -> (island id, local rank)."""
    for k, n in enumerate(islands):
        if rank < n:
            return k, rank
        rank -= n
    raise ValueError(f"rank {rank} beyond islands {islands}")


def outer_state_bytes(opt: Any) -> int | None:
    """Host bytes of an optimizer's outer state: global copy, outer optimizer state and
    error-feedback residuals (None for a method without any)."""
    n, found = 0, False
    outer = getattr(opt, "outer_optimizer", None)
    if outer is not None:
        found = True
        for g in outer.param_groups:
            n += sum(p.numel() * p.element_size() for p in g["params"])
        for st in outer.state.values():
            n += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    ef = getattr(opt, "error_feedback", None)
    if ef is not None:
        found = True
        n += sum(v.numel() * v.element_size() for v in ef.residuals.values())
    return n if found else None


def _shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:  # type: ignore[union-attr]
        fully_shard(block)
    fully_shard(model)
    return model


def _snapshot(stats: Any) -> dict[str, float]:
    return {f: float(getattr(stats, f, 0)) for f in _STAT_FIELDS}


def _evaluate(model: CharTransformer, corpus: Any, spec: WorkerSpec) -> tuple[float, float]:
    kw = {"batches": spec.eval_batches, "batch_size": spec.eval_batch_size, "seed": spec.seed}
    return evaluate_loss(model, corpus.train, **kw), evaluate_loss(model, corpus.val, **kw)


def _train_one(
    name: str, rank: int, spec: WorkerSpec, group: Any, corpus: Any, events: Any, barrier: Any
) -> None:
    from lowband.bench.data import get_batch

    torch.manual_seed(spec.seed)
    model: Any = CharTransformer(spec.model)
    replica, local, size = rank, 0, 1
    if spec.islands:
        replica, local = locate(rank, spec.islands)
        size = spec.islands[replica]
        if size > 1:
            model = _shard(model)
    gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + replica)
    before_setup = _snapshot(group.stats)
    t_setup = time.perf_counter()
    stepper = build_method(name, model, group, spec.train)
    setup_s = time.perf_counter() - t_setup
    try:
        at_start = _snapshot(group.stats)
        barrier.wait()  # the launcher reads the link counters between these two waits
        barrier.wait()
        eval_seconds = 0.0  # evaluation pauses are not training time
        sent0 = at_start["bytes_sent"]
        t0 = time.perf_counter()

        def evaluate(step: int) -> tuple[float, float]:
            nonlocal eval_seconds
            e0 = time.perf_counter()
            train_wall = e0 - t0 - eval_seconds
            tr, va = _evaluate(model, corpus, spec)
            sent = _snapshot(group.stats)["bytes_sent"] - sent0
            rec = {
                "step": step,
                "train_loss": tr,
                "val_loss": va,
                "bytes_sent": sent,
                "syncs": stepper.syncs,
                "wall_s": train_wall,
            }
            events.put(("eval", rank, name, rec))
            eval_seconds += time.perf_counter() - e0
            return tr, va

        tr, va = evaluate(0)
        for step in range(spec.train.steps):
            stepper.set_lr_factor(spec.train.lr_factor(step))
            x, y = get_batch(
                corpus.train, spec.train.batch_size, spec.model.block_size, generator=gen
            )
            if size > 1:  # this rank's share of its island's batch
                x, y = x.chunk(size)[local], y.chunk(size)[local]
            loss = stepper.step(x, y)
            done = step + 1
            if done % spec.progress_every == 0 or done == spec.train.steps:
                events.put(("progress", rank, name, done, loss))
            if done == spec.train.steps:
                stepper.finish()
            if done % spec.eval_every == 0 or done == spec.train.steps:
                tr, va = evaluate(done)
        wall = time.perf_counter() - t0 - eval_seconds
        end = _snapshot(group.stats)
        result = {
            "wall_s": wall,
            "eval_s": eval_seconds,
            "setup_s": setup_s,
            "final_train_loss": tr,
            "final_val_loss": va,
            "syncs": stepper.syncs,
            "setup": {k: at_start[k] - before_setup[k] for k in _STAT_FIELDS},
            "comm": {k: end[k] - at_start[k] for k in _STAT_FIELDS},
            "outer_state_bytes": outer_state_bytes(stepper.optimizer),
            "flows": int(getattr(group.stats, "flows", 1)),
            "island": replica,
            "local_rank": local,
        }
    finally:
        stepper.close()
    barrier.wait()  # all workers done: the launcher reads the link counters
    barrier.wait()
    events.put(("done", rank, name, result))


def run_worker(rank: int, spec: WorkerSpec, events: Any, barrier: Any) -> None:
    """Process entry point (spawned by the launcher)."""
    torch.set_num_threads(spec.threads)
    name = "<init>"
    try:
        import lowband
        from lowband.bench._curve_note import quiet_emulated_binds
        from lowband.bench.data import load_corpus
        from lowband.wan import connect_endpoint, local_address

        corpus = load_corpus(spec.data)
        # On an emulated host, bind and advertise the host's address (lowband.wan sets it).
        options: dict[str, Any] = {"bandwidth": spec.bandwidth_bps, "rtt": spec.rtt_s}
        address = local_address()
        if address is not None:
            options["host"] = address
            quiet_emulated_binds(address)  # the launcher says it once for every host
        if spec.backend == "zmq":
            # In proxy mode, peers must dial each other through the emulator's relays.
            options["connect_map"] = connect_endpoint
        if spec.islands:
            group = _join_islands(rank, spec, options)
        else:
            group = lowband.init_group(
                rank=rank,
                world_size=spec.world_size,
                store=spec.store,
                backend=spec.backend,
                peer_timeout=spec.peer_timeout,
                **options,
            )
        try:
            events.put(("ready", rank))
            for name in spec.methods:
                _train_one(name, rank, spec, group, corpus, events, barrier)
        finally:
            group.close()
            if spec.islands:
                import torch.distributed as dist

                dist.destroy_process_group()
    except BaseException:  # report every failure, Ctrl-C included, then exit
        events.put(("error", rank, name, traceback.format_exc()))
        try:
            barrier.abort()  # release the others from the barrier
        except Exception:  # noqa: BLE001 - best effort while failing
            pass
        raise


def _join_islands(rank: int, spec: WorkerSpec, options: dict[str, Any]) -> Any:
    """This process's island (gloo over the host's loopback), then lowband between islands."""
    import datetime
    import os

    import torch.distributed as dist

    import lowband

    k, local = locate(rank, spec.islands)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # island traffic stays on the host
    store = dist.TCPStore(
        "127.0.0.1", spec.island_ports[k], spec.islands[k], local == 0,
        datetime.timedelta(seconds=120), wait_for_workers=False,
    )
    dist.init_process_group("gloo", store=store, rank=local, world_size=spec.islands[k])
    return lowband.init_group(
        island=dist.group.WORLD,
        island_id=k,
        islands=len(spec.islands),
        store=spec.store,
        backend=spec.backend,
        peer_timeout=spec.peer_timeout,
        **options,
    )
