"""DeMo across islands (docs/islands.md): ``lowband.DeMo(..., group=island_group)``.

DeMo's state follows each parameter's shape (DCT tiles of ``chunk x chunk`` over a whole
matrix), which FSDP2's row shards cut. So the canonical layout here is made of whole
parameters (``ShardPlan(cut="params")``): segment ``s`` is a run of whole parameters,
owned in each island by one rank, which holds a full copy (a *proxy*) of each of them and
runs a plain :class:`~lowband.distro.demo.DeMo` over the proxies with that segment's flow.
Each step gathers the island's gradients into the owners' proxies, steps every owned
segment's DeMo, and scatters the new values back into the island's shards. Each rank
keeps the proxies and DeMo state of its own segments only, about ``1/L`` of the model's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from lowband.errors import ConfigError
from lowband.transport._shards import ShardPlan
from lowband.transport._stats import CommStats

__all__ = ["IslandDeMo"]

#: The per-group hyperparameters a learning-rate schedule (or the user) may change between steps.
_LIVE = ("lr", "decay", "weight_decay")


class IslandDeMo(torch.optim.Optimizer):
    """What ``DeMo(params, group=<IslandGroup>, ...)`` builds; the same arguments as DeMo."""

    def __init__(self, params: Iterable[Any], lr: float, *, group: Any, **kwargs: Any) -> None:
        import inspect

        from lowband.distro.demo import DeMo

        defaults = {
            k: v.default for k, v in inspect.signature(DeMo.__init__).parameters.items()
            if v.default is not inspect.Parameter.empty
        }
        unknown = set(kwargs) - set(defaults)
        if unknown:
            raise ConfigError(f"DeMo takes no arguments {sorted(unknown)}")
        hyper = {**defaults, **kwargs, "lr": lr}
        overlap = hyper.pop("overlap")
        aggregate = hyper.pop("aggregate")
        super().__init__(params, dict(hyper))
        if getattr(group, "joined_at", None) is not None:
            raise ConfigError(
                "this island restarted into a running run: over islands only DiLoCo (and sparseloco) "
                "heal a restarted island; restart every island for DeMo"
            )
        self.group = group
        everything = [p for g in self.param_groups for p in g["params"]]
        trainable = [p for p in everything if p.requires_grad]
        if not trainable:
            raise ConfigError("DeMo needs at least one parameter with requires_grad=True")
        if group.segments > len(trainable):
            raise ConfigError(
                f"DeMo over islands cuts the model into {group.segments} runs of whole parameters, "
                f"but it has {len(trainable)}"
            )
        self._params = trainable
        self._plan = ShardPlan(trainable, group, bucket_bytes=1 << 62, cut="params")
        group_of = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        values = self._plan.gather(0)
        self._proxies: dict[int, list[tuple[int, torch.Tensor]]] = {}
        self._inner: dict[int, Any] = {}
        self._inner_groups: dict[int, list[int]] = {}  # segment -> user group index of each inner group
        for b, flat in zip(self._plan.owned[0], values):
            proxies = []
            for i, p in enumerate(trainable):
                lo, hi = self._plan.offsets[i], self._plan.offsets[i + 1]
                if b.start <= lo and hi <= b.stop and hi > lo:
                    local = p.to_local() if hasattr(p, "to_local") else p
                    t = flat[lo - b.start : hi - b.start].view(p.shape).to(dtype=p.dtype, device=local.device)
                    proxies.append((i, t.clone().requires_grad_(True)))
            if not proxies:
                continue
            by_group: dict[int, list[torch.Tensor]] = {}
            for i, t in proxies:
                by_group.setdefault(group_of[id(trainable[i])], []).append(t)
            groups = []
            for gi, ts in sorted(by_group.items()):
                g = self.param_groups[gi]
                groups.append({"params": ts, **{k: g[k] for k in self.defaults}})
            self._inner_groups[b.segment] = sorted(by_group)
            self._proxies[b.segment] = proxies
            self._inner[b.segment] = DeMo(
                groups, group=group.flows[b.segment], overlap=overlap, aggregate=aggregate, **hyper
            )
        self._write_back()  # each flow may have taken island 0's values

    @property
    def stats(self) -> CommStats:
        """The sum over this rank's segments; ``flows`` counts them."""
        out = CommStats()
        for inner in self._inner.values():
            out.add(inner.stats)
        out.syncs = min((inner.stats.syncs for inner in self._inner.values()), default=0)
        out.flows = len(self.group.flows)
        return out

    def _write_back(self) -> None:
        """Collective of the island: the proxies' values into every rank's shards."""
        values = []
        for b in self._plan.owned[0]:
            flat = torch.zeros(b.numel, dtype=torch.float32)
            for i, t in self._proxies.get(b.segment, []):
                lo, hi = self._plan.offsets[i], self._plan.offsets[i + 1]
                flat[lo - b.start : hi - b.start].copy_(t.detach().reshape(-1))
            values.append(flat)
        with torch.no_grad():
            self._plan.scatter(0, values)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = self._plan.gather(0, grads=True)  # a missing gradient counts as zeros
        for b, flat in zip(self._plan.owned[0], grads):
            for i, t in self._proxies.get(b.segment, []):
                lo, hi = self._plan.offsets[i], self._plan.offsets[i + 1]
                t.grad = flat[lo - b.start : hi - b.start].view(t.shape).to(dtype=t.dtype, device=t.device)
        for s in sorted(self._inner):  # in segment order on every rank: no flow waits in a cycle
            inner = self._inner[s]
            for ig, gi in zip(inner.param_groups, self._inner_groups[s]):
                for k in _LIVE:
                    ig[k] = self.param_groups[gi][k]
            inner.step()
        self._write_back()
        return loss

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the exchanges still in flight (``overlap=True``); on every rank of every island."""
        for s in sorted(self._inner):
            self._inner[s].flush()
        self._write_back()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["island_demo"] = {
            "segments": sorted(self._inner),
            "inner": {s: self._inner[s].state_dict() for s in sorted(self._inner)},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load after the model's own state (the proxies are read back from the shards)."""
        mine = state_dict.get("island_demo")
        if mine is None or mine["segments"] != sorted(self._inner):
            raise ConfigError("not this island rank's DeMo state_dict (resume each rank from its own file)")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "island_demo"})
        for s in sorted(self._inner):
            self._inner[s].load_state_dict(mine["inner"][s])
        values = self._plan.gather(0)
        for b, flat in zip(self._plan.owned[0], values):
            for i, t in self._proxies.get(b.segment, []):
                lo, hi = self._plan.offsets[i], self._plan.offsets[i + 1]
                with torch.no_grad():
                    t.copy_(flat[lo - b.start : hi - b.start].view(t.shape))
