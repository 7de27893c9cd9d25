"""The training methods ``lowband bench`` compares, each a small adapter over the library.

A method turns (model, group, settings) into a :class:`Stepper` whose ``step(x, y)``
runs one training step with whatever communication the method does. The adapters
only assemble public lowband parts; none of them has a fallback: a method whose
part is missing fails with the import error that says what is missing.

* ``ddp``: dense fp32 gradient all-reduce every step, bucketed and overlapped with
  backward (:mod:`lowband.bench._ddp`), then AdamW. The baseline.
* ``diloco``: DiLoCo (Douillard et al. 2023), AdamW inner steps, Nesterov outer
  step every ``sync_every`` steps, no compression.
* ``streaming-diloco-q4``: Streaming DiLoCo (Douillard et al. 2025): fragments
  synced at staggered steps, overlapped with inner steps, 4-bit payloads.
* ``sparseloco``: SparseLoCo (Sarfi et al. 2025): DiLoCo with top-k 64 of 4096,
  2-bit values and error feedback (decay 0.95), outer SGD with learning rate 1.
* ``demo``: DeMo (Peng, Quesnelle and Kingma 2024): decoupled momentum, DCT
  top-k, sign values, one-step-delayed exchange (overlap).
* ``grad:<codec spec>``: compressed gradients every step with error feedback,
  e.g. ``grad:topk:k=64,tile=4096+q2``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lowband.errors import ConfigError

__all__ = [
    "METHODS",
    "TrainConfig",
    "Stepper",
    "parse_methods",
    "build_method",
    "describe_method",
    "sync_every",
]

#: Fixed method names, in the order the default run uses them.
METHODS: tuple[str, ...] = ("ddp", "diloco", "streaming-diloco-q4", "sparseloco", "demo")
_GRAD = "grad:"


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters every worker uses; the same for every method unless the method says."""

    steps: int
    batch_size: int
    lr: float = 3e-3  # AdamW (inner) learning rate
    warmup: int = 20
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    sync_every: int = 50  # diloco and streaming-diloco-q4 (the H)
    sparseloco_sync_every: int = 10
    fragments: int = 2  # streaming DiLoCo
    overlap: int = 5  # streaming DiLoCo: inner steps a fragment's sync may run behind
    demo_lr: float = 2e-3
    demo_decay: float = 0.99  # tuned in docs/demo.md (0.999, DeMo's default, trails by 4 points)
    demo_topk: int = 8
    demo_chunk: int = 64
    bucket_bytes: int = 25 << 20  # ddp: torch DDP's default bucket cap

    def lr_factor(self, step: int) -> float:
        """Linear warm-up then cosine decay; ``step`` counts from 0."""
        import math

        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.steps - self.warmup)
        t = min(1.0, (step - self.warmup) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def parse_methods(text: str) -> list[str]:
    """Split the ``--methods`` list; commas inside a ``grad:`` codec spec stay with it.

    ``"ddp,grad:topk:k=64,tile=4096+q2,demo"`` -> ``["ddp", "grad:topk:k=64,tile=4096+q2", "demo"]``.
    Unknown names and codec specs that :func:`lowband.compress.parse` rejects raise
    :class:`ConfigError`.
    """
    out: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            raise ConfigError(f"empty method name in --methods {text!r}")
        if piece in METHODS or piece.startswith(_GRAD):
            out.append(piece)
        elif out and out[-1].startswith(_GRAD) and "=" in piece:
            out[-1] += "," + piece  # the rest of a codec spec's options
        else:
            raise ConfigError(
                f"unknown method {piece!r}; choose from {', '.join(METHODS)} or grad:<codec spec>"
            )
    for name in out:
        if name.startswith(_GRAD):
            spec = name[len(_GRAD) :]
            if not spec:
                raise ConfigError("grad: needs a codec spec, e.g. grad:topk:k=64,tile=4096+q2")
            from lowband.compress import parse

            parse(spec)  # raises ConfigError with the reason
    if len(set(out)) != len(out):
        raise ConfigError(f"a method appears twice in --methods {text!r}")
    return out


class Stepper:
    """One method's training step: ``step(x, y)`` returns the training loss of the batch."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        before_step: Callable[[], None] | None = None,
        finish: Callable[[], None] | None = None,
        close: Callable[[], None] | None = None,
        syncs: Callable[[], int] | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self._syncs = syncs
        self._before_step = before_step
        self._finish = finish
        self._close = close
        self._base_lrs = [g["lr"] for g in optimizer.param_groups]

    def set_lr_factor(self, factor: float) -> None:
        for g, base in zip(self.optimizer.param_groups, self._base_lrs):
            g["lr"] = base * factor

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        _, loss = self.model(x, y)
        loss.backward()
        if self._before_step is not None:
            self._before_step()
        self.optimizer.step()
        return float(loss.detach())

    @property
    def syncs(self) -> int:
        """Synchronizations so far: the optimizer's own count (``stats.syncs``) unless given."""
        if self._syncs is not None:
            return self._syncs()
        stats = getattr(self.optimizer, "stats", None)
        return int(getattr(stats, "syncs", 0))

    def finish(self) -> None:
        """Complete any communication still in flight (the run's last sync)."""
        if self._finish is not None:
            self._finish()

    def close(self) -> None:
        if self._close is not None:
            self._close()


def _adamw(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)


def _finisher(opt: Any) -> Callable[[], None] | None:
    fn = getattr(opt, "finish", None) or getattr(opt, "flush", None)
    return fn if callable(fn) else None


def build_method(name: str, model: torch.nn.Module, group: Any, cfg: TrainConfig) -> Stepper:
    """The :class:`Stepper` for method ``name`` (one of :data:`METHODS` or ``grad:<spec>``)."""
    if name == "ddp":
        from lowband.bench._ddp import BucketedAllReduce

        reducer = BucketedAllReduce(model.parameters(), group, bucket_bytes=cfg.bucket_bytes)
        return Stepper(
            model,
            _adamw(model, cfg),
            before_step=reducer.wait,
            close=reducer.remove,
            syncs=lambda: reducer.syncs,
        )
    if name == "sparseloco":
        from lowband.optim import sparseloco

        opt = sparseloco(_adamw(model, cfg), group=group, sync_every=cfg.sparseloco_sync_every)
        return Stepper(model, opt, finish=_finisher(opt))
    if name in ("diloco", "streaming-diloco-q4"):
        from lowband.optim import DiLoCo

        opt = DiLoCo(_adamw(model, cfg), group=group, **_diloco_kwargs(name, cfg))
        return Stepper(model, opt, finish=_finisher(opt))
    if name == "demo":
        from lowband.distro import DeMo

        opt = DeMo(
            model.parameters(),
            lr=cfg.demo_lr,
            group=group,
            topk=cfg.demo_topk,
            chunk=cfg.demo_chunk,
            sign=True,
            decay=cfg.demo_decay,
            overlap=True,
        )
        return Stepper(model, opt, finish=_finisher(opt))
    if name.startswith(_GRAD):
        from lowband.optim import CompressedGradients

        opt = CompressedGradients(
            _adamw(model, cfg), group=group, codec=name[len(_GRAD) :], error_feedback=True
        )
        return Stepper(model, opt, finish=_finisher(opt))
    raise ConfigError(f"unknown method {name!r}")


def _diloco_kwargs(name: str, cfg: TrainConfig) -> dict[str, Any]:
    if name == "diloco":
        return {
            "sync_every": cfg.sync_every,
            "outer_lr": 0.7,
            "outer_momentum": 0.9,
            "nesterov": True,
        }
    if name == "streaming-diloco-q4":
        return {
            "sync_every": cfg.sync_every,
            "outer_lr": 0.7,
            "outer_momentum": 0.9,
            "nesterov": True,
            "codec": "q4",
            "fragments": cfg.fragments,
            "overlap": cfg.overlap,
        }
    raise ConfigError(f"{name!r} is not a DiLoCo method")


def sync_every(name: str, cfg: TrainConfig) -> int:
    """Training steps between two of the method's synchronizations (1: every step).

    Streaming DiLoCo syncs each of its fragments every ``sync_every`` steps, staggered, so
    it counts ``fragments`` syncs per ``sync_every`` steps.
    """
    if name in ("diloco", "streaming-diloco-q4"):
        return cfg.sync_every
    if name == "sparseloco":
        return cfg.sparseloco_sync_every
    return 1  # ddp, demo and grad:<codec> exchange every step


def describe_method(name: str, cfg: TrainConfig) -> dict[str, Any]:
    """The settings a method ran with, for the results file."""
    if name == "ddp":
        return {
            "optimizer": "AdamW",
            "lr": cfg.lr,
            "all_reduce": "fp32 mean, bucketed, overlapped",
            "bucket_bytes": cfg.bucket_bytes,
        }
    if name == "sparseloco":
        from lowband.optim import SPARSELOCO_CODEC

        return {
            "recipe": "lowband.optim.sparseloco",
            "inner": "AdamW",
            "lr": cfg.lr,
            "sync_every": cfg.sparseloco_sync_every,
            "codec": SPARSELOCO_CODEC,
            "error_feedback_decay": 0.95,
            "outer": "SGD lr 1.0, no momentum",
        }
    if name in ("diloco", "streaming-diloco-q4"):
        return {"inner": "AdamW", "lr": cfg.lr, **_diloco_kwargs(name, cfg)}
    if name == "demo":
        return {
            "optimizer": "DeMo",
            "lr": cfg.demo_lr,
            "decay": cfg.demo_decay,
            "topk": cfg.demo_topk,
            "chunk": cfg.demo_chunk,
            "sign": True,
            "overlap": True,
        }
    return {"inner": "AdamW", "lr": cfg.lr, "codec": name[len(_GRAD) :], "error_feedback": True}
