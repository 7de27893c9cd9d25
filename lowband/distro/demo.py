"""DeMo: decoupled momentum optimization (Peng, Quesnelle and Kingma 2024, arXiv:2411.19870).

The published algorithm behind DisTrO. Each peer keeps its own momentum and sends
only its fast-moving components; the slow ones stay in the momentum and build up
until they are sent (the momentum is the error-feedback buffer). Per parameter and
step, with ``m`` in fp32 whatever the parameter's dtype::

    p   *= 1 - lr * weight_decay                 # decoupled weight decay
    m    = decay * m + lr * grad
    c    = DCT-II of chunk x chunk tiles of m    # lowband.compress._dct
    q    = top-k of each tile of c, values coded # one payload per bucket (_wire)
    m   -= IDCT(decoded q)                       # what was sent leaves the momentum
    Q    = mean over participants of every peer's decoded q
    u    = IDCT(Q); if sign: u = sign(u)
    p   -= lr * u

The DCT is linear and orthonormal, so a parameter of two or more dimensions keeps
``M = c`` itself, its momentum's coefficients: ``M = decay * M + lr * DCT(grad)``,
``M -= decoded q``, then the padded area of the tiles that have one is projected out
(``TileLayout.project_padding``: what the cropped spatial momentum would hold). That
is the algorithm above in exact arithmetic, with one transform of the gradients and
one of the combined update per bucket and step, instead of three (the state format:
:mod:`lowband.distro._state`).

A param group's 1-D parameters (biases, norm gains) are packed into one vector and
tiled with the matrices' ``chunk x chunk`` tiles, so they travel at the same density
and usually in the same payload (:func:`lowband.distro._bucket.packed_layout`). The packing is redone
each step from the parameters that have a gradient, so these keep ``m`` in their own
shape and follow the steps above literally.

(``lr`` enters twice, as in the authors' reference code: once scaling what the
momentum collects, once scaling the update.) Peers' payloads are combined in
rank order in fp32, so every peer applies bit-identical updates. With
``overlap=True`` the exchange of step t runs in the background while the caller
computes the gradients of step t+1, and its update is applied at step t+1 (the
one-step-delayed variant); weight decay and the momentum update still happen at
the step that produced the gradient.

Across islands (docs/islands.md), ``DeMo(..., group=island_group)`` builds an
:class:`IslandDeMo`. DeMo's state follows each parameter's shape (DCT tiles of ``chunk x chunk`` over a whole
matrix), which FSDP2's row shards cut. So the canonical layout here is made of whole
parameters (``ShardPlan(cut="params")``): segment ``s`` is a run of whole parameters,
owned in each island by one rank, which holds a full copy (a *proxy*) of each of them and
runs a plain :class:`DeMo` over the proxies with that segment's flow.
Each step gathers the island's gradients into the owners' proxies, steps every owned
segment's DeMo, and scatters the new values back into the island's shards. Each rank
keeps the proxies and DeMo state of its own segments only, about ``1/L`` of the model's.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from lowband.compress import Payload, dct2
from lowband.distro._bucket import Entry, buckets, param_layout, per_param, spans, split
from lowband.distro._state import MOMENTUM, MOMENTUM_DCT, TILING, checked_state
from lowband.distro._state import PENDING as _PENDING
from lowband.distro._wire import BucketCodec, bucket_codec, combine, value_spec
from lowband.errors import CodecError, ConfigError, ConfigMismatch, TransportError
from lowband.transport import CommStats, agree_on_start
from lowband.transport._join import fingerprint, heal, joining, welcome
from lowband.transport._shards import ShardPlan

__all__ = ["DeMo", "IslandDeMo"]

log = logging.getLogger(__name__)


@dataclass
class _Bucket:
    """One payload's worth of one step: entries of one param group with equal tile shape."""

    group: dict[str, Any]
    codec: BucketCodec
    entries: list[Entry]
    payload: Payload
    work: Any = None

    @property
    def numel(self) -> int:
        return sum(e.layout.numel for e in self.entries)


@dataclass
class _Exchange:
    buckets: list[_Bucket] = field(default_factory=list)


