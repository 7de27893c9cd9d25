"""RolloutChannel: strict round trip of nested rollouts, stale and forged ones dropped, swarm sharing."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowband.errors import CodecError, ConfigError
from lowband.sync import RolloutChannel
from lowband.sync._tree import dumps, loads

TIMEOUT = 10.0


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


tensors = st.builds(
    lambda dt, shape, seed: (
        torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 100
    ).to(dt),
    st.sampled_from(
        [
            torch.float32,
            torch.bfloat16,
            torch.float16,
            torch.float64,
            torch.int64,
            torch.int32,
            torch.uint8,
            torch.bool,
        ]
    ),
    st.lists(st.integers(0, 5), max_size=3).map(tuple),
    st.integers(0, 1000),
)
leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | tensors
)
trees = st.recursive(
    leaves,
    lambda kids: (
        st.lists(kids, max_size=4)
        | st.lists(kids, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=30, deadline=None)
@given(tree=trees)
def test_tree_round_trip(tree: object) -> None:
    assert _same(tree, loads(dumps(tree), max_bytes=1 << 24))


@settings(max_examples=60, deadline=None)
@given(tree=trees, cut=st.integers(0, 400), flip=st.integers(0, 4000))
def test_tree_rejects_damage(tree: object, cut: int, flip: int) -> None:
    frames = [bytes(f) for f in dumps(tree)]
    head = bytearray(frames[0])
    if flip // 8 < len(head):
        head[flip // 8] ^= 1 << (flip % 8)
    for bad in (
        [bytes(head), *frames[1:]],
        [frames[0][:cut], *frames[1:]],
        frames[:-1] if len(frames) > 1 else [b""],
    ):
        try:
            loads(bad, max_bytes=1 << 24)
        except CodecError:
            pass


def test_unsupported_values_are_refused() -> None:
    with pytest.raises(CodecError):
        dumps({"f": object()})
    with pytest.raises(CodecError):
        dumps({1: 2})
    with pytest.raises(CodecError):
        dumps(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(CodecError, match="size cap"):
        loads(dumps(torch.zeros(1000)), max_bytes=100)


def test_stale_forged_and_malformed_rollouts_are_dropped() -> None:
    with RolloutChannel(bind="127.0.0.1:0", max_lag=1) as hub:
        hub.policy(1, 111)
        hub.policy(2, 222)
        hub.policy(3, 333)
        with (
            RolloutChannel(connect=hub.address, name="w0") as w0,
            RolloutChannel(connect=hub.address, name="w1") as w1,
        ):
            roll = {
                "tokens": torch.arange(6).reshape(2, 3),
                "logp": torch.randn(2, 3),
                "reward": [1.0, 0.0],
                "task": "2+3",
            }
            w0.push(roll, version=3, fingerprint=333)  # fresh
            w0.push(roll, version=2, fingerprint=222)  # one version behind: still within max_lag
            w1.push(roll, version=1, fingerprint=111)  # stale
            w1.push(roll, version=3, fingerprint=999)  # forged fingerprint
            w1.push(roll, version=9, fingerprint=333)  # a version never published
            w1._sock.send_multipart([b"LBRO" + b"\x01" * 40, b"junk"])  # malformed bytes
            got: list = []
            for _ in range(50):
                got += hub.pull(timeout=0.2)
                c = hub.counts
                if sum(sum(v.values()) for v in c.values()) >= 6:
                    break
            assert sorted(r.version for r in got) == [2, 3]
            assert all(r.worker == "w0" and _same(r.data, roll) for r in got)
            c = hub.counts
            assert c["w0"] == {
                "accepted": 2,
                "stale": 0,
                "unknown": 0,
                "malformed": 0,
                "rejected": 0,
            }
            assert c["w1"] == {
                "accepted": 0,
                "stale": 1,
                "unknown": 2,
                "malformed": 0,
                "rejected": 0,
            }
            assert sum(v["malformed"] for v in c.values()) == 1


def test_swarm_sharing() -> None:
    with RolloutChannel(bind="127.0.0.1:0", max_lag=0) as hub:
        hub.policy(5, 55)
        with (
            RolloutChannel(connect=hub.address, name="a", share=True) as a,
            RolloutChannel(connect=hub.address, name="b", share=True) as b,
        ):
            hub.pull(timeout=0.5)  # the hellos
            a.push({"x": torch.ones(3)}, version=5, fingerprint=55)
            got = []
            for _ in range(50):
                got += hub.pull(timeout=0.1)
                if got:
                    break
            assert [r.worker for r in got] == ["a"]
            seen = b.shared(timeout=TIMEOUT)
            assert len(seen) == 1 and seen[0].worker == "a" and seen[0].shared
            assert _same(seen[0].data, {"x": torch.ones(3)})
            assert a.shared(timeout=0.2) == []  # a's own rollout is not echoed back


def test_sides_are_checked() -> None:
    with pytest.raises(ConfigError):
        RolloutChannel()
    with RolloutChannel(bind="127.0.0.1:0") as hub:
        with pytest.raises(ConfigError):
            hub.push({}, version=1, fingerprint=1)
