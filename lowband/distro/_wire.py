"""What DeMo puts on the wire for one bucket of tiles, and how peers' buckets combine.

A bucket holds the tile-major DCT coefficients of every parameter of one param group
whose tiles have the same shape of ``T`` values (see :mod:`lowband.compress._dct`; a
group's 1-D parameters are packed and ride in the bucket of the ``chunk x chunk``
tiles), concatenated into one flat fp32 vector, so one step sends one payload per
bucket: usually one per param group.
The payload is a generic :mod:`lowband.compress` codec:

* sparse: ``topk:k=K,tile=T`` (tile-local indices of 8, 12 or 16 bits) followed by the
  value codec. The default value codec is ``sign:block=K``: one bit per value and
  one fp32 scale (the mean magnitude of the K values) per tile, as Psyche sends
  it. When K is not a multiple of 8 the scale covers ``lcm(K, 8) / K`` tiles
  (the sign codec's blocks are multiples of 8 values).
* dense: the value codec alone over every coefficient, used when K >= T or when it
  is not larger than the sparse form (small tiles, such as the 1 x 64 tiles of a
  short 1-D vector: 8 indices of 8 bits cost more than 64 signs). The choice is made once per tile
  size by encoding a probe with both codecs and comparing the exact payload bytes,
  so a parameter is never sent larger than dense.

Peers' payloads are summed in rank order into fp32 (:meth:`Codec.decode_sum`, the
same bits on every peer) and divided by the number of participants: colliding
coefficients are averaged over all peers, not over the peers that picked them. A peer
that did not pick a coefficient contributes a true zero this step (its mass stays
in its momentum and is sent later), so the sum over N is the exact mean of what the
peers sent, linear and unbiased; averaging over contributors would instead weigh a
coefficient that one peer alone picked as if every peer had sent it, N times too
loud relative to the coefficients all peers agree on.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from lowband.compress import Codec, Payload, Sign, TopK, parse
from lowband.errors import CodecError, ConfigError, ConfigMismatch

__all__ = ["BucketCodec", "bucket_codec", "value_spec", "combine"]

_PROBE_TILES = 16


@dataclass(frozen=True)
class BucketCodec:
    """The codec chosen for buckets of ``tile``-value tiles."""

    codec: Codec
    tile: int
    sparse: bool


def value_spec(codec: str | Codec | None) -> str | None:
    """Validate a user value codec (``codec=`` of DeMo); None means per-tile signs.

    Returns the canonical spec (what a param group and its state dict hold)."""
    return None if codec is None else str(_value_codec(codec))


def _value_codec(codec: str | Codec) -> Codec:
    c = parse(codec)
    if c.topk is not None or c.dct is not None:
        raise ConfigError(
            f"DeMo's codec= is the value codec of the selected coefficients (e.g. 'q4', 'fp16', 'sign'); "
            f"{str(c)!r} names its own dct/topk stage: set DeMo's chunk= and topk= instead"
        )
    return c


def _sign_block(n: int) -> int:
    return n * 8 // math.gcd(n, 8)


@functools.lru_cache(maxsize=256)
def bucket_codec(tile: int, *, topk: int, value: str | None) -> BucketCodec:
    """The codec for tiles of ``tile`` values: sparse top-``topk`` or dense, whichever is smaller.

    ``value`` is a param group's value codec (:func:`value_spec`); None: per-tile signs.
    """
    fixed = None if value is None else _value_codec(value)
    dense = fixed or Codec(value=Sign(block=_sign_block(tile)))
    choice = BucketCodec(dense, tile, sparse=False)
    if topk < tile:
        vals = fixed or Codec(value=Sign(block=_sign_block(topk)))
        sparse = dataclasses.replace(vals, topk=TopK(k=topk, tile=tile))
        g = torch.Generator().manual_seed(0)
        probe = torch.randn(_PROBE_TILES * tile, generator=g)
        if sparse.encode(probe).nbytes < dense.encode(probe).nbytes:
            choice = BucketCodec(sparse, tile, sparse=True)
    return choice


def combine(
    codec: Codec,
    payloads: list[Payload | None],
    numel: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, int]:
    """Mean over participants of the peers' payloads, summed in rank order (fp32, flat).

    The sum is made on ``device`` (the parameters'): only the payloads' compact
    indices and values travel there, never a dense copy.

    ``None`` marks a peer that was dropped from this exchange. Returns the mean and
    the number of participants. A payload of another codec or size raises
    :class:`ConfigMismatch` (peers must agree on parameters, their gradients and
    DeMo's settings).
    """
    present = [p for p in payloads if p is not None]
    if not present:
        raise CodecError("no payload to combine: every peer was dropped")
    for r, p in enumerate(payloads):
        if p is None:
            continue
        if p.spec != str(codec) or p.numel != numel:
            raise ConfigMismatch(
                f"rank {r} sent a DeMo bucket of {p.numel} values with {p.spec!r}; this peer has "
                f"{numel} values with {str(codec)!r}: peers must have the same parameters with "
                f"gradients and the same DeMo settings"
            )
    out = torch.zeros(numel, dtype=torch.float32, device=device)
    codec.decode_sum(present, out)
    out.div_(len(present))
    return out, len(present)
