"""Data parallelism with compressed gradients: every step, all-reduce compressed
gradients (with error feedback), write them back, then run the inner step.

Error feedback after Seide et al. 2014 ("1-bit SGD") and Karimireddy et al. 2019
("Error Feedback Fixes SignSGD"): what the codec did not send this step is added to
the next step's gradient, so nothing is lost for good.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lowband.errors import ConfigError, ConfigMismatch, TransportError
from lowband.optim._buckets import Bucket, gather_into, plan_buckets
from lowband.optim._common import (
    GroupLike,
    amp_found_inf,
    amp_unscale,
    check_finite_grads,
    resolve_aggregate,
    resolve_codec,
    resolve_error_feedback,
    wait_counted,
)
from lowband.transport import CommStats, agree_on_start
from lowband.transport._join import fingerprint, heal, joining, welcome
from lowband.transport._shards import ShardPlan, agree_on_start_islands, is_island_group

__all__ = ["CompressedGradients"]


class CompressedGradients(torch.optim.Optimizer):
    """Average gradients over ``group`` with ``codec`` before each inner step.

    Args:
        inner_optimizer: the user's optimizer; its ``param_groups`` and ``state`` are shared.
        group: a ``lowband.init_group`` group, or an island group (docs/islands.md).
        codec: ``None`` (dense fp32), a ``lowband.compress`` spec string or codec.
        error_feedback: ``True`` (decay 1, the default), ``False``, a decay in (0, 1],
            or an ``ErrorFeedback``; off for ``codec=None``, which loses nothing.
        bucket_bytes: fp32 bytes per bucket (one payload per bucket).
        aggregate: ``"mean"`` (default) or a robust rule of ``group.all_reduce``
            (``"trimmed_mean"``, ``"median"``, ``"norm_clip"``; dense codecs only).

    ``step()`` reduces the gradients unless :meth:`reduce_gradients` already ran
    since the last step (call it yourself to clip the averaged gradients).
    A parameter whose gradient is None on this peer sends zeros and receives the
    average; it stays None only when the average is exactly zero (no peer had one).

    With ``torch.amp.GradScaler``, ``scaler.step(opt)`` first agrees with the peers
    (one small all-reduce of the found-inf flags): if any peer found an inf or nan,
    every peer skips both the reduction and the inner step alike. (So with a scaler,
    let ``step()`` do the reduction rather than :meth:`reduce_gradients`: an inf
    must not reach the codec.)
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        inner_optimizer: torch.optim.Optimizer,
        *,
        group: GroupLike,
        codec: Any,
        error_feedback: Any = True,
        bucket_bytes: int = 32 << 20,
        aggregate: str = "mean",
    ) -> None:
        if not isinstance(inner_optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"inner_optimizer must be a torch.optim.Optimizer, got {type(inner_optimizer).__name__}"
            )
        super().__init__(inner_optimizer.param_groups, inner_optimizer.defaults)
        self.param_groups = inner_optimizer.param_groups
        self.state = inner_optimizer.state
        self.inner = inner_optimizer
        self.group = group
        self.codec = resolve_codec(codec)
        self.aggregate = resolve_aggregate(aggregate, self.codec)
        self.error_feedback = resolve_error_feedback(error_feedback, self.codec)
        self._stats = CommStats()
        self._reduced = False
        # Parameters with requires_grad=False are not reduced (they have no gradient to
        # send); they only take part in the start-up check, so peers start alike.
        everything = [p for g in self.param_groups for p in g["params"]]
        params = [p for p in everything if p.requires_grad]
        frozen_at = [i for i, p in enumerate(everything) if not p.requires_grad]
        if not params:
            raise ConfigError(
                "CompressedGradients needs at least one parameter with requires_grad=True"
            )
        self._params = params
        config: dict[str, Any] = {
            "optimizer": "CompressedGradients",
            "codec": str(self.codec) if self.codec is not None else None,
        }
        if self.aggregate != "mean":
            config["aggregate"] = self.aggregate
        if frozen_at:
            config["frozen"] = frozen_at
        frozen = [everything[i] for i in frozen_at]
        self._config = config
        # Joining a running group (a restart): no start-up collective, the members are past
        # it; the first step() takes the live state (see step()).
        self._joining = joining(group)
        self._welcome_due = False
        self._welcomes: list[Any] = []
        # Islands (docs/islands.md): the island's gradients (already averaged inside it by
        # FSDP2 or DDP) are reduced over the canonical layout, each rank its own buckets.
        self._shards: ShardPlan | None = None
        if is_island_group(group):
            if self._joining:
                raise ConfigError(
                    "this island restarted into a running run: over islands only DiLoCo (and "
                    "sparseloco) heal a restarted island; restart every island for CompressedGradients"
                )
            self._shards = ShardPlan(params, group, bucket_bytes=bucket_bytes)
            self._stats.flows = len(group.flows)
            config["islands"] = self._shards.describe()
            plans = [(self._shards, [v for f in range(len(self._shards.owned)) for v in self._shards.gather(f)])]
            if frozen:
                fplan = ShardPlan(frozen, group, bucket_bytes=bucket_bytes)
                plans.append((fplan, [v for f in range(len(fplan.owned)) for v in fplan.gather(f)]))
            agree_on_start_islands(group, config, plans, stats=self._stats)
            return
        self._buckets: list[Bucket] = plan_buckets(params, bucket_bytes=bucket_bytes)
        self._staging = [torch.zeros(b.numel, dtype=torch.float32) for b in self._buckets]
        config["buckets"] = [[list(p.shape) for p in b.params] for b in self._buckets]
        start = self._buckets + plan_buckets(
            frozen, bucket_bytes=bucket_bytes, first_index=len(self._buckets)
        )
        if not self._joining:
            agree_on_start(
                group, config, [p for b in start for p in b.params], stats=self._stats,
                bucket_bytes=bucket_bytes,
            )

    @property
    def stats(self) -> CommStats:
        """Bytes and time of this optimizer's collectives."""
        return self._stats

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "inner"):
            raise ConfigError(
                "CompressedGradients cannot take parameters after it is built: build a new one"
            )
        super().add_param_group(param_group)

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """All-reduce (mean) this peer's gradients with the peers' and write the average back."""
        # before anything is launched or a residual changes: a raise leaves all as it was
        check_finite_grads(self, self._params)
        self._reduce()

    def _reduce_islands(self, shards: ShardPlan) -> None:
        # a missing gradient counts as zeros and receives the average (never stays None)
        for f, buckets in enumerate(shards.owned):
            bufs = shards.gather(f, grads=True)
            works = [
                shards.flow(b).all_reduce(
                    buf, codec=self.codec, op=self.aggregate,
                    error_feedback=self.error_feedback, key=f"grads.{b.key}",
                )
                for b, buf in zip(buckets, bufs)
            ]
            results = wait_counted(works, self._stats)
            shards.scatter(f, results, grads=True)
        self._stats.count_sync()
        self._reduced = True

    def _reduce(self) -> None:
        if self._shards is not None:
            self._reduce_islands(self._shards)
            return
        works = []
        had: list[list[bool]] = []
        for b, buf in zip(self._buckets, self._staging):
            had.append(gather_into(b, buf, grads=True))
            works.append(
                self.group.all_reduce(
                    buf,
                    codec=self.codec,
                    op=self.aggregate,
                    error_feedback=self.error_feedback,
                    key=f"grads.{b.index}",
                )
            )
        for w in self._welcomes:  # the last welcome's errors (a drop of this rank) surface here
            w.wait()
            self._stats.add(w.stats)
        self._welcomes = []
        results = wait_counted(works, self._stats)
        if any(getattr(w, "waiting", ()) for w in works):
            self._welcome_due = True  # the same decision reached every member: all welcome
        self._stats.count_sync()
        for b, avg, flags in zip(self._buckets, results, had):
            for (p, start, stop), has in zip(b.slices(), flags):
                part = avg[start:stop].view_as(p)
                if has and p.grad is not None:
                    p.grad.copy_(part)
                elif bool(part.any()):
                    p.grad = part.to(device=p.device, dtype=p.dtype)
        self._reduced = True

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Reduce the gradients (unless :meth:`reduce_gradients` did), then the inner step.

        Joining: on a rank that entered a running group, the first call takes the
        parameters and the inner optimizer's state from a member (every member holds the
        same: they apply the same averaged gradients), checked by fingerprint, and sends
        zeros in this step's reduction (its gradient was computed on the parameters from
        before), so every rank applies the same update from then on.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._joining:
            with torch.no_grad():
                self._heal()
                for p in (p for g in self.param_groups for p in g["params"]):
                    if p.grad is not None:
                        p.grad.zero_()
            self._reduced = False
        params = [p for g in self.param_groups for p in g["params"]]
        found_inf = amp_found_inf(self)
        if found_inf is not None:
            work = self.group.all_reduce(torch.tensor([float(found_inf)]), op="sum")
            (flags,) = wait_counted([work], self._stats)
            if float(flags[0]) > 0:
                self._reduced = False
                return loss  # some peer overflowed: every peer skips this step alike
        if not self._reduced:
            check_finite_grads(self, params)  # before the unscale changes the gradients
        amp_unscale(self, params)
        if not self._reduced:
            with torch.no_grad():
                self._reduce()
        self._reduced = False
        self.inner.step()
        if self._welcome_due:
            self._welcome()
        return loss

    # -- joining (issue 16; the protocol is in lowband/transport/_join.py) --------------------

    def _bucket_params(self) -> list[torch.Tensor]:
        return [p for b in self._buckets for p in b.params]

    def _welcome(self) -> None:
        """Members: ranks wait to join; let them in and offer the parameters and inner state."""
        self._welcome_due = False
        state = {
            "params": [p.detach().to("cpu") for p in self._bucket_params()],
            "inner": self.inner.state_dict(),
        }
        self._welcomes = welcome(self.group, self._config, state, fingerprint(self._bucket_params()))

    @torch.no_grad()
    def _heal(self) -> None:
        state, fp = heal(self.group, self._config)
        saved = state.get("params")
        params = self._bucket_params()
        if not isinstance(saved, list) or len(saved) != len(params):
            raise ConfigMismatch("the state a member sent does not match this model's parameters")
        for p, t in zip(params, saved):
            if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                raise ConfigMismatch("the state a member sent does not match this model's parameters")
            p.copy_(t.to(device=p.device, dtype=p.dtype))
        self.inner.load_state_dict(state["inner"])
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state
        if self.error_feedback is not None:
            self.error_feedback.reset()  # this peer's residual of the old run is stale
        mine = fingerprint(params)
        if mine != fp:
            raise TransportError(f"rank {self.group.rank}: the state taken on joining has fingerprint "
                                 f"{mine[:16]}, the member sent {fp[:16]}")
        self._joining = False

    def state_dict(self) -> dict[str, Any]:
        """Inner state plus the error-feedback residuals under ``"compressed_gradients"``."""
        state = self.inner.state_dict()
        ef = self.error_feedback
        state["compressed_gradients"] = {
            "error_feedback": ef.state_dict() if ef is not None else None
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mine = state_dict.get("compressed_gradients")
        if mine is None:
            raise ConfigError(
                "not a CompressedGradients state_dict (no 'compressed_gradients' entry)"
            )
        self.inner.load_state_dict(
            {k: v for k, v in state_dict.items() if k != "compressed_gradients"}
        )
        # torch's loader rebinds the inner optimizer's param_groups and state: share them again
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state
        if self.error_feedback is not None and mine["error_feedback"] is not None:
            self.error_feedback.load_state_dict(mine["error_feedback"])