def _check(g: dict[str, Any]) -> None:
    """Raise ConfigError for a bad hyperparameter of a param group."""
    lr, decay, wd = g["lr"], g["decay"], g["weight_decay"]
    if isinstance(lr, torch.Tensor):
        raise ConfigError("DeMo takes a float lr, not a tensor")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ConfigError(f"Invalid learning rate: {lr!r} (a finite float >= 0)")
    if not (isinstance(decay, (int, float)) and 0.0 <= decay <= 1.0):
        raise ConfigError(f"Invalid decay: {decay!r} (a float in [0, 1])")
    if not (isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0):
        raise ConfigError(f"Invalid weight_decay: {wd!r} (a finite float >= 0)")
    k, chunk = g["topk"], g["chunk"]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 256:
        raise ConfigError(f"Invalid topk: {k!r} (an int in 1..256, coefficients kept per tile)")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= 256:
        raise ConfigError(f"Invalid chunk: {chunk!r} (an int in 1..256, the DCT tile side)")
    if not isinstance(g["sign"], bool):
        raise ConfigError(f"Invalid sign: {g['sign']!r} (True or False)")


class DeMo(torch.optim.Optimizer):
    """DeMo as a ``torch.optim.Optimizer`` over a lowband ``Group``.

    Args:
        params: parameters or param groups (each group may override any hyperparameter
            below except ``group`` and ``overlap``).
        lr: learning rate (also scales what the momentum collects; see the module docstring).
        group: the lowband group to exchange with (``lowband.init_group``); one peer works.
        decay: momentum decay per step.
        topk: DCT coefficients sent per tile (at most 256).
        chunk: side of the DCT tiles (at most 256: tiles of chunk x chunk values).
        sign: apply the sign of the combined update (signSGD-style), as DeMo does.
        weight_decay: decoupled weight decay.
        codec: value codec of the sent coefficients (a ``lowband.compress`` spec such as
            ``"q4"`` or ``"fp16"``, no ``dct``/``topk`` stage); default: 1-bit signs with
            one scale per tile.
        overlap: run step t's exchange during step t+1 (one-step-delayed updates).
        aggregate: only ``"mean"``: DeMo all-gathers each peer's top-k DCT coefficients
            (a different subset per peer), so the robust rules of the dense all-reduce
            (``"trimmed_mean"``, ``"median"``, ``"norm_clip"``) raise ConfigError.

    ``opt.stats`` (a :class:`~lowband.transport.CommStats`) adds up the exact counts of
    this optimizer's exchanges (each ``Work``'s): each step sends this rank's payload to,
    and receives one payload from, every other participant. The start-up handshake is not
    counted; heartbeats and acknowledgements are the group's alone (``group.stats``).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # islands (docs/islands.md): whole-parameter segments, a DeMo per owned segment
        group = kwargs.get("group")
        if hasattr(group, "flows") and hasattr(group, "island"):
            return IslandDeMo(*args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        *,
        group: Any,
        decay: float = 0.999,
        topk: int = 32,
        chunk: int = 64,
        sign: bool = True,
        weight_decay: float = 0.0,
        codec: Any = None,
        overlap: bool = False,
        aggregate: str = "mean",
    ) -> None:
        if aggregate != "mean":
            raise ConfigError(
                f"DeMo cannot use aggregate={aggregate!r}: it all-gathers sparse top-k coefficients "
                "(a different subset per peer); only 'mean' is supported"
            )
        if group is None:
            raise ConfigError(
                "DeMo needs a group (lowband.init_group(...)); a single peer is a group of 1"
            )
        if not isinstance(overlap, bool):
            raise ConfigError(f"Invalid overlap: {overlap!r} (True or False)")
        defaults = dict(
            lr=lr,
            decay=decay,
            topk=topk,
            chunk=chunk,
            sign=sign,
            weight_decay=weight_decay,
            codec=codec,
        )
        self.group = group
        self.overlap = overlap
        self.stats = CommStats()
        self._inflight: _Exchange | None = None
        super().__init__(params, defaults)
        # Joining a running group (a restart): no start-up collective, the members are past
        # it; the first step() takes the live parameters (see step()).
        self._joining = joining(group)
        self._welcome_due = False
        self._welcomes: list[Any] = []
        if not self._joining:
            agree_on_start(
                group, self._handshake(), [p for g in self.param_groups for p in g["params"]]
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        _check(g)
        g["codec"] = value_spec(g["codec"])
        for p in g["params"]:
            if p.is_complex() or not p.is_floating_point():
                raise ConfigError(f"DeMo optimizes real floating-point parameters, got {p.dtype}")

    def _handshake(self) -> dict[str, Any]:
        """What every peer must agree on: settings, and each parameter's shape and dtype."""
        groups = []
        for g in self.param_groups:
            hyper = {k: g[k] for k in self.defaults}
            # requires_grad=False parameters never have a gradient, so they are never sent;
            # every peer must agree on which ones they are
            hyper["params"] = [
                [list(p.shape), str(p.dtype), bool(p.requires_grad)] for p in g["params"]
            ]
            groups.append(hyper)
        return {"optimizer": "lowband.DeMo", "overlap": self.overlap, "param_groups": groups}

    # -- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One DeMo step; ``closure`` (re-evaluating the loss) runs first, as in torch optimizers."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._joining:
            # the first step of a rank that entered a running group: the members' parameters
            # (checked by fingerprint); this step sends zeros (the gradient was computed on the
            # parameters from before) and the momenta start fresh
            self._heal()
            for p in self._params():
                if p.grad is not None:
                    p.grad.zero_()
        self._check_grads()  # a step that raises must leave parameters and state as they were
        if self.overlap:
            # Step t's exchange is queued behind step t-1's before waiting for t-1, so t-1's
            # also overlaps the encoding of t. Same arithmetic as resolving first: resolving
            # only reads what arrived, and the parameters change in the same order.
            launched = self._launch()
            self._resolve()  # step t-1's exchange ran while the caller computed these gradients
            self._inflight = launched
            self._apply_pending()
        else:
            self._inflight = self._launch()
            self._resolve()
            self._apply_pending()
        if self._welcome_due:
            self._welcome()
        return loss

    # -- joining (issue 16; the protocol is in lowband/transport/_join.py) --------------------

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _welcome(self) -> None:
        """Members: ranks wait to join; let them in and offer the parameters."""
        self._welcome_due = False
        self.flush()  # nothing in flight: the parameters offered are this step's
        self._welcome_due = False
        state = {"params": [p.detach().to("cpu") for p in self._params()]}
        self._welcomes = welcome(self.group, self._handshake(), state, fingerprint(self._params()))

    def _heal(self) -> None:
        state, fp = heal(self.group, self._handshake())
        saved, params = state.get("params"), self._params()
        if not isinstance(saved, list) or len(saved) != len(params):
            raise ConfigMismatch("the state a member sent does not match these parameters")
        for p, t in zip(params, saved):
            if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                raise ConfigMismatch("the state a member sent does not match these parameters")
            p.copy_(t.to(device=p.device, dtype=p.dtype))
        self.state.clear()  # momenta of this peer's old run (a checkpoint) do not fit the new point
        mine = fingerprint(params)
        if mine != fp:
            raise TransportError(f"rank {self.group.rank}: the parameters taken on joining have "
                                 f"fingerprint {mine[:16]}, the member sent {fp[:16]}")
        self._joining = False

    def _check_grads(self) -> None:
        """ConfigError for a sparse gradient, CodecError for NaN or Inf, before anything changes
        (one device sync per device: the flags of all its gradients are stacked)."""
        flags: dict[torch.device, list[torch.Tensor]] = {}
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None or not p.requires_grad:
                    continue
                if p.grad.is_sparse:
                    raise ConfigError("DeMo does not take sparse gradients")
                flags.setdefault(p.grad.device, []).append(torch.isfinite(p.grad).all())
        for f in flags.values():
            if not bool(torch.stack(f).all()):
                raise CodecError(
                    "a gradient holds NaN or Inf: DeMo.step() changed nothing (parameters, "
                    "momenta and any exchange in flight are as they were); skip this step"
                )

    @torch.no_grad()
    def flush(self) -> None:
        """Wait for the exchange in flight (``overlap=True``) and apply its update now.

        Call it at the end of training so the last step's update is not left pending.
        """
        self._resolve()
        self._apply_pending()

    def _launch(self) -> _Exchange:
        """Update momenta, encode and subtract what is sent, start the all-gathers."""
        ex = _Exchange()
        for g in self.param_groups:
            lr, decay, wd = g["lr"], g["decay"], g["weight_decay"]
            matrices: list[torch.Tensor] = []
            vectors: list[torch.Tensor] = []  # 1-D and 0-D: packed into one layout
            for p in g["params"]:
                if p.grad is None or not p.requires_grad:
                    continue  # no gradient (or frozen): no weight decay, no momentum decay, nothing sent
                if p.grad.is_sparse:
                    raise ConfigError("DeMo does not take sparse gradients")
                if wd:
                    p.mul_(1.0 - lr * wd)
                (vectors if p.dim() <= 1 else matrices).append(p)
            for p in vectors:  # the packed parameters keep their momentum in their own shape
                st = self.state[p]
                if MOMENTUM not in st:
                    st[MOMENTUM] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            if vectors:  # one multi-tensor launch each, not one per parameter (GPU: launch-bound)
                vm = [self.state[p][MOMENTUM] for p in vectors]
                torch._foreach_mul_(vm, decay)
                torch._foreach_add_(vm, [p.grad for p in vectors], alpha=lr)
            for entries in buckets(matrices, vectors, g["chunk"]):
                ex.buckets.append(self._encode(g, entries))
        for b in ex.buckets:
            b.work = self.group.all_gather(b.payload)
        return ex

    def _encode(self, g: dict[str, Any], entries: list[Entry]) -> _Bucket:
        """Fold one bucket's gradients into its momenta, encode, take what is sent out.

        One forward DCT for the whole bucket (the gradients' tiles of the matrices, the
        packed momentum of the 1-D parameters); the matrices' momenta are updated in the
        DCT domain, so what is sent leaves them without an inverse transform.
        """
        tr, tc = entries[0].layout.tile_shape
        bc = bucket_codec(tr * tc, topk=g["topk"], value=g["codec"])
        runs = spans(entries)
        tiles = torch.empty(
            runs[-1][1], tr, tc, dtype=torch.float32, device=entries[0].params[0].device
        )
        for e, (a, b) in zip(entries, runs):
            src = self._packed_momentum(e) if e.packed else e.params[0].grad
            e.layout.tiles_into(src, tiles[a:b])
        coeffs = dct2(tiles).view(len(tiles), tr * tc)
        mats = [(e, coeffs[a:b]) for e, (a, b) in zip(entries, runs) if not e.packed]
        momenta = [self._momentum_dct(e) for e, _ in mats]
        parts = [part for _, part in mats]
        if parts:  # m = decay * m + lr * DCT(grad), written into the bucket's coefficients
            torch._foreach_mul_(parts, g["lr"])
            torch._foreach_add_(parts, momenta, alpha=g["decay"])
        payload = bc.codec.encode(coeffs.reshape(-1))
        sent = torch.empty_like(coeffs)  # decoded where the momentum lives
        bc.codec.decode_into(payload, sent.view(-1), accumulate=False)
        coeffs.sub_(sent)  # what was sent leaves the momentum
        for e, part in mats:
            e.layout.project_padding(part)  # see docs/demo.md, "Momentum in the DCT domain"
        if parts:
            torch._foreach_copy_(momenta, parts)
        for e, (a, b) in zip(entries, runs):
            if e.packed:
                back = e.layout.untile(dct2(sent[a:b].view(-1, tr, tc), inverse=True))
                ms, sub = [], []
                for p, part in split(back, e.params):
                    ms.append(self.state[p][MOMENTUM])
                    sub.append(part.to(ms[-1].device))
                torch._foreach_sub_(ms, sub)
        return _Bucket(g, bc, entries, payload)

    def _momentum_dct(self, e: Entry) -> torch.Tensor:
        p, lay = e.params[0], e.layout
        st = self.state[p]
        if MOMENTUM_DCT not in st:
            st[MOMENTUM_DCT] = torch.zeros(
                lay.ntiles, lay.tile_numel, dtype=torch.float32, device=p.device
            )
        m = st[MOMENTUM_DCT]
        if tuple(m.shape) != (lay.ntiles, lay.tile_numel):
            raise ConfigError(
                f"the DCT momentum of a parameter of shape {tuple(p.shape)} has shape "
                f"{tuple(m.shape)}, not {(lay.ntiles, lay.tile_numel)}: chunk cannot change "
                "once a parameter has momentum"
            )
        return m

    def _packed_momentum(self, e: Entry) -> torch.Tensor:
        if len(e.params) == 1:
            return self.state[e.params[0]][MOMENTUM]
        dev = self.state[e.params[0]][MOMENTUM].device
        return torch.cat([self.state[p][MOMENTUM].reshape(-1).to(dev) for p in e.params])

    def momentum(self, p: torch.Tensor) -> torch.Tensor | None:
        """``p``'s momentum in ``p``'s shape (fp32, a new tensor), or None before its first step.

        Parameters of two or more dimensions keep their momentum as DCT coefficients
        (``state[p]["momentum_dct"]``); this is their inverse transform.
        """
        st = self.state.get(p, {})
        if MOMENTUM in st:
            return st[MOMENTUM].clone()
        if MOMENTUM_DCT not in st:
            return None
        chunk = next(g["chunk"] for g in self.param_groups if any(q is p for q in g["params"]))
        return param_layout(p.shape, chunk).inverse(st[MOMENTUM_DCT])

    def _resolve(self) -> None:
        """Wait for the exchange in flight and store each parameter's update in its state."""
        ex, self._inflight = self._inflight, None
        if ex is None:
            return
        for w in self._welcomes:  # the last welcome's errors (a drop of this rank) surface here
            w.wait()
            self.stats.add(w.stats)
        self._welcomes = []
        for b in ex.buckets:
            payloads = list(b.work.wait())
            self.stats.add(b.work.stats)
            if getattr(b.work, "waiting", ()):
                self._welcome_due = True  # the same decision reached every member: all welcome
            mean, _ = combine(b.codec.codec, payloads, b.numel, b.entries[0].params[0].device)
            update = dct2(mean.view(-1, *b.entries[0].layout.tile_shape), inverse=True)
            if b.group["sign"]:
                update.sign_()
            update.mul_(-b.group["lr"])
            for p, part in per_param(update, b.entries):
                # often a view of the bucket's update: no copy (a state_dict saves the
                # shared storage once; load_state_dict makes each its own tensor)
                self.state[p][_PENDING] = part.to(p.device)
        self.stats.count_sync()

    def _apply_pending(self) -> None:
        by_kind: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
        for g in self.param_groups:
            for p in g["params"]:
                st = self.state.get(p)
                if st and _PENDING in st:
                    ps, us = by_kind.setdefault((p.device, p.dtype), ([], []))
                    ps.append(p)
                    us.append(st.pop(_PENDING).to(p.dtype))
        for ps, us in by_kind.values():  # one multi-tensor add per device and dtype
            torch._foreach_add_(ps, us)

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Torch's state dict; an exchange in flight is finished first so its update is saved."""
        self._resolve()
        sd = super().state_dict()
        sd["tiling"] = TILING  # how N-D momenta are laid out (see lowband.distro._state)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, keeping every saved buffer's dtype (torch would cast fp32 momentum to bf16).

        The whole state dict is checked first (see :mod:`lowband.distro._state`): anything
        malformed raises ConfigError and leaves the optimizer as it was.
        """
        self._resolve()
        saved = checked_state(
            state_dict, [g["params"] for g in self.param_groups], check_group=_check_saved
        )
        super().load_state_dict(state_dict)
        for p, bufs in saved.items():
            self.state[p] = {k: v.to(device=p.device, copy=True) for k, v in bufs.items()}
        for g in self.param_groups:
            g["codec"] = value_spec(g["codec"])


def _check_saved(g: dict[str, Any]) -> None:
    """Raise ConfigError for a saved param group that lacks a hyperparameter or has a bad one."""
    missing = [
        k for k in ("lr", "decay", "weight_decay", "topk", "chunk", "sign", "codec") if k not in g
    ]
    if missing:
        raise ConfigError(f"a saved DeMo param group lacks {missing}")
    _check(g)
    value_spec(g["codec"])


# -- across islands -----------------------------------------------------------------------

#: The per-group hyperparameters a learning-rate schedule (or the user) may change between steps.
_LIVE = ("lr", "decay", "weight_decay")


class IslandDeMo(torch.optim.Optimizer):
    """What ``DeMo(params, group=<IslandGroup>, ...)`` builds; the same arguments as DeMo."""

    def __init__(self, params: Iterable[Any], lr: float, *, group: Any, **kwargs: Any) -> None:
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
