"""A small character-level (byte-level) transformer for the benchmark and the examples.

A decoder-only GPT in the style of nanoGPT: token and position embeddings, pre-norm
blocks of causal self-attention and an MLP, a final LayerNorm and an output layer
tied to the token embedding. Sizes come from :class:`ModelConfig`; named presets
in :data:`PRESETS` keep the benchmark's budgets on a 2-core machine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from lowband.bench.data import VOCAB_SIZE, get_batch
from lowband.errors import ConfigError

__all__ = ["ModelConfig", "PRESETS", "CharTransformer", "model_config", "evaluate_loss"]


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = VOCAB_SIZE
    block_size: int = 64  # context length T
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64  # channels C
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"ModelConfig.n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


#: Named sizes. ``tiny`` is for tests, ``small`` for the default benchmark, ``base`` for longer runs.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(block_size=32, n_layer=1, n_head=2, n_embd=32),
    "small": ModelConfig(block_size=64, n_layer=2, n_head=4, n_embd=64),
    "base": ModelConfig(block_size=128, n_layer=4, n_head=4, n_embd=128),
}


def model_config(spec: str) -> ModelConfig:
    """A preset name, optionally followed by overrides: ``"small"`` or ``"small:n_layer=3,n_embd=96"``."""
    name, _, rest = spec.partition(":")
    if name not in PRESETS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    if not rest:
        return cfg
    overrides: dict[str, object] = {}
    fields = ModelConfig.__dataclass_fields__
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in fields:
            raise ConfigError(
                f"bad model override {item!r} in {spec!r}; expected key=value with key in {', '.join(fields)}"
            )
        try:
            overrides[key] = float(value) if key == "dropout" else int(value)
        except ValueError as e:
            raise ConfigError(f"bad value for {key} in model spec {spec!r}: {value!r}") from e
    return replace(cfg, **overrides)  # type: ignore[arg-type]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, heads, T, C / heads)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """``model(idx)`` gives logits ``(B, T, vocab)``; ``model(idx, targets)`` also the mean cross-entropy."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight  # weight tying: fewer bytes to send, same quality
        self.apply(self._init_weights)
        # GPT-2's scaled init of residual projections keeps the residual stream's variance flat.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ConfigError(f"sequence of {T} exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss


@torch.no_grad()
def evaluate_loss(
    model: CharTransformer,
    tokens: torch.Tensor,
    *,
    batches: int,
    batch_size: int,
    seed: int = 0,
) -> float:
    """Mean cross-entropy (nats per byte) over ``batches`` fixed windows of ``tokens``.

    The windows depend only on ``seed``, so every method and every worker is scored on the
    same bytes.
    """
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(batches):
        x, y = get_batch(tokens, batch_size, model.cfg.block_size, generator=gen)
        logits, _ = model(x)
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten()))
    model.train(was_training)
    return total / batches
