"""A small strict format for nested rollouts: dict/list/tuple of tensors, numbers, strings.

The structure travels as one frame of tagged values (little-endian); tensors go
in their own frames: float tensors as lossless payloads (:mod:`lowband.compress`
wire format, ``fp32``/``bf16``/``fp16``, checksummed), others (token ids, masks,
float64) as raw bytes with their dtype, shape and XXH3-64. Never pickle: the parser
accepts only these tags, bounds depth, counts and sizes before allocating, and
raises :class:`lowband.errors.CodecError` on anything else.

Tags: 0 None, 1 False, 2 True, 3 int (i64), 4 float (f64), 5 str (u32 + UTF-8),
6 bytes (u32 + raw), 7 list (u32 n), 8 tuple (u32 n), 9 dict (u32 n, then n
str keys (u32 + UTF-8) each followed by a value), 10 float tensor (u32 first
frame, u8 frame count), 11 raw tensor (u8 dtype, u8 ndim, ndim x u64, u32 frame, u64 XXH3-64).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lowband._frames import Reader, Writer
from lowband.compress import Payload, parse
from lowband.errors import CodecError
from lowband.kernels import checksum

__all__ = ["dumps", "loads"]

MAX_DEPTH = 32
MAX_NODES = 1 << 20
MAX_FRAMES = 1 << 14
_FLOAT_SPEC = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_RAW = {
    0: torch.int64,
    1: torch.int32,
    2: torch.int16,
    3: torch.int8,
    4: torch.uint8,
    5: torch.bool,
    6: torch.float64,
}
_RAW_CODE = {v: k for k, v in _RAW.items()}


def dumps(obj: Any) -> list[bytes | memoryview]:
    """``[structure, *tensor frames]`` for ``obj``; CodecError for what cannot travel."""
    w = Writer()
    frames: list[bytes | memoryview] = []

    def put(x: Any, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise CodecError(f"rollout nested deeper than {MAX_DEPTH}")
        if x is None:
            w.put("<B", 0)
        elif isinstance(x, bool):
            w.put("<B", 2 if x else 1)
        elif isinstance(x, int):
            if not -(1 << 63) <= x < 1 << 63:
                raise CodecError(f"integer {x} does not fit in 64 bits")
            w.put("<Bq", 3, x)
        elif isinstance(x, float):
            w.put("<Bd", 4, x)
        elif isinstance(x, str):
            w.sized("<BI", x.encode("utf-8"), 5)
        elif isinstance(x, (bytes, bytearray)):
            w.sized("<BI", bytes(x), 6)
        elif isinstance(x, (list, tuple)):
            w.put("<BI", 7 if isinstance(x, list) else 8, len(x))
            for v in x:
                put(v, depth + 1)
        elif isinstance(x, dict):
            w.put("<BI", 9, len(x))
            for k, v in x.items():
                if not isinstance(k, str):
                    raise CodecError(f"rollout dict keys must be str, got {type(k).__name__}")
                w.sized("<I", k.encode("utf-8"))
                put(v, depth + 1)
        elif isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            if t.dtype in _FLOAT_SPEC:
                fs = parse(_FLOAT_SPEC[t.dtype]).encode(t).to_frames()
                w.put("<BIB", 10, len(frames), len(fs))
                frames.extend(fs)
            elif t.dtype in _RAW_CODE:
                raw = (
                    t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
                )
                w.put(f"<BBB{t.dim()}Q", 11, _RAW_CODE[t.dtype], t.dim(), *t.shape)
                w.put("<IQ", len(frames), checksum(raw))
                frames.append(memoryview(raw))
            else:
                raise CodecError(f"tensors of dtype {t.dtype} cannot travel in a rollout")
        else:
            raise CodecError(
                f"a rollout holds dict/list/tuple/tensor/int/float/str/bytes/None, not {type(x).__name__}"
            )

    put(obj, 0)
    if len(frames) > MAX_FRAMES:
        raise CodecError(f"rollout has {len(frames)} tensor frames, at most {MAX_FRAMES}")
    return [w.bytes(), *frames]


def loads(frames: list, *, max_bytes: int) -> Any:
    """Parse what :func:`dumps` wrote; CodecError on anything malformed or over ``max_bytes``."""
    if not frames:
        raise CodecError("empty rollout")
    r = Reader(frames[0], "rollout structure")
    take = r.take
    data = [memoryview(f).cast("B") for f in frames[1:]]
    if len(data) > MAX_FRAMES or r.remaining + sum(d.nbytes for d in data) > max_bytes:
        raise CodecError("rollout over its frame or size cap")
    used: set[int] = set()
    nodes = 0

    def text() -> str:
        return r.text(take("<I")[0])

    def claim(first: int, count: int) -> list[memoryview]:
        if (
            count < 1
            or first + count > len(data)
            or any(i in used for i in range(first, first + count))
        ):
            raise CodecError("rollout tensor names a missing or reused frame")
        used.update(range(first, first + count))
        return data[first : first + count]

    def get(depth: int) -> Any:
        nonlocal nodes
        nodes += 1
        if depth > MAX_DEPTH or nodes > MAX_NODES:
            raise CodecError("rollout structure too deep or too large")
        (tag,) = take("<B")
        if tag in (0, 1, 2):
            return (None, False, True)[tag]
        if tag == 3:
            return take("<q")[0]
        if tag == 4:
            return take("<d")[0]
        if tag == 5:
            return text()
        if tag == 6:
            return bytes(r.bytes(take("<I")[0], what="bytes"))
        if tag in (7, 8):
            (n,) = take("<I")
            if n > r.remaining:
                raise CodecError("rollout sequence longer than its bytes")
            items = [get(depth + 1) for _ in range(n)]
            return items if tag == 7 else tuple(items)
        if tag == 9:
            (n,) = take("<I")
            if n > r.remaining:
                raise CodecError("rollout dict longer than its bytes")
            out = {}
            for _ in range(n):
                k = text()
                if k in out:
                    raise CodecError(f"rollout dict repeats key {k!r}")
                out[k] = get(depth + 1)
            return out
        if tag == 10:
            first, count = take("<IB")
            p = Payload.from_frames(claim(first, count), max_bytes=max_bytes)
            if p.spec not in _FLOAT_SPEC.values() or _FLOAT_SPEC.get(p.dtype) != p.spec:
                raise CodecError(
                    f"rollout tensor payload {p.spec!r} of {p.dtype} is not a lossless one"
                )
            return parse(p.spec).decode(p)
        if tag == 11:
            code, ndim = take("<BB")
            if code not in _RAW or ndim > 8:
                raise CodecError(f"rollout raw tensor with dtype code {code}, ndim {ndim}")
            shape = take(f"<{ndim}Q")
            first, sum_ = take("<IQ")
            (raw,) = claim(first, 1)
            dtype = _RAW[code]
            n = 1
            for s in shape:
                n *= s
            if n * torch.empty(0, dtype=dtype).element_size() != raw.nbytes:
                raise CodecError(f"rollout tensor of shape {shape} has {raw.nbytes} bytes")
            if checksum(raw) != sum_:
                raise CodecError("rollout tensor checksum mismatch: corrupted (a checksum catches accidents, not tampering: CURVE authenticates)")
            t = (
                torch.frombuffer(bytearray(raw), dtype=torch.uint8)
                if raw.nbytes
                else torch.zeros(0, dtype=torch.uint8)
            )
            return t.view(dtype).reshape(shape)
        raise CodecError(f"unknown rollout tag {tag}")

    obj = get(0)
    r.done()
    if len(used) != len(data):
        raise CodecError("rollout carries frames no tensor refers to")
    return obj
