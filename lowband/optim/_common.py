"""Pieces the optimizer wrappers share: the group protocol they program against,
per-optimizer byte counters, codec and error-feedback arguments, and GradScaler support.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from lowband.errors import CodecError, ConfigError
from lowband.optim._buckets import Bucket, gather_into, scatter_from
from lowband.transport import CommStats, PeerStats

__all__ = [
    "agree_on_start",
    "amp_found_inf",
    "amp_unscale",
    "GroupLike",
    "WorkLike",
    "StatsMeter",
    "Ready",
    "resolve_aggregate",
    "resolve_codec",
    "resolve_error_feedback",
    "amp_skip_and_unscale",
    "check_finite_grads",
]

logger = logging.getLogger(__name__)


class WorkLike(Protocol):
    def wait(self) -> Any: ...


class GroupLike(Protocol):
    """The part of ``lowband.init_group``'s Group that the optimizers use."""

    rank: int
    world_size: int
    stats: CommStats

    def all_reduce(self, tensor: torch.Tensor, **kwargs: Any) -> WorkLike: ...

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> WorkLike: ...

    def verify(self, config: Any) -> None: ...


class Ready:
    """A finished collective restored from a checkpoint: ``wait()`` returns its result."""

    def __init__(self, result: torch.Tensor) -> None:
        self.result = result

    def wait(self) -> torch.Tensor:
        return self.result


_COUNTERS = (
    "bytes_sent",
    "bytes_received",
    "transport_bytes_sent",
    "transport_bytes_received",
    "messages",
)


class StatsMeter:
    """This optimizer's share of its group's traffic, as a :class:`CommStats`.

    The group counts every byte it moves; the meter adds to ``stats`` the group's
    traffic while at least one of this optimizer's collectives is in flight. A group
    shared with other users at the same moments is therefore counted for both.
    ``syncs`` counts this optimizer's synchronizations and ``seconds_waited`` the
    time its ``step()`` spent blocked on results.
    """

    def __init__(self, group: GroupLike) -> None:
        self.stats = CommStats()
        self._group = group
        self._inflight = 0
        self._last: dict[str, Any] = self._snapshot()
        self._t_last = time.perf_counter()

    def _snapshot(self) -> dict[str, Any]:
        stats = getattr(self._group, "stats", None)
        return stats.as_dict() if stats is not None else {}

    def _observe(self) -> None:
        now = self._snapshot()
        t = time.perf_counter()
        if self._inflight > 0 and now:
            s = self.stats
            with s._lock:
                for name in _COUNTERS:
                    setattr(
                        s, name, getattr(s, name) + int(now[name]) - int(self._last.get(name, 0))
                    )
                s.seconds_in_comm += t - self._t_last
                old_peers = self._last.get("per_peer", {})
                for peer, counts in now.get("per_peer", {}).items():
                    mine = s.per_peer.setdefault(peer, PeerStats())
                    before = old_peers.get(peer, {})
                    for name, value in counts.items():
                        setattr(
                            mine, name, getattr(mine, name) + int(value) - int(before.get(name, 0))
                        )
        self._last, self._t_last = now, t

    def launched(self, count: int = 1) -> None:
        """Call just before handing ``count`` collectives to the group."""
        self._observe()
        self._inflight += count

    def finished(self, count: int = 1, *, waited: float = 0.0) -> None:
        """Call once ``count`` collectives have returned their results."""
        self._observe()
        self._inflight -= count
        with self.stats._lock:
            self.stats.seconds_waited += waited

    def count_sync(self) -> None:
        with self.stats._lock:
            self.stats.syncs += 1


def resolve_codec(codec: Any) -> Any:
    """``None`` (dense fp32), a spec string for ``lowband.compress.parse``, or a codec object."""
    if codec is None:
        return None
    if isinstance(codec, str):
        from lowband.compress import parse

        return parse(codec)
    if not hasattr(codec, "encode") or not hasattr(codec, "decode"):
        raise ConfigError(
            f"codec must be None, a spec string or a lowband codec, got {type(codec).__name__}"
        )
    return codec


def resolve_aggregate(aggregate: Any, codec: Any) -> str:
    """``aggregate=``: ``"mean"`` or a robust rule of ``Group.all_reduce``; ConfigError for
    an unknown rule or a rule the codec cannot support (a sparse codec sends a subset of
    positions, so there is no per-peer value to trim, take the median of or clip)."""
    from lowband.transport._robust import ROBUST_OPS

    if aggregate != "mean" and aggregate not in ROBUST_OPS:
        raise ConfigError(f"aggregate must be 'mean' or one of {sorted(ROBUST_OPS)}, got {aggregate!r}")
    if aggregate != "mean" and codec is not None and getattr(codec, "sparse", False):
        raise ConfigError(f"aggregate={aggregate!r} needs a dense codec; {codec} sends a subset of positions")
    return str(aggregate)


