"""Rollout commitments: bind a rollout's tokens to the model that produced them (TOPLOC's idea).

An actor could send rollouts made by another model (a stale or altered policy), or edit
tokens after sampling. A commitment lets a validator (or the learner) catch both by
recomputing one prefill with the fingerprinted weights. For every token the actor
records the ``k`` largest-magnitude entries of the last layer's hidden state (index u16,
value bf16: ``4 k`` bytes a token, 384 bytes per 32 tokens at the default ``k=3``).

- An altered token has another hidden state (its own embedding is in it): its committed
  indices are not among the validator's top entries, or their values are far off.
- Another model (even one optimizer step away) moves every value a little: the median
  relative error over a block of ``block`` tokens rises above ``rtol``.
- Other numerics (bf16 against fp32, other kernels and batch shapes) move values by a
  fraction of a percent, under both thresholds (``benchmarks/bench_commit.py``).

After Ong et al., *TOPLOC: A Locality Sensitive Hashing Scheme for Trustless Verifiable
Inference* (2025): top-k activations, a few hundred bytes per 32 tokens, checked by one
prefill. This is a plain encoding (per token, not TOPLOC's polynomial over a block).

Byte layout (little-endian): ``b"LBCM"``, u8 version 1, u8 block, u16 k, u32 tokens,
then ``tokens x k`` u16 indices and ``tokens x k`` bf16 values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowband._frames import Layout
from lowband.errors import CodecError, ConfigError

__all__ = ["Commitment", "Verdict", "commit", "hidden_states", "verify"]

_MAGIC = b"LBCM"
#: After magic and version 1: block, k, tokens.
_HEAD = Layout("rollout commitment", _MAGIC, 1, "BHI")
_MAX_TOKENS = 1 << 24

HiddenFn = Callable[[torch.Tensor], torch.Tensor]


def hidden_states(model: torch.nn.Module) -> HiddenFn:
    """For a Hugging Face causal LM: token ids ``(T,)`` -> last layer's hidden states ``(T, H)``."""

    def run(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = model(input_ids=ids.reshape(1, -1), output_hidden_states=True)
        return out.hidden_states[-1][0]

    return run


@dataclass(frozen=True)
class Commitment:
    """Per token, the top-``k`` (index, bf16 value) of the last layer's hidden state."""

    block: int
    k: int
    indices: torch.Tensor  # (tokens, k) int64
    values: torch.Tensor  # (tokens, k) bfloat16

    @property
    def tokens(self) -> int:
        return int(self.indices.shape[0])

    @property
    def nbytes(self) -> int:
        return _HEAD.size + 4 * self.k * self.tokens

    def to_bytes(self) -> bytes:
        head = _HEAD.pack(self.block, self.k, self.tokens)
        idx = self.indices.to(torch.int32).numpy().astype("<u2").tobytes()
        val = self.values.contiguous().view(torch.int16).numpy().astype("<i2").tobytes()
        return head + idx + val

    @classmethod
    def from_bytes(cls, data: bytes) -> Commitment:
        """Parse :meth:`to_bytes`; CodecError on anything malformed."""
        block, k, tokens = _HEAD.unpack(data)
        if block < 1 or k < 1 or tokens > _MAX_TOKENS:
            raise CodecError(f"commitment with block {block}, k {k}, {tokens} tokens")
        n = tokens * k
        if len(data) != _HEAD.size + 4 * n:
            raise CodecError(f"commitment of {len(data)} bytes, {_HEAD.size + 4 * n} expected")
        body = memoryview(data)[_HEAD.size :]
        idx = (
            torch.frombuffer(bytearray(body[: 2 * n]), dtype=torch.int16)
            if n
            else torch.zeros(0, dtype=torch.int16)
        )
        val = (
            torch.frombuffer(bytearray(body[2 * n :]), dtype=torch.int16)
            if n
            else torch.zeros(0, dtype=torch.int16)
        )
        indices = idx.to(torch.int32).bitwise_and(0xFFFF).to(torch.int64).reshape(tokens, k)
        return cls(block, k, indices, val.view(torch.bfloat16).reshape(tokens, k))


def commit(
    hidden: HiddenFn | torch.nn.Module | None,
    ids: torch.Tensor,
    *,
    block: int = 32,
    k: int = 3,
    states: torch.Tensor | None = None,
) -> Commitment:
    """The commitment of token ids ``ids`` (prompt and completion, ``(T,)``).

    ``hidden`` gives the last layer's hidden states ``(T, H)`` for the ids (a Hugging Face
    causal LM module is wrapped by :func:`hidden_states`); or pass ``states`` computed
    during generation or in a batch. ``k`` entries per token, checked in blocks of ``block``.
    """
    if not 1 <= block <= 255 or not 1 <= k <= 64:
        raise ConfigError(f"block must be in 1..255 and k in 1..64, got {block}, {k}")
    ids = ids.reshape(-1)
    if states is None:
        if hidden is None:
            raise ConfigError("pass the model (or a hidden-states function), or states=")
        fn = hidden_states(hidden) if isinstance(hidden, torch.nn.Module) else hidden
        states = fn(ids)
    if states.dim() != 2 or states.shape[0] != ids.numel():
        raise ConfigError(f"hidden states of shape {tuple(states.shape)} for {ids.numel()} tokens")
    if states.shape[1] > 65536 or k > states.shape[1]:
        raise ConfigError(f"k={k} of hidden size {states.shape[1]} (at most 65536)")
    h = states.float()
    top = h.abs().topk(k, dim=1).indices
    return Commitment(block, k, top, h.gather(1, top).to(torch.bfloat16))


@dataclass(frozen=True)
class Verdict:
    """A check's outcome: ``ok``, the reason if not, and per block the median relative error."""

    ok: bool
    errors: tuple[float, ...]
    reason: str = ""


def verify(
    hidden: HiddenFn | torch.nn.Module | None,
    ids: torch.Tensor,
    c: Commitment,
    *,
    rtol: float = 0.02,
    token_rtol: float = 0.05,
    rank: int = 2,
    states: torch.Tensor | None = None,
) -> Verdict:
    """Recompute the hidden states of ``ids`` with the validator's model (or take its
    ``states``, computed in a batch) and check ``c`` against them.

    Rejected when, for any token, a committed value is off by more than ``token_rtol``
    (relative) or a committed index is not among the validator's top ``rank * k`` of that
    token (an altered token, whose own hidden state is another), or when a block's median
    relative error exceeds ``rtol`` (another model: every value moves a little).
    """
    ids = ids.reshape(-1)
    if c.tokens != ids.numel():
        return Verdict(False, (), f"commitment covers {c.tokens} tokens, rollout has {ids.numel()}")
    if states is None:
        if hidden is None:
            raise ConfigError("pass the model (or a hidden-states function), or states=")
        fn = hidden_states(hidden) if isinstance(hidden, torch.nn.Module) else hidden
        states = fn(ids)
    h = states.float()
    if c.tokens == 0:
        return Verdict(True, ())
    if int(c.indices.max()) >= h.shape[1]:
        return Verdict(False, (), "commitment indices outside the hidden size")
    mine = h.gather(1, c.indices)
    rel = (mine - c.values.float()).abs() / mine.abs().clamp_min(1e-6)
    own = h.abs().topk(min(h.shape[1], rank * c.k), dim=1).indices
    ranked = (c.indices.unsqueeze(2) == own.unsqueeze(1)).any(dim=2).all(dim=1)
    token_bad = (rel.max(dim=1).values > token_rtol) | ~ranked
    n = -(-c.tokens // c.block)
    errors = [float(rel[b * c.block : (b + 1) * c.block].median()) for b in range(n)]
    if bool(token_bad.any()):
        t = int(token_bad.nonzero()[0])
        return Verdict(
            False,
            tuple(errors),
            f"token {t}: its hidden state is not the committed one (relative error "
            f"{float(rel[t].max()):.3g}, in top {rank * c.k}: {bool(ranked[t])})",
        )
    for b, e in enumerate(errors):
        if e > rtol:
            return Verdict(
                False, tuple(errors), f"block {b}: median relative error {e:.3g} over {rtol}"
            )
    return Verdict(True, tuple(errors))
