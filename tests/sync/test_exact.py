"""Exact sync: the subscriber's weights equal the learner's bit for bit, whatever changed."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sync_helpers import TIMEOUT, pair, same_bits, zeros_like

from lowband.sync import WeightPublisher, WeightSubscriber
from lowband.sync._delta import apply_op, bits, decode_op, encode_exact
from lowband.sync._wire import CHUNK, DENSE, SPARSE, Header

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SPECIAL = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40]


def _change(t: torch.Tensor, pattern: str, rng: np.random.Generator) -> None:
    """Change ``t`` in place following ``pattern`` (bit-level, so -0.0 and NaN payloads occur)."""
    b = bits(t.view(-1))
    n = b.size
    if pattern == "none":
        return
    if pattern == "dense":
        idx = np.arange(n)
    elif pattern == "sparse":
        idx = rng.choice(n, size=max(1, n // 100), replace=False)
    elif pattern == "clustered":
        start = int(rng.integers(0, n))
        idx = np.arange(start, min(n, start + int(rng.integers(1, 64))))
    else:  # special values: signed zeros, NaN payloads, infinities, subnormals
        idx = rng.choice(n, size=min(n, 5), replace=False)
        t.view(-1)[torch.from_numpy(idx)] = torch.tensor(
            [SPECIAL[int(i) % len(SPECIAL)] for i in rng.integers(0, len(SPECIAL), idx.size)],
            dtype=t.dtype,
        )
        if t.dtype == torch.float32:
            b[idx[:1]] = np.int32(0x7FC00001)  # a NaN with a payload
        return
    b[idx] ^= rng.integers(1, 1 << (8 * b.itemsize - 2), idx.size, dtype=np.int64).astype(b.dtype)


models = st.lists(st.tuples(st.sampled_from(DTYPES), st.integers(1, 700)), min_size=1, max_size=4)
patterns = st.lists(
    st.lists(
        st.sampled_from(["none", "dense", "sparse", "clustered", "special"]), min_size=4, max_size=4
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=models, steps=patterns, seed=st.integers(0, 2**16), chunk=st.sampled_from([64, 256, 4096])
)
def test_exact_under_generated_updates(spec, steps, seed, chunk) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    model = {f"t{i}": torch.randn(n, generator=g).to(dt) for i, (dt, n) in enumerate(spec)}
    replica = zeros_like(model)
    with pair(model, replica, chunk_elems=chunk) as (pub, sub):
        assert same_bits(model, replica)
        for step in steps:
            for t, pattern in zip(model.values(), step):
                _change(t, pattern, rng)
            stats = pub.publish()
            assert sub.update(block=True, timeout=TIMEOUT) == stats.version
            assert same_bits(model, replica)
            assert sub.fingerprint == pub.fingerprint == stats.fingerprint


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3000),
    dtype=st.sampled_from(DTYPES),
    frac=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_chunk_round_trip(n: int, dtype: torch.dtype, frac: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    old = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    new = old.clone()
    k = int(frac * n)
    idx = rng.choice(n, size=k, replace=False)
    bits(new)[idx] ^= 1
    mirror, target = old.clone(), old.clone()
    enc = encode_exact(bits(mirror), bits(new), np.empty(n, dtype=np.bool_))
    assert bits(mirror).tobytes() == bits(new).tobytes()  # the publisher's mirror moved
    if k == 0:
        assert enc is None
        return
    assert enc is not None and enc.count == k
    assert enc.enc in (SPARSE, DENSE)
    if enc.enc == SPARSE:
        assert enc.nbytes < n * old.element_size()  # sparse only when it is smaller
    h = Header(CHUNK, enc.enc, enc.flags, 0, 0, 1, 1, 0, enc.count, enc.raw_len)
    op = decode_op(h, enc.frames, dtype, n, None)
    apply_op(op, target, dtype, None)
    assert bits(target).tobytes() == bits(new).tobytes()


def test_bf16_view_of_fp32_master() -> None:
    g = torch.Generator().manual_seed(0)
    master = {"w": torch.randn(300, 7, generator=g), "b": torch.randn(5, generator=g)}
    replica = zeros_like(master, torch.bfloat16)
    wide = zeros_like(master)  # an fp32 worker holding the bf16 values exactly
    with pair(master, replica, dtype=torch.bfloat16, chunk_elems=500) as (pub, sub):
        with WeightSubscriber(wide, connect=pub.address) as sub2:
            assert sub2.update(block=True, timeout=TIMEOUT) == pub.version
            for _ in range(3):
                master["w"].add_(
                    torch.randn(300, 7, generator=g) * 1e-3
                )  # many moves stay below bf16 resolution
                stats = pub.publish()
                assert stats.positions_changed < master["w"].numel() + master["b"].numel()
                assert sub.update(block=True, timeout=TIMEOUT) == stats.version
                assert sub2.update(block=True, timeout=TIMEOUT) == stats.version
                assert same_bits(master, replica, torch.bfloat16)
                assert same_bits({k: v.to(torch.bfloat16).float() for k, v in master.items()}, wide)
                assert sub.fingerprint == sub2.fingerprint == pub.fingerprint


def test_parallel_streams_and_unchanged_versions() -> None:
    model = {f"t{i}": torch.randn(1000) for i in range(5)}
    replica = zeros_like(model)
    with pair(model, replica, streams=3, chunk_elems=128) as (pub, sub):
        for step in range(4):
            if step % 2:
                model["t1"][step] += 1.0
            stats = pub.publish(version=10 * (step + 1))
            assert stats.messages == (1 if step % 2 else 0)
            assert sub.update(block=True, timeout=TIMEOUT) == 10 * (step + 1)
            assert same_bits(model, replica)


def test_lossy_codec_tracks_without_drift() -> None:
    g = torch.Generator().manual_seed(1)
    master = {"w": torch.randn(4096, generator=g)}
    replica = zeros_like(master)
    with pair(master, replica, codec="q4", chunk_elems=1024) as (pub, sub):
        for _ in range(3):
            master["w"].add_(torch.randn(4096, generator=g) * 0.01)
            v = pub.publish().version
            assert sub.update(block=True, timeout=TIMEOUT) == v
            assert (
                sub.fingerprint == pub.fingerprint
            )  # both sides hold the same mirror, bit for bit
        err = [float((replica["w"] - master["w"]).abs().max())]
        for _ in range(6):  # the learner stops moving: error feedback closes the gap
            v = pub.publish().version
            assert sub.update(block=True, timeout=TIMEOUT) == v
            err.append(float((replica["w"] - master["w"]).abs().max()))
        assert err[-1] < err[0] / 100, err


def test_update_without_news_returns_none() -> None:
    model = {"w": torch.randn(10)}
    replica = zeros_like(model)
    with pair(model, replica) as (pub, sub):
        assert sub.update() is None
        assert sub.version == pub.version
        with WeightPublisher(model) as other:
            assert other.seq == 0
