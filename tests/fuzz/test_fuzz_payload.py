"""Fuzz the payload decoder: mutated and random frames raise CodecError or decode within the cap."""

from __future__ import annotations

import struct

import torch
from hypothesis import given
from hypothesis import strategies as st

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
