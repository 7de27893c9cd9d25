"""Pieces the optimizer wrappers share: the group protocol they program against,
adding up their collectives' counts, codec and error-feedback arguments, and GradScaler
support.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from lowband.errors import CodecError, ConfigError
from lowband.transport import CommStats

__all__ = [
    "amp_found_inf",
    "amp_unscale",
    "GroupLike",
    "WorkLike",
    "wait_counted",
    "Ready",
    "resolve_aggregate",
    "resolve_codec",
    "resolve_error_feedback",
    "amp_skip_and_unscale",
    "check_finite_grads",
]

logger = logging.getLogger(__name__)


class WorkLike(Protocol):
    stats: CommStats

    def wait(self) -> Any: ...


class GroupLike(Protocol):
    """The part of ``lowband.init_group``'s Group that the optimizers use."""

    rank: int
    world_size: int
    stats: CommStats

    def all_reduce(self, tensor: torch.Tensor, **kwargs: Any) -> WorkLike: ...

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> WorkLike: ...

    def verify(self, config: Any, *, stats: CommStats | None = None) -> None: ...


class Ready:
    """A finished collective restored from a checkpoint: ``wait()`` returns its result.

    Its ``stats`` are empty: the collective's counts were added when it was waited for."""

    def __init__(self, result: torch.Tensor) -> None:
        self.result = result
        self.stats = CommStats()

    def wait(self) -> torch.Tensor:
        return self.result


def wait_counted(works: list[Any], stats: CommStats) -> list[Any]:
    """Wait for ``works`` in order and add each one's exact counts to ``stats``."""
    out = []
    for w in works:
        out.append(w.wait())
        stats.add(w.stats)
    return out


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
