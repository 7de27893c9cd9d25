"""Fuzz the payload decoder: mutated and random frames raise CodecError or decode within the cap.

Byte-level mutations mostly stop at the checksums; ``test_field_mutated_payloads_past_their_checksums``
changes fields (dtype, shape, spec, buffers, lengths) and recomputes the header's lengths and
checksums, so the structural checks behind them are what is fuzzed."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowband import WIRE_VERSION as WIRE
from lowband.compress import Payload, parse
from lowband.errors import CodecError

from ._budget import fuzz_settings

SPECS = ["fp32", "bf16", "q8", "q4+lz4", "q2", "sign", "topk:k=4,tile=64+q2", "topk:density=0.1+lz4",
         "dct:chunk=8+topk:k=4,tile=64+sign", "fp16+lz4"]
CAP = 1 << 20
_SEEDS = {spec: [bytes(f) for f in parse(spec).encode(torch.randn(3, 77)).to_frames()] for spec in SPECS}


def mutate(data: st.DataObject, frames: list[bytes]) -> list[bytes]:
    frames = list(frames)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frames) - 1)) if frames else 0
        op = data.draw(st.sampled_from(["flip", "byte", "cut", "grow", "int", "swap", "drop", "dup", "random"]))
        f = bytearray(frames[i]) if frames else bytearray()
        if op == "flip" and f:
            p = data.draw(st.integers(0, len(f) - 1))
            f[p] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "byte" and f:
            f[data.draw(st.integers(0, len(f) - 1))] = data.draw(st.integers(0, 255))
        elif op == "cut":
            f = f[: data.draw(st.integers(0, len(f)))]
        elif op == "grow":
            f += data.draw(st.binary(min_size=1, max_size=32))
        elif op == "int" and len(f) >= 8:
            p = data.draw(st.integers(0, len(f) - 8))
            f[p : p + 8] = struct.pack("<Q", data.draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1])))
        elif op == "swap" and len(frames) > 1:
            j = data.draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
            continue
        elif op == "drop" and frames:
            del frames[i]
            continue
        elif op == "dup" and frames:
            frames.insert(i, frames[i])
            continue
        elif op == "random":
            f = bytearray(data.draw(st.binary(max_size=128)))
        if frames:
            frames[i] = bytes(f)
        else:
            frames.append(bytes(f))
    return frames


@fuzz_settings
@given(data=st.data(), spec=st.sampled_from(SPECS))
def test_mutated_payload_frames(data: st.DataObject, spec: str) -> None:
    frames = mutate(data, _SEEDS[spec])
    try:
        p = Payload.from_frames(frames, max_bytes=CAP)
        y = parse(p.spec).decode(p)
    except CodecError:
        return
    assert y.numel() * 4 <= CAP
    # Only checksummed, well-formed frames get through: the round trip must be stable.
    assert [bytes(f) for f in Payload.from_frames(p.to_frames(), max_bytes=CAP).to_frames()] == [bytes(f) for f in p.to_frames()]


@fuzz_settings
@given(frames=st.lists(st.binary(max_size=200), max_size=5))
def test_random_frames(frames: list[bytes]) -> None:
    try:
        p = Payload.from_frames(frames, max_bytes=CAP)
        parse(p.spec).decode(p)
    except CodecError:
        pass


# -- structure-aware: mutate fields, then recompute every length and checksum ------------------

_EDGE = [0, 1, 2, 3, 7, 64, 77, 231, 4096, 2**31, 2**32 - 1, 2**63, 2**64 - 1]
_SPEC_POOL = SPECS + ["fp64", "q3", "topk:k=0,tile=64", "topk:k=999999,tile=8", "dct:chunk=0", "q4:block=1",
                      "q8:block=4096", "lz4+lz4", "sign+q8", "", "+", "topk:density=2", "fp32\x00"]


def _pack(dcode: int, shape: list[int], spec: bytes, bufs: list[bytes], *, lengths=None, sums=None) -> list[bytes]:
    """A header with correct checksums for these fields (``lengths``/``sums`` override on purpose)."""
    from lowband.compress._payload import _FIXED, MAGIC
    from lowband.kernels import checksum

    head = bytearray(_FIXED.struct.pack(MAGIC, WIRE, dcode, len(shape), len(bufs), len(spec), 0))
    head += struct.pack(f"<{len(shape)}Q", *shape)
    head += spec
    head += struct.pack(f"<{len(bufs)}Q", *(lengths if lengths is not None else [len(b) for b in bufs]))
    head += struct.pack(f"<{len(bufs)}Q", *(sums if sums is not None else [checksum(b) for b in bufs]))
    head += struct.pack("<Q", checksum(bytes(head)))
    return [bytes(head), *bufs]


@fuzz_settings
@given(data=st.data(), spec=st.sampled_from(SPECS))
def test_field_mutated_payloads_past_their_checksums(data: st.DataObject, spec: str) -> None:
    """Every field of a valid payload changed in turn, the header's lengths and checksums then
    recomputed, so the decoder's structural checks (not its checksums) are what refuse it."""
    p = Payload.from_frames(_SEEDS[spec], max_bytes=CAP)
    dcode = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}[p.dtype]
    shape, sp, bufs = list(p.shape), p.spec.encode(), [bytes(b) for b in p.buffers]
    lengths = sums = None
    for _ in range(data.draw(st.integers(1, 3))):
        field = data.draw(st.sampled_from(["dtype", "shape", "ndim", "spec", "buf", "nbuf", "len", "sum"]))
        if field == "dtype":
            dcode = data.draw(st.integers(0, 255))
        elif field == "shape" and shape:
            shape[data.draw(st.integers(0, len(shape) - 1))] = data.draw(st.sampled_from(_EDGE))
        elif field == "ndim":
            shape = data.draw(st.lists(st.sampled_from(_EDGE), max_size=9))
        elif field == "spec":
            sp = data.draw(st.one_of(st.sampled_from(_SPEC_POOL).map(str.encode), st.binary(max_size=40)))
        elif field == "buf" and bufs:
            i = data.draw(st.integers(0, len(bufs) - 1))
            b = bytearray(bufs[i])
            how = data.draw(st.sampled_from(["cut", "grow", "flip", "random", "zero", "ones"]))
            if how == "cut":
                b = b[: data.draw(st.integers(0, len(b)))]
            elif how == "grow":
                b += data.draw(st.binary(min_size=1, max_size=64))
            elif how == "flip" and b:
                b[data.draw(st.integers(0, len(b) - 1))] ^= 1 << data.draw(st.integers(0, 7))
            elif how == "random":
                b = bytearray(data.draw(st.binary(max_size=len(b) + 16)))
            elif how == "zero":
                b = bytearray(len(b))
            else:
                b = bytearray(b"\xff" * len(b))
            bufs[i] = bytes(b)
        elif field == "nbuf":
            if bufs and data.draw(st.booleans()):
                del bufs[data.draw(st.integers(0, len(bufs) - 1))]
            else:
                bufs.append(data.draw(st.binary(max_size=64)))
        elif field == "len" and bufs:
            lengths = [len(b) for b in bufs]
            lengths[data.draw(st.integers(0, len(bufs) - 1))] = data.draw(st.sampled_from(_EDGE))
        elif field == "sum" and bufs:
            sums = [0] * len(bufs)
    if len(shape) > 8 or len(bufs) > 8 or len(sp) > 512:
        shape, bufs, sp = shape[:8], bufs[:8], sp[:512]
    if lengths is not None and len(lengths) != len(bufs):
        lengths = None
    if sums is not None and len(sums) != len(bufs):
        sums = None
    frames = _pack(dcode, shape, sp, bufs, lengths=lengths, sums=sums)
    try:
        q = Payload.from_frames(frames, max_bytes=CAP)
        y = parse(q.spec).decode(q)
    except CodecError:
        return
    assert y.numel() * 4 <= CAP
    assert tuple(y.shape) == q.shape


def test_repacked_seeds_are_the_encoder_bytes() -> None:
    """The fuzzer's packer is the real wire format: unmutated fields give the encoder's frames."""
    for spec, frames in _SEEDS.items():
        p = Payload.from_frames(frames, max_bytes=CAP)
        dcode = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}[p.dtype]
        assert _pack(dcode, list(p.shape), p.spec.encode(), [bytes(b) for b in p.buffers]) == frames, spec


def test_a_zero_dimension_does_not_hide_a_huge_one() -> None:
    """Found by the field fuzz: shape (0, 2**63) passed the size cap (product 0) and torch's
    reshape raised TypeError."""
    frames = _pack(0, [0, 2**63], b"fp32", [b""])
    with pytest.raises(CodecError, match="size cap"):
        Payload.from_frames(frames, max_bytes=CAP)
