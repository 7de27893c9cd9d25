"""Pieces the optimizer wrappers share: the group protocol they program against,
per-optimizer byte counters, codec and error-feedback arguments, and GradScaler support.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from lowband.errors import ConfigError
from lowband.transport import CommStats, PeerStats

__all__ = [
    "GroupLike",
    "WorkLike",
    "StatsMeter",
    "Ready",
    "resolve_codec",
    "resolve_error_feedback",
    "amp_skip_and_unscale",
]


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


def amp_skip_and_unscale(opt: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> bool:
    """GradScaler support for optimizers with ``_step_supports_amp_scaling = True``.

    ``torch.amp.GradScaler.step`` then always calls ``step()`` and sets
    ``opt.found_inf`` and ``opt.grad_scale`` (the latter only while the gradients
    are still scaled). Returns True when this peer found an inf or nan; otherwise
    unscales the gradients in place, as ``GradScaler.unscale_`` would, and returns False.
    """
    found_inf = getattr(opt, "found_inf", None)
    if found_inf is not None and bool(found_inf.item()):
        return True
    grad_scale = getattr(opt, "grad_scale", None)
    if grad_scale is not None:
        inv = grad_scale.double().reciprocal().float()
        for p in params:
            if p.grad is not None:
                p.grad.mul_(inv.to(p.grad.device))
    return False
