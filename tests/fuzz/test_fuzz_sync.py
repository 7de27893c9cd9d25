"""Fuzz the RL weight-sync parsers of untrusted bytes (issue 9, item 4).

Targets, each fed mutated valid messages and random ones (seeded, so a failure replays):

* the sync message header (``lowband.sync._wire.parse_header``) and the manifest
  (``Manifest.from_bytes``, capped by ``max_elems``);
* CHUNK bodies (``lowband.sync._delta.decode_op`` then ``apply_op`` on a chunk of the
  manifest's size), for the sparse, dense and codec encodings;
* rollouts (``lowband.sync.rollouts._unpack`` around ``lowband.sync._tree.loads``).

Only ``lowband.errors.CodecError`` may escape; what parses respects the caps (the
manifest's value count, the chunk's length, the rollout's byte cap). The long run:
see ``docs/reliability.md``.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowband.compress import parse
from lowband.errors import CodecError
from lowband.sync._delta import apply_op, decode_op, encode_exact, encode_lossy
from lowband.sync._tree import dumps
from lowband.sync._wire import (
    CHUNK,
    COMMIT,
    HEADER_SIZE,
    HEARTBEAT,
    HELLO,
    MANIFEST,
    SNAP_REP,
    SNAP_REQ,
    Header,
    Manifest,
    TensorSpec,
    pack,
    parse_header,
)
from lowband.sync.rollouts import _PUSH, _pack, _unpack

from ._budget import fuzz_settings
from .test_fuzz_transport import mutate

_SEED = st.integers(0, 2**64 - 1)
MAX_ELEMS = 1 << 16

# -- headers and manifests ---------------------------------------------------------------------

_MANIFEST = Manifest(
    "fp32",
    256,
    (5001, 5002),
    (TensorSpec("w", torch.float32, (16, 40)), TensorSpec("b.bias", torch.bfloat16, (7,)),
     TensorSpec("e", torch.float16, ()), TensorSpec("d", torch.float64, (3, 0, 2))),
).to_bytes()
_MESSAGES = [
    [pack(Header(HELLO))],
    [pack(Header(MANIFEST, seq=3, finger=77)), _MANIFEST],
    [pack(Header(COMMIT, seq=4, version=9, a=12, b=1, c=2, finger=5))],
    [pack(Header(SNAP_REQ, tensor=1, chunk=0))],
    [pack(Header(SNAP_REP, tensor=0, chunk=2, seq=4, finger=5)), b"\0" * 1024],
    [pack(Header(HEARTBEAT, seq=4, b=1, c=2))],
    [pack(Header(CHUNK, 2, 0, 0, 1, 4, 9, 1, 1, 0)), b"\0" * 1024],
]


def _mutate_frames(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    frames = list(frames)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(frames)) if frames else 0
        op = rng.random()
        if frames and op < 0.7:
            frames[i] = mutate(rng, frames[i])
        elif frames and op < 0.8:
            del frames[i]
        elif frames and op < 0.9:
            frames.insert(i, frames[i])
        else:
            frames.append(rng.randbytes(rng.randrange(80)))
    return frames


@fuzz_settings
@given(seed=_SEED)
def test_mutated_and_random_sync_headers(seed: int) -> None:
    rng = random.Random(seed)
    if rng.random() < 0.8:
        frames = _mutate_frames(rng, rng.choice(_MESSAGES))
    else:
        frames = [rng.randbytes(rng.choice((HEADER_SIZE, rng.randrange(100)))) for _ in range(rng.randrange(4))]
    try:
        h = parse_header(frames)
    except CodecError:
        return
    assert h.kind in (HELLO, MANIFEST, CHUNK, COMMIT, SNAP_REQ, SNAP_REP, HEARTBEAT)
    assert len(frames) >= 1 and len(memoryview(frames[0]).cast("B")) == HEADER_SIZE


@fuzz_settings
@given(seed=_SEED)
def test_mutated_and_random_manifests(seed: int) -> None:
    rng = random.Random(seed)
    data = mutate(rng, _MANIFEST) if rng.random() < 0.85 else rng.randbytes(rng.randrange(200))
    try:
        m = Manifest.from_bytes(data, max_elems=MAX_ELEMS)
    except CodecError:
        return
    assert sum(t.numel for t in m.tensors) <= MAX_ELEMS
    assert len({t.name for t in m.tensors}) == len(m.tensors)
    assert m.to_bytes() == data  # the parser is strict: only the canonical encoding gets through


# -- chunk bodies --------------------------------------------------------------------------------

N = 300  # values in the fuzzed chunk


def _chunk_messages() -> list[tuple[torch.dtype, str | None, Header, list[bytes]]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for dtype, bits in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16)):
        old = torch.randn(N, generator=g).to(dtype)
        for changed in (5, N):  # few changes: sparse; all: dense
            new = old.clone()
            new[:changed] += 1.0
            mask = np.zeros(N, dtype=bool)
            enc = encode_exact(old.view(bits).numpy().copy(), new.view(bits).numpy(), mask)
            assert enc is not None
            h = Header(CHUNK, enc.enc, enc.flags, 0, 0, 2, 2, 0, enc.count, enc.raw_len)
            out.append((dtype, None, h, [bytes(memoryview(f).cast("B")) for f in enc.frames]))
    for spec in ("q4", "topk:k=8,tile=64+q2", "fp16+lz4"):
        codec = parse(spec)
        master, mirror = torch.randn(N, generator=g), torch.zeros(N)
        enc, _ = encode_lossy(codec, master, mirror)
        assert enc is not None
        h = Header(CHUNK, enc.enc, enc.flags, 0, 0, 2, 2, 0, enc.count, enc.raw_len)
        out.append((torch.float32, spec, h, [bytes(memoryview(f).cast("B")) for f in enc.frames]))
    return out


_CHUNKS = _chunk_messages()
_HEADER_FIELDS = ("enc", "flags", "b", "c")


@fuzz_settings
@given(seed=_SEED)
def test_mutated_chunk_bodies(seed: int) -> None:
    rng = random.Random(seed)
    dtype, spec, h, frames = rng.choice(_CHUNKS)
    if rng.random() < 0.3:  # lie in the header's fields instead of (or as well as) the body
        field = rng.choice(_HEADER_FIELDS)
        value = rng.choice((0, 1, 2, 3, 4, 255, N, N + 1, 2**32 - 1, 2**63, rng.randrange(2**16)))
        h = Header(**{**h.__dict__, field: value})
    if rng.random() < 0.85:
        frames = _mutate_frames(rng, frames)
    codec = None if spec is None else parse(spec)
    try:
        op = decode_op(h, frames, dtype, N, codec)
        target = torch.zeros(N, dtype=dtype)
        apply_op(op, target, dtype, codec)
    except CodecError:
        return
    if op.pos is not None:
        assert op.pos.size == op.values.size and (op.pos.size == 0 or 0 <= op.pos.min() <= op.pos.max() < N)
    assert target.numel() == N


# -- rollouts ------------------------------------------------------------------------------------

ROLLOUT_CAP = 1 << 16
_TREE = {"tokens": torch.arange(12, dtype=torch.int64).view(3, 4), "logp": torch.randn(3, 4),
         "mask": torch.ones(3, 4, dtype=torch.bool), "reward": [1.0, -0.5, None], "prompt": "2+2=",
         "meta": (7, b"\x00\xff", {"nested": [True, 3]}), "half": torch.randn(5).to(torch.bfloat16)}
_ROLLOUT = [bytes(memoryview(f).cast("B")) for f in _pack(_PUSH, "worker-1", 4, 99, dumps(_TREE))]


@fuzz_settings
@given(seed=_SEED)
def test_mutated_and_random_rollouts(seed: int) -> None:
    rng = random.Random(seed)
    if rng.random() < 0.85:
        frames = _mutate_frames(rng, _ROLLOUT)
    else:
        frames = [rng.randbytes(rng.randrange(120)) for _ in range(rng.randrange(5))]
    try:
        kind, r = _unpack(frames, max_bytes=ROLLOUT_CAP)
    except CodecError:
        return
    assert sum(len(f) for f in frames[1:]) <= ROLLOUT_CAP
    assert r is None or isinstance(r.worker, str)


@fuzz_settings
@given(seed=_SEED)
def test_rollout_structure_past_its_checksum(seed: int) -> None:
    """The checksum catches random damage, so also fuzz the tree parser behind it: a
    mutated structure frame with a recomputed checksum (what a hostile worker sends)."""
    rng = random.Random(seed)
    frames = list(_ROLLOUT)
    body = _mutate_frames(rng, frames[1:]) or [b""]
    forged = [bytes(f) for f in _pack(_PUSH, "mallory", 4, 99, body)]
    try:
        _unpack(forged, max_bytes=ROLLOUT_CAP)
    except CodecError:
        pass


def test_unmutated_seeds_parse() -> None:
    """The fuzz starts from valid messages: each parses as it is."""
    for frames in _MESSAGES:
        parse_header(frames)
    assert len(Manifest.from_bytes(_MANIFEST, max_elems=MAX_ELEMS).tensors) == 4
    for dtype, spec, h, frames in _CHUNKS:
        codec = None if spec is None else parse(spec)
        target = torch.zeros(N, dtype=dtype)
        apply_op(decode_op(h, frames, dtype, N, codec), target, dtype, codec)
        assert bool(target.any())
    kind, r = _unpack(_ROLLOUT, max_bytes=ROLLOUT_CAP)
    assert r is not None and r.worker == "worker-1" and torch.equal(r.data["tokens"], _TREE["tokens"])
