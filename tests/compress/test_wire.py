"""Hostile bytes: from_frames never crashes, hangs or allocates past its cap."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowband import WIRE_VERSION
from lowband.compress import Payload, parse
from lowband.compress._payload import _FIXED
from lowband.errors import CodecError

SPECS = ["fp32", "q8", "q4+lz4", "sign", "topk:k=4,tile=64+q2", "topk:density=0.1+lz4", "dct:chunk=8+topk:k=4,tile=64+sign"]
CAP = 1 << 20  # tests decode with a 1 MiB cap


def frames_for(spec: str, n: int = 300) -> list[bytes]:
    return [bytes(f) for f in parse(spec).encode(torch.randn(n)).to_frames()]


def decode_or_codec_error(frames: list[bytes]) -> None:
    """The only acceptable outcomes: a valid tensor or a CodecError."""
    try:
        p = Payload.from_frames(frames, max_bytes=CAP)
        parse(p.spec).decode(p)
    except CodecError:
        pass


@pytest.mark.parametrize("spec", SPECS)
def test_valid_frames_round_trip(spec: str) -> None:
    frames = frames_for(spec)
    p = Payload.from_frames(frames)
    assert parse(p.spec).decode(p).shape == (300,)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), spec=st.sampled_from(SPECS))
def test_bit_flips_truncation_and_garbage_only_raise_codec_error(data: st.DataObject, spec: str) -> None:
    frames = frames_for(spec)
    i = data.draw(st.integers(0, len(frames) - 1))
    f = bytearray(frames[i])
    op = data.draw(st.sampled_from(["flip", "truncate", "extend", "garbage", "drop", "dup"]))
    if op == "flip" and f:
        pos = data.draw(st.integers(0, len(f) - 1))
        f[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "truncate":
        f = f[: data.draw(st.integers(0, max(0, len(f) - 1)))]
    elif op == "extend":
        f += data.draw(st.binary(min_size=1, max_size=64))
    elif op == "garbage":
        f = bytearray(data.draw(st.binary(max_size=256)))
    frames = list(frames)
    if op == "drop":
        del frames[i]
    elif op == "dup":
        frames.insert(i, frames[i])
    else:
        frames[i] = bytes(f)
    if op in ("flip", "truncate", "extend", "drop", "dup") and frames != frames_for(spec):
        with pytest.raises(CodecError):
            Payload.from_frames(frames, max_bytes=CAP)
    else:
        decode_or_codec_error(frames)


def _header(spec: str, shape: tuple[int, ...], lengths: list[int], *, version: int = WIRE_VERSION) -> bytes:
    from lowband.kernels import checksum

    s = spec.encode()
    h = bytearray(_FIXED.struct.pack(b"LBND", version, 0, len(shape), len(lengths), len(s), 0))
    h += struct.pack(f"<{len(shape)}Q", *shape) + s
    h += struct.pack(f"<{len(lengths)}Q", *lengths) + struct.pack(f"<{len(lengths)}Q", *([0] * len(lengths)))
    h += struct.pack("<Q", checksum(bytes(h)))
    return bytes(h)


def test_length_lying_header_is_refused_before_allocation() -> None:
    # Claims 2**40 elements of fp32 with a tiny buffer: refused by the cap, nothing allocated.
    with pytest.raises(CodecError, match="cap"):
        Payload.from_frames([_header("fp32", (1 << 40,), [16]), b"\0" * 16], max_bytes=CAP)
    # Consistent header lengths, but the codec expects other sizes for that shape.
    with pytest.raises(CodecError, match="expected"):
        Payload.from_frames([_header("q8", (1000,), [10, 16]), b"\0" * 10, b"\0" * 16], max_bytes=CAP)
    # lz4 claiming a huge expansion from a few bytes.
    with pytest.raises(CodecError):
        Payload.from_frames([_header("fp32+lz4", (200_000,), [8]), b"\x1f" * 8], max_bytes=CAP)


def test_wrong_version_and_magic_have_clear_messages() -> None:
    with pytest.raises(CodecError, match="wire version 99"):
        Payload.from_frames([_header("fp32", (1,), [4], version=99), b"\0" * 4])
    good = frames_for("fp32", 4)
    with pytest.raises(CodecError, match="magic"):
        Payload.from_frames([b"XXXX" + good[0][4:], good[1]])
    with pytest.raises(CodecError, match="spec"):
        Payload.from_frames([_header("q9", (4,), [4]), b"\0" * 4])


def test_out_of_grid_codes_and_bad_scales_are_refused() -> None:
    p = parse("q4").encode(torch.randn(16))
    codes = bytearray(p.buffers[0])
    codes[0] = 0xFF  # 15 is not a q4 code
    bad = Payload(spec=p.spec, dtype=p.dtype, shape=p.shape, buffers=[bytes(codes), bytes(p.buffers[1])])
    with pytest.raises(CodecError, match="grid"):
        parse("q4").decode(Payload.from_frames(bad.to_frames()))
    steps = bytearray(p.buffers[1])
    steps[0:4] = struct.pack("<f", float("nan"))
    bad = Payload(spec=p.spec, dtype=p.dtype, shape=p.shape, buffers=[bytes(p.buffers[0]), bytes(steps)])
    with pytest.raises(CodecError, match="scales"):
        parse("q4").decode(Payload.from_frames(bad.to_frames()))


def test_topk_indices_out_of_tile_or_unsorted_are_refused() -> None:
    codec = parse("topk:k=2,tile=100")  # 8-bit indices: 255 would be outside a tile of 100
    p = codec.encode(torch.randn(200))
    for idx in ([255, 3, 4, 5], [7, 7, 1, 2], [9, 3, 1, 2]):
        bad = Payload(spec=p.spec, dtype=p.dtype, shape=p.shape, buffers=[bytes(idx), bytes(p.buffers[1])])
        with pytest.raises(CodecError, match="indices"):
            codec.decode(Payload.from_frames(bad.to_frames()))


def test_payload_of_another_codec_is_refused() -> None:
    p = parse("q8").encode(torch.randn(10))
    with pytest.raises(CodecError, match="encoded with"):
        parse("q4").decode(p)