def resolve_error_feedback(error_feedback: Any, codec: Any) -> Any:
    """``None``/``False`` (off), ``True`` (decay 1.0), a float decay in (0, 1], or an ``ErrorFeedback``.

    ``True`` with ``codec=None`` is off: dense fp32 loses nothing to feed back.
    """
    if error_feedback is None or error_feedback is False:
        return None
    if codec is None:
        if error_feedback is True:
            return None
        raise ConfigError("error_feedback needs a codec: dense fp32 loses nothing to feed back")
    from lowband.compress import ErrorFeedback

    if isinstance(error_feedback, ErrorFeedback):
        return error_feedback
    if error_feedback is True:
        return ErrorFeedback(codec, decay=1.0)
    if isinstance(error_feedback, float) and 0.0 < error_feedback <= 1.0:
        return ErrorFeedback(codec, decay=error_feedback)
    raise ConfigError(
        f"error_feedback must be None, a bool, a decay in (0, 1] or an ErrorFeedback, got {error_feedback!r}"
    )


def amp_found_inf(opt: torch.optim.Optimizer) -> bool | None:
    """With ``_step_supports_amp_scaling = True``, ``torch.amp.GradScaler.step`` always
    calls ``step()`` and sets ``opt.found_inf`` (and ``opt.grad_scale`` while the
    gradients are still scaled). None when no scaler drives this step."""
    found_inf = getattr(opt, "found_inf", None)
    return None if found_inf is None else bool(found_inf.item())


def amp_unscale(opt: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> None:
    """Unscale gradients in place if GradScaler left them scaled, as ``unscale_`` would."""
    grad_scale = getattr(opt, "grad_scale", None)
    if grad_scale is not None:
        inv = grad_scale.double().reciprocal().float()
        for p in params:
            if p.grad is not None:
                p.grad.mul_(inv.to(p.grad.device))


def amp_skip_and_unscale(opt: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> bool:
    """True when GradScaler found an inf or nan on this peer; else unscale and return False."""
    if amp_found_inf(opt):
        return True
    amp_unscale(opt, params)
    return False


def check_finite_grads(opt: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> None:
    """CodecError if a gradient holds NaN or Inf; called before a step changes anything,
    so a step that raises leaves parameters, optimizer state and residuals as they were.
    One device sync per device (the flags of all its tensors are stacked)."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for p in params:
        g = p.grad
        if g is not None:
            v = g._values() if g.is_sparse else g
            flags.setdefault(v.device, []).append(torch.isfinite(v).all())
    for f in flags.values():
        if not bool(torch.stack(f).all()):
            raise CodecError(
                f"a gradient holds NaN or Inf: {type(opt).__name__}.step() changed nothing; "
                "skip this step (torch.amp.GradScaler does that for you)"
            )


def agree_on_start(
    group: GroupLike, meter: StatsMeter, config: dict[str, Any], buckets: list[Bucket]
) -> bool:
    """Collective: check ``config`` against every peer (ConfigMismatch names the
    difference), then compare a digest of the parameters with rank 0's and, if any
    peer differs, broadcast rank 0's parameters bucket by bucket. Returns whether
    parameters were broadcast. Nothing big is sent when the peers already agree.
    """
    if group.world_size == 1:
        return False
    meter.launched(1)
    try:
        group.verify(config)
    finally:
        meter.finished(1)
    h = hashlib.sha256()
    staging = torch.empty(max(b.numel for b in buckets), dtype=torch.float32)
    for b in buckets:
        gather_into(b, staging[: b.numel])
        h.update(staging[: b.numel].numpy().tobytes())
    digest = h.digest()
    # 16 float32 values of 16 bits each: exact in fp32 and in any reduction
    mine = torch.tensor(
        [int.from_bytes(digest[i : i + 2], "little") for i in range(0, 32, 2)], dtype=torch.float32
    )
    ref = mine.clone()
    meter.launched(2)
    # the lowest participant's parameters (rank 0, unless a drop-mode group lost it at start)
    src = min(getattr(group, "participants", None) or (0,))
    group.broadcast(ref, src=src).wait()
    flag = group.all_reduce(torch.tensor([float(not torch.equal(ref, mine))]), op="sum").wait()
    meter.finished(2)
    if float(flag[0]) == 0:
        return False
    logger.info("parameters differ between peers: broadcasting rank 0's (%d buckets)", len(buckets))
    meter.launched(len(buckets))
    with torch.no_grad():
        for b in buckets:
            buf = staging[: b.numel]
            gather_into(b, buf)
            group.broadcast(buf, src=src).wait()
            scatter_from(b, buf)
    meter.finished(len(buckets))
    return True
