"""DiLoCo: local inner steps, then a compressed outer step on the averaged pseudo-gradient.

Implements DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication
Training of Language Models") and its streaming form (Douillard et al. 2025,
"Streaming DiLoCo with overlapping communication"): ``fragments=F`` syncs 1/F of
the parameters at staggered steps and ``overlap=tau`` lets a fragment's all-reduce
run in the background for ``tau`` inner steps before it is applied.

The global copy of the parameters and the outer optimizer's state live in flat fp32
buckets on the CPU by default (pinned when CUDA is present), so accelerator memory
does not grow. Host memory: the global copy and the outer momentum, 2x an fp32 model,
kept; during a sync, the group's copies of the fragment's pseudo-gradients and their
averaged results, up to 2x more (2/F with F fragments); error feedback adds 1x.

Schedule: ``step()`` counts every call that reached it, including calls whose inner
step GradScaler asked to skip (inf or nan in this peer's gradients). Peers therefore
stay in lockstep: each syncs fragment ``f`` when its count reaches
``d_f + k * sync_every`` with ``d_f = (f + 1) * sync_every // fragments``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lowband.errors import ConfigError, ConfigMismatch, PeerLost, TransportError
from lowband.optim._buckets import Bucket, gather_into, plan_buckets, scatter_from, split_fragments
from lowband.optim._common import (
    GroupLike,
    Ready,
    WorkLike,
    amp_found_inf,
    amp_skip_and_unscale,
    check_finite_grads,
    resolve_aggregate,
    resolve_codec,
    resolve_error_feedback,
    wait_counted,
)
from lowband.transport import CommStats, agree_on_start
from lowband.transport._join import fingerprint, heal, joining, welcome
from lowband.transport._shards import (
    ShardPlan,
    agree_on_start_islands,
    is_island_group,
    island_admits,
)

__all__ = ["DiLoCo"]

logger = logging.getLogger(__name__)

OuterFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


@dataclass
class _Pending:
    """A fragment's sync in flight: launched at one step, applied at ``apply_at``."""

    fragment: int
    apply_at: int
    works: list[WorkLike]


class DiLoCo(torch.optim.Optimizer):
    """Wrap ``inner_optimizer`` so that peers sync every ``sync_every`` steps.

    Args:
        inner_optimizer: the user's optimizer (AdamW, ...); its ``param_groups`` and
            ``state`` are this optimizer's, so learning-rate schedulers, gradient
            clipping and ``torch.amp.GradScaler`` work unchanged.
        group: a ``lowband.init_group`` group, or an island group
            (``init_group(island=...)``, docs/islands.md: FSDP2 or DDP inside each island).
        sync_every: inner steps between two syncs of a fragment (H in the papers).
        outer_lr, outer_momentum, nesterov: the default outer optimizer, SGD.
        outer_optimizer: ``factory(global_buckets) -> torch.optim.Optimizer`` in place
            of the default SGD (then leave outer_lr, outer_momentum, nesterov alone).
        codec: ``None`` (dense fp32) or any ``lowband.compress`` codec or spec string.
        error_feedback: ``None``/``False``, ``True`` (decay 1), a decay, or an ``ErrorFeedback``.
        fragments: streaming DiLoCo fragments F (1 = plain DiLoCo).
        overlap: inner steps tau that a fragment's sync runs in the background.
        mixing: with ``overlap > 0``, the weight alpha of the local parameters when the
            new global values arrive: ``local = alpha * local + (1 - alpha) * global``
            (Streaming DiLoCo, which found alpha = 0.5 works well). Unused when overlap is 0:
            then the model takes the global values.
        offload: ``"cpu"`` (default) or ``"device"``: where the global copy lives.
        bucket_bytes: fp32 bytes per bucket (one payload per bucket).
        aggregate: how the pseudo-gradients are combined: ``"mean"`` (default) or a
            robust rule of ``group.all_reduce`` (``"trimmed_mean"``, ``"median"``,
            ``"norm_clip"``; dense codecs only).
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        inner_optimizer: torch.optim.Optimizer,
        *,
        group: GroupLike,
        sync_every: int,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        outer_optimizer: OuterFactory | None = None,
        codec: Any = None,
        error_feedback: Any = None,
        fragments: int = 1,
        overlap: int = 0,
        mixing: float = 0.5,
        offload: str = "cpu",
        bucket_bytes: int = 32 << 20,
        aggregate: str = "mean",
    ) -> None:
        if not isinstance(inner_optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"inner_optimizer must be a torch.optim.Optimizer, got {type(inner_optimizer).__name__}"
            )
        if not isinstance(sync_every, int) or sync_every < 1:
            raise ConfigError(f"sync_every must be an int >= 1, got {sync_every!r}")
        if not isinstance(fragments, int) or not 1 <= fragments <= sync_every:
            raise ConfigError(
                f"fragments must be an int in [1, sync_every={sync_every}], got {fragments!r}"
            )
        if not isinstance(overlap, int) or not 0 <= overlap < sync_every:
            raise ConfigError(
                f"overlap must be an int in [0, sync_every={sync_every}), got {overlap!r}"
            )
        if not 0.0 <= mixing <= 1.0:
            raise ConfigError(f"mixing must be in [0, 1], got {mixing}")
        if offload not in ("cpu", "device"):
            raise ConfigError(f"offload must be 'cpu' or 'device', got {offload!r}")
        if outer_optimizer is None:
            if outer_lr <= 0.0:
                raise ConfigError(f"outer_lr must be > 0, got {outer_lr}")
            if not 0.0 <= outer_momentum < 1.0:
                raise ConfigError(f"outer_momentum must be in [0, 1), got {outer_momentum}")
            if nesterov and outer_momentum == 0.0:
                raise ConfigError("nesterov=True needs outer_momentum > 0")
        elif (outer_lr, outer_momentum, nesterov) != (0.7, 0.9, True):
            raise ConfigError(
                "pass either outer_optimizer or outer_lr/outer_momentum/nesterov, not both"
            )

        # Share the inner optimizer's groups and state: a scheduler or clip on the
        # wrapper acts on the inner optimizer. Nothing of the inner one is patched.
        super().__init__(inner_optimizer.param_groups, inner_optimizer.defaults)
        self.param_groups = inner_optimizer.param_groups
        self.state = inner_optimizer.state
        self.inner = inner_optimizer
        self.group = group
        self.sync_every = sync_every
        self.fragments = fragments
        self.overlap = overlap
        self.mixing = mixing
        self.offload = offload
        self.codec = resolve_codec(codec)
        self.aggregate = resolve_aggregate(aggregate, self.codec)
        self.error_feedback = resolve_error_feedback(error_feedback, self.codec)
        self._stats = CommStats()
        self._step_count = 0
        self._pending: list[_Pending] = []

        # Parameters with requires_grad=False (a frozen base under LoRA adapters) are
        # neither synced nor stepped by the outer optimizer: they only take part in the
        # start-up check (config and digest), so peers still start from the same weights.
        everything = [p for g in self.param_groups for p in g["params"]]
        params = [p for p in everything if p.requires_grad]
        self._frozen = [i for i, p in enumerate(everything) if not p.requires_grad]
        if not params:
            raise ConfigError("DiLoCo needs at least one parameter with requires_grad=True")
        # Islands (docs/islands.md): this rank keeps the outer state of its canonical
        # buckets only; lowband.transport._shards maps the island's shards onto them.
        self._shards: ShardPlan | None = None
        self._fragment_buckets: list[list[Any]] = []
        if is_island_group(group):
            island: Any = group
            if offload != "cpu":
                raise ConfigError("with islands the global copy lives on the CPU: offload='cpu'")
            runs = [len(run) for run in split_fragments(params, fragments)]
            self._shards = ShardPlan(params, group, bucket_bytes=bucket_bytes, runs=runs)
            self._fragment_buckets = self._shards.owned
            self._stats.flows = len(island.flows)
            if not self._shards.buckets:
                raise ConfigError(
                    f"island rank {island.local_rank} owns no values: the model is smaller than "
                    f"segments={island.segments}"
                )
        else:
            for run in split_fragments(params, fragments):
                first = sum(len(b) for b in self._fragment_buckets)
                self._fragment_buckets.append(
                    plan_buckets(run, bucket_bytes=bucket_bytes, first_index=first)
                )
        self._buckets: list[Any] = [b for run in self._fragment_buckets for b in run]
        self._global = [self._buffer(b) for b in self._buckets]
        # One staging buffer for every bucket: the group snapshots its input when a
        # collective is launched, so the pseudo-gradient need not outlive the call.
        self._staging = torch.zeros(
            max(b.numel for b in self._buckets), dtype=torch.float32, device=self._global[0].device
        )
        self._read_global()
        self._outer: torch.optim.Optimizer
        if outer_optimizer is None:
            self._outer = torch.optim.SGD(
                self._global, lr=outer_lr, momentum=outer_momentum, nesterov=nesterov
            )
        else:
            self._outer = outer_optimizer(list(self._global))
            if not isinstance(self._outer, torch.optim.Optimizer):
                raise ConfigError("outer_optimizer must return a torch.optim.Optimizer")
        config = {"optimizer": "DiLoCo", **self._config()}
        frozen = [everything[i] for i in self._frozen]
        # Joining a running group (a restart): no start-up collective here, the members are
        # past it; the first step() takes the live state (see "Joining" in step()).
        self._joining = joining(group)
        self._welcome_due = False
        self._welcomes: list[WorkLike] = []
        if self._shards is not None:
            plans = [(self._shards, self._global)]
            if frozen:
                fplan = ShardPlan(frozen, group, bucket_bytes=bucket_bytes)
                plans.append((fplan, [v for f in range(len(fplan.owned)) for v in fplan.gather(f)]))
            if self._joining:  # a restarted island: the first step() takes each flow's live state
                logger.info("island %d rank %d joins a running run: the first step() takes the live state",
                            group.island_id, group.local_rank)
                return
            agree_on_start_islands(group, config, plans, stats=self._stats)  # the globals are updated
            return
        start = self._buckets + plan_buckets(
            frozen, bucket_bytes=bucket_bytes, first_index=len(self._buckets)
        )
        if self._joining:
            logger.info("rank %d joins a running group: the first step() takes the live state",
                        group.rank)
        elif agree_on_start(
            group, config, [p for b in start for p in b.params], stats=self._stats,
            bucket_bytes=bucket_bytes,
        ):
            self._read_global()

    # -- construction helpers -------------------------------------------------

    def _buffer(self, bucket: Bucket) -> torch.Tensor:
        device = torch.device("cpu") if self.offload == "cpu" else bucket.params[0].device
        pin = device.type == "cpu" and torch.cuda.is_available()
        return torch.zeros(bucket.numel, dtype=torch.float32, device=device, pin_memory=pin)

    def _read_global(self) -> None:
        with torch.no_grad():
            if self._shards is not None:
                for f, run in enumerate(self._fragment_buckets):
                    for b, v in zip(run, self._shards.gather(f)):
                        self._global[b.index].copy_(v)
                return
            for b, g in zip(self._buckets, self._global):
                gather_into(b, g)

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "sync_every": self.sync_every,
            "fragments": self.fragments,
            "overlap": self.overlap,
            "codec": str(self.codec) if self.codec is not None else None,
        }
        if self._shards is None:
            config["buckets"] = [[list(p.shape) for p in b.params] for b in self._buckets]
        else:
            config["islands"] = self._shards.describe()
        if self.aggregate != "mean":  # only then, so that earlier checkpoints still load
            config["aggregate"] = self.aggregate
        if self._frozen:  # likewise: positions of the requires_grad=False parameters
            config["frozen"] = list(self._frozen)
        return config

    # -- public surface ---------------------------------------------------------

    @property
    def stats(self) -> CommStats:
        """Bytes and time of this optimizer's collectives (DESIGN.md, "Three byte counters")."""
        return self._stats

    @property
    def step_count(self) -> int:
        """Calls of :meth:`step` so far (on a rank that joined a running group, the members'
        count from its first step on): the clock of the sync schedule."""
        return self._step_count

    @property
    def outer_optimizer(self) -> torch.optim.Optimizer:
        return self._outer

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "inner"):
            raise ConfigError("DiLoCo cannot take parameters after it is built: build a new one")
        super().add_param_group(param_group)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Inner step, then any outer step due at this count.

        Joining: on a rank that entered a running group, the first call takes the live
        state from a member instead of an inner step (its gradient was computed on the
        parameters from before): global copy, outer optimizer state and step count (so the
        fragment schedule), checked by fingerprint; the inner optimizer's state stays what
        it was (fresh, or what ``load_state_dict`` restored from this peer's checkpoint).
        Members let waiting ranks in after a sync and send them the state in the
        background; syncs still in flight are applied first.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._joining:
            with torch.no_grad():
                self._heal()
                self._step_count += 1
                self._advance(self._step_count)
            return loss
        params = [p for g in self.param_groups for p in g["params"]]
        if not amp_found_inf(self):  # a step that raises leaves everything as it was
            check_finite_grads(self, params)
        if not amp_skip_and_unscale(self, params):
            self.inner.step()
        self._step_count += 1
        with torch.no_grad():
            self._advance(self._step_count)
            if self._welcome_due:
                self._welcome()
        return loss

    # -- joining (issue 16; the protocol is in _join.py) -------------------------------

    def _join_config(self) -> dict[str, Any]:
        return {"optimizer": "DiLoCo", **self._config()}

    def _welcome(self) -> None:
        """Members: ranks wait to join; let them in and offer this step's state."""
        self._welcome_due = False
        self.flush()  # nothing in flight: the state offered is the state at this count
        self._welcome_due = False
        if self._shards is not None:
            self._welcome_islands()
            return
        state = {
            "step": self._step_count,
            "global": [g.detach().to("cpu") for g in self._global],
            "outer": self._outer.state_dict(),
        }
        self._welcomes = welcome(self.group, self._join_config(), state, fingerprint(self._global))

    def _segment_state(self, segment: int) -> tuple[dict[str, Any], str]:
        """What this rank offers on ``segment``'s flow: its buckets' global copy and outer
        state by canonical key (the same on every island whatever its shape), and the count."""
        outer = self._outer.state_dict()
        mine = [b for b in self._buckets if b.segment == segment]
        state = {
            "step": self._step_count,
            "global": {str(b.key): self._global[b.index].detach().to("cpu") for b in mine},
            "outer": {str(b.key): outer["state"][b.index] for b in mine if b.index in outer["state"]},
            "outer_groups": [{k: v for k, v in g.items() if k != "params"} for g in outer["param_groups"]],
        }
        return state, fingerprint([self._global[b.index] for b in mine])

    def _welcome_islands(self) -> None:
        """Members of an island: let the waiting islands in on every flow of this rank (in
        segment order, as every rank of every island) and offer each flow its segment's state."""
        for s in sorted(self.group.flows):
            state, fp = self._segment_state(s)
            self._welcomes += welcome(self.group.flows[s], self._join_config(), state, fp)

    def _heal_islands(self) -> None:
        """Joiner island rank: take each flow's segment state from that flow's member (the
        rank owning the segment in a live island), check it, write it into the island's shards."""
        config = self._join_config()
        steps: set[int] = set()
        outer = self._outer.state_dict()
        outer["state"] = {}
        for s in sorted(self.group.flows):
            state, fp = heal(self.group.flows[s], config)
            mine = [b for b in self._buckets if b.segment == s]
            saved, saved_outer = state.get("global"), state.get("outer")
            if not isinstance(saved, dict) or not isinstance(saved_outer, dict) or \
                    sorted(saved) != sorted(str(b.key) for b in mine):
                raise ConfigMismatch(f"the state sent on segment {s}'s flow does not match this model's buckets")
            for b in mine:
                t = saved[str(b.key)]
                if not isinstance(t, torch.Tensor) or t.shape != self._global[b.index].shape:
                    raise ConfigMismatch(f"the state sent on segment {s}'s flow does not match bucket {b.key}")
                self._global[b.index].copy_(t)
                if str(b.key) in saved_outer:
                    outer["state"][b.index] = saved_outer[str(b.key)]
            groups = state.get("outer_groups")
            if isinstance(groups, list) and len(groups) == len(outer["param_groups"]):
                for g, sent in zip(outer["param_groups"], groups):
                    g.update({k: v for k, v in sent.items() if k != "params"})
            got = fingerprint([self._global[b.index] for b in mine])
            if got != fp:
                raise TransportError(f"island {self.group.island_id} rank {self.group.local_rank}: the state of "
                                     f"segment {s} has fingerprint {got[:16]}, the member sent {fp[:16]}")
            steps.add(int(state["step"]))
        if len(steps) != 1:
            raise TransportError(f"the flows of this rank sent states of different steps {sorted(steps)}")
        self._load_outer(outer)
        self._step_count = steps.pop()
        self._pending = []
        if self.error_feedback is not None:
            self.error_feedback.reset()
        for f, run in enumerate(self._fragment_buckets):  # an island collective: all its ranks heal now
            self._shards.scatter(f, [self._global[b.index] for b in run])
        self._joining = False
        logger.info("island %d rank %d joined at step %d", self.group.island_id, self.group.local_rank,
                    self._step_count)

    def _heal(self) -> None:
        """Joiner: take a member's global copy, outer state and step count."""
        if self._shards is not None:
            self._heal_islands()
            return
        state, fp = heal(self.group, self._join_config())
        saved = state.get("global")
        if not isinstance(saved, list) or len(saved) != len(self._global):
            raise ConfigMismatch("the state a member sent does not match this model's buckets")
        for g, t in zip(self._global, saved):
            if not isinstance(t, torch.Tensor) or t.shape != g.shape:
                raise ConfigMismatch("the state a member sent does not match this model's buckets")
            g.copy_(t)
        self._load_outer(state["outer"])
        self._step_count = int(state["step"])
        self._pending = []  # any from this peer's checkpoint belong to the old run
        if self.error_feedback is not None:
            self.error_feedback.reset()  # this peer's residual of the old run is stale
        for b, g in zip(self._buckets, self._global):
            scatter_from(b, g)
        mine = fingerprint(self._global)
        if mine != fp:
            raise TransportError(f"rank {self.group.rank}: the state taken on joining has fingerprint "
                                 f"{mine[:16]}, the member sent {fp[:16]}")
        self._joining = False
        logger.info("rank %d joined at step %d (fingerprint %s)", self.group.rank, self._step_count, mine[:16])

    def flush(self) -> None:
        """Apply every sync still in flight now (e.g. at the end of training, on every peer)."""
        with torch.no_grad():
            while self._pending:
                self._apply(self._pending.pop(0))

    # -- the outer step -----------------------------------------------------------

    def _due(self, t: int) -> list[int]:
        H, F = self.sync_every, self.fragments
        return [f for f in range(F) if t >= (f + 1) * H // F and (t - (f + 1) * H // F) % H == 0]

    def _advance(self, t: int) -> None:
        while self._pending and self._pending[0].apply_at <= t:
            self._apply(self._pending.pop(0))
        for f in self._due(t):
            pending = self._launch(f, apply_at=t + self.overlap)
            if self.overlap == 0:
                self._apply(pending)
            else:
                self._pending.append(pending)

    def _launch(self, fragment: int, *, apply_at: int) -> _Pending:
        buckets = self._fragment_buckets[fragment]
        works: list[WorkLike] = []
        if self._shards is not None:  # an island collective; then this rank's flows
            local = self._shards.gather(fragment)
            for b, delta in zip(buckets, local):
                torch.sub(self._global[b.index], delta, out=delta)
                works.append(
                    self._shards.flow(b).all_reduce(
                        delta,
                        codec=self.codec,
                        op=self.aggregate,
                        error_feedback=self.error_feedback,
                        key=f"diloco.{b.key}",
                    )
                )
            return _Pending(fragment, apply_at, works)
        for b in buckets:
            delta = self._staging[: b.numel]
            gather_into(b, delta)
            torch.sub(self._global[b.index], delta, out=delta)  # pseudo-gradient: global - local
            works.append(
                self.group.all_reduce(
                    delta,
                    codec=self.codec,
                    op=self.aggregate,
                    error_feedback=self.error_feedback,
                    key=f"diloco.{b.index}",
                )
            )
        return _Pending(fragment, apply_at, works)

    def _apply(self, pending: _Pending) -> None:
        buckets = self._fragment_buckets[pending.fragment]
        for w in self._welcomes:  # the last welcome's errors (a drop of this rank) surface here
            w.wait()
            self._stats.add(w.stats)
        self._welcomes = []
        if self._shards is not None:
            try:
                results = wait_counted(pending.works, self._stats)
            except PeerLost as e:  # a flow's ranks are island ids: say so
                raise PeerLost(
                    f"island {self.group.island_id} rank {self.group.local_rank}: islands {list(e.peers)} "
                    f"lost on the WAN flows between islands ({e})", peers=e.peers,
                ) from e
            if island_admits(self.group, pending.works):  # agreed by the island's ranks
                self._welcome_due = True
        else:
            results = wait_counted(pending.works, self._stats)
            if any(getattr(w, "waiting", ()) for w in pending.works):
                self._welcome_due = True  # the same decision reached every member: all welcome
        self._stats.count_sync()
        for b, avg in zip(buckets, results):
            g = self._global[b.index]
            g.grad = avg.reshape(-1).to(device=g.device, dtype=torch.float32)
        self._outer.step()
        if self._shards is not None:
            for b in buckets:
                self._global[b.index].grad = None
            self._shards.scatter(
                pending.fragment,
                [self._global[b.index] for b in buckets],
                weight=None if self.overlap == 0 else 1.0 - self.mixing,
            )
            return
        for b in buckets:
            g = self._global[b.index]
            g.grad = None
            if self.overlap == 0:
                scatter_from(b, g)
            else:
                for p, start, stop in b.slices():
                    new = g[start:stop].view_as(p).to(device=p.device, dtype=p.dtype)
                    p.detach().lerp_(new, 1.0 - self.mixing)

    # -- checkpoints ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Inner state plus ``"diloco"``: global copy, outer state, error feedback, schedule.

        It also holds this peer's parameters (fp32 holds bf16 values exactly):
        between syncs they differ from peer to peer, and building the optimizer
        again may have broadcast rank 0's, so :meth:`load_state_dict` puts them back.

        Syncs still in flight are waited for and their averaged pseudo-gradients saved,
        so a resumed run applies them at the same step and continues bit-for-bit.
        """
        pending = []
        for p in self._pending:
            results = wait_counted(p.works, self._stats)
            p.works = [Ready(r) for r in results]
            pending.append(
                {
                    "fragment": p.fragment,
                    "apply_at": p.apply_at,
                    "results": [r.clone() for r in results],
                }
            )
        state = self.inner.state_dict()
        state["diloco"] = {
            "config": self._config(),
            "step": self._step_count,
            "global": [g.detach().clone() for g in self._global],
            "local": self._shards.local_copies()
            if self._shards is not None
            else [self._local_copy(b) for b in self._buckets],
            "outer": copy.deepcopy(self._outer.state_dict()),
            "error_feedback": self.error_feedback.state_dict()
            if self.error_feedback is not None
            else None,
            "pending": pending,
        }
        if self._shards is not None:  # this rank's canonical buckets (docs/islands.md)
            state["diloco"]["owned"] = [b.key for b in self._buckets]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; each buffer keeps its saved dtype and device."""
        if "diloco" not in state_dict:
            raise ConfigMismatch("not a DiLoCo state_dict (no 'diloco' entry)")
        mine = state_dict["diloco"]
        if mine["config"] != self._config():
            raise ConfigMismatch(
                f"checkpoint was made with {mine['config']!r}, this optimizer is {self._config()!r}"
            )
        if self._shards is not None and mine.get("owned") != [b.key for b in self._buckets]:
            raise ConfigMismatch(
                f"checkpoint holds canonical buckets {mine.get('owned')}, this island rank owns "
                f"{[b.key for b in self._buckets]}: resume each rank from its own file, same island shape"
            )
        inner = {k: v for k, v in state_dict.items() if k != "diloco"}
        self.inner.load_state_dict(inner)
        # torch's loader gives the inner optimizer new param_groups and state objects:
        # share them again, or a scheduler stepping the wrapper changes nothing.
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state
        for g, saved in zip(self._global, mine["global"]):
            if saved.dtype != g.dtype or saved.shape != g.shape:
                raise ConfigMismatch(
                    f"global copy bucket is {saved.dtype}{tuple(saved.shape)}, expected {g.dtype}{tuple(g.shape)}"
                )
            g.copy_(saved)
        with torch.no_grad():
            if self._shards is not None:
                self._shards.load_local(mine["local"])
            for b, saved in zip(self._buckets if self._shards is None else (), mine["local"]):
                scatter_from(b, saved)
        self._load_outer(mine["outer"])
        if (mine["error_feedback"] is None) != (self.error_feedback is None):
            raise ConfigMismatch("checkpoint and optimizer disagree on error feedback")
        if self.error_feedback is not None:
            self.error_feedback.load_state_dict(mine["error_feedback"])
        self._step_count = int(mine["step"])
        self._pending = [
            _Pending(
                int(p["fragment"]), int(p["apply_at"]), [Ready(r.clone()) for r in p["results"]]
            )
            for p in mine["pending"]
        ]

    def _local_copy(self, bucket: Bucket) -> torch.Tensor:
        # fp32 holds bf16 and fp16 values exactly, so the model comes back bit for bit
        out = torch.empty(bucket.numel, dtype=torch.float32)
        gather_into(bucket, out)
        return out

    def _load_outer(self, saved: dict[str, Any]) -> None:
        # torch's loader casts state to each parameter's dtype and device; the outer
        # parameters are our fp32 buckets, so load then put every tensor back as saved.
        self._outer.load_state_dict(saved)
        params = [p for g in self._outer.param_groups for p in g["params"]]
        for index, entry in saved["state"].items():
            live = self._outer.state[params[int(index)]]
            for name, value in entry.items():
                if isinstance(value, torch.Tensor):
                    live[name] = value.detach().clone().to(device=value.device, dtype=value.dtype)
