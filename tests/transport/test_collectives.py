"""Collectives over the in-process carrier (ThreadGroup): values, bit-identity, faults."""

from __future__ import annotations

import time

import pytest
import torch

from lowband.compress import ErrorFeedback, parse
from lowband.errors import CodecError, CollectiveTimeout, ConfigError, ConfigMismatch, PeerLost
from lowband.testing import ThreadGroup
from lowband.transport._collectives import SHARD_ALIGN, shard_bounds

DENSE = ["fp32", "fp16", "bf16", "q8", "q4", "q2", "q1", "sign", "q8+lz4", "lz4", "q4:block=64"]
SPARSE = ["topk:k=64,tile=4096+q8", "topk:density=0.01", "topk:k=32,tile=1024+sign"]


def rank_input(rank: int, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + rank)
    return (torch.randn(n, generator=g) * (rank + 1)).to(dtype)


def reduce_fn(group, n, codec, op, shape=None):
    x = rank_input(group.rank, n)
    if shape is not None:
        x = x.view(shape)
    before = x.clone()
    out = group.all_reduce(x, codec=codec, op=op).wait()
    assert torch.equal(x, before), "all_reduce modified its input"
    return out


def roundtrip_error(codec, x: torch.Tensor) -> float:
    c = parse(codec)
    return float((c.decode(c.encode(x)).float() - x).abs().max())


def assert_identical(results):
    for r, out in enumerate(results):
        assert out.dtype == torch.float32
        assert torch.equal(out, results[0]), f"rank {r} differs from rank 0"


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
def test_fp32_all_reduce_exact_for_world_sizes(world):
    n = 3 * SHARD_ALIGN + 17  # shards of unequal size, some owners with none
    with ThreadGroup(world) as tg:
        mean = tg.run(reduce_fn, n, None, "mean")
        total = tg.run(reduce_fn, n, None, "sum")
    assert_identical(mean)
    assert_identical(total)
    expected = torch.zeros(n)
    for r in range(world):
        expected += rank_input(r, n)  # the same rank order as the shard owners add
    assert torch.equal(total[0], expected)
    assert torch.allclose(mean[0], expected / world, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("codec", DENSE)
def test_dense_codecs_identical_and_within_codec_error(codec):
    world, n = 4, 2 * SHARD_ALIGN + 999
    with ThreadGroup(world) as tg:
        results = tg.run(reduce_fn, n, codec, "mean")
    assert_identical(results)
    inputs = [rank_input(r, n) for r in range(world)]
    exact = torch.stack(inputs).mean(0)
    # |Q(mean Q(x_r)) - mean x_r| <= max_r |Q(x_r) - x_r| + |Q(m') - m'|, with slack for m' != m
    bound = max(roundtrip_error(codec, x) for x in inputs) + 2 * roundtrip_error(codec, exact) + 1e-5
    err = float((results[0] - exact).abs().max())
    assert err <= bound, f"{codec}: error {err} over bound {bound}"
    if codec not in ("fp32", "lz4"):
        assert err > 0  # a lossy codec really was used


@pytest.mark.parametrize("codec", SPARSE)
def test_sparse_codecs_sum_every_peers_payload(codec):
    world, n = 3, 8192
    with ThreadGroup(world) as tg:
        results = tg.run(reduce_fn, n, codec, "sum")
    assert_identical(results)
    c = parse(codec)
    expected = torch.zeros(n)
    for r in range(world):
        expected += c.decode(c.encode(rank_input(r, n))).float()
    assert torch.allclose(results[0], expected, rtol=1e-6, atol=1e-6)


def test_shapes_dtypes_and_tiny_tensors():
    with ThreadGroup(3) as tg:
        out = tg.run(reduce_fn, 12, "q8", "mean", shape=(3, 4))
        one = tg.run(reduce_fn, 1, None, "sum")
        bf = tg.run(lambda g: g.all_reduce(rank_input(g.rank, 100, torch.bfloat16), codec="bf16").wait())
    assert out[0].shape == (3, 4)
    assert_identical(out)
    assert torch.equal(one[0], sum(rank_input(r, 1) for r in range(3)))
    assert bf[0].dtype == torch.float32 and bf[0].shape == (100,)
    assert_identical(bf)


def test_shard_bounds_cover_everything_aligned():
    for n in (0, 1, 4095, 4096, 4097, 100_000):
        for parts in (1, 2, 3, 7):
            b = shard_bounds(n, parts)
            assert len(b) == parts and b[0][0] == 0 and b[-1][1] == n
            assert all(a1 == b0 for (_, a1), (b0, _) in zip(b, b[1:]))
            assert all(a % SHARD_ALIGN == 0 for a, _ in b if a < n)


def test_all_gather_and_broadcast():
    codec = parse("q8")

    def fn(group):
        mine = codec.encode(rank_input(group.rank, 300))
        got = group.all_gather(mine).wait()
        t = rank_input(group.rank, 50, torch.bfloat16)
        group.broadcast(t, src=2).wait()
        return [b"".join(bytes(f) for f in p.to_frames()) for p in got], [codec.decode(p) for p in got], t

    with ThreadGroup(4) as tg:
        results = tg.run(fn)
    for wire, decoded, t in results:
        assert wire == results[0][0]  # the same bytes on every rank
        for r in range(4):
            assert torch.equal(decoded[r], codec.decode(codec.encode(rank_input(r, 300))))
        assert torch.equal(t, rank_input(2, 50, torch.bfloat16))


def test_error_feedback_keeps_what_was_not_sent():
    def fn(group):
        ef = ErrorFeedback("q2")
        x = rank_input(group.rank, 5000)
        group.all_reduce(x, op="sum", error_feedback=ef, key="w").wait()
        return x, ef.residuals["w"].clone()

    with ThreadGroup(2) as tg:
        results = tg.run(fn)
    c = parse("q2")
    for x, residual in results:
        sent = c.decode(c.encode(x))
        assert float(residual.abs().max()) > 0
        assert torch.allclose(x - residual, sent, atol=1e-5)


def test_codec_and_error_feedback_must_agree():
    with ThreadGroup(1) as tg:
        with pytest.raises(ConfigError):
            tg.groups[0].all_reduce(torch.ones(4), codec="q4", error_feedback=ErrorFeedback("q8"))
        with pytest.raises(ConfigError):
            tg.groups[0].all_reduce(torch.ones(4), op="max")
        with pytest.raises(ConfigError):
            tg.groups[0].all_reduce(torch.ones(4), codec="topk:k=2,tile=4+q8", op="median")


def test_stats_count_payload_and_transport_bytes():
    def fn(group):
        group.all_reduce(rank_input(group.rank, 2 * SHARD_ALIGN), codec="q8").wait()
        return group.stats.as_dict()

    with ThreadGroup(2) as tg:
        s0, s1 = tg.run(fn)
    c = parse("q8")
    shard = c.encode(rank_input(0, SHARD_ALIGN)).nbytes  # every message here is one q8 shard
    assert s0["bytes_sent"] == 2 * shard == s1["bytes_received"]
    assert s0["transport_bytes_sent"] == s0["bytes_sent"] + 2  # one control byte per message
    assert s0["per_peer"][1]["bytes_sent"] == s0["bytes_sent"]
    assert s0["messages"] == 2 and s0["seconds_in_comm"] > 0


def test_handshake_mismatch_names_the_difference():
    def fn(group):
        group.verify({"codec": "q4", "shapes": [[4, 4], [4 + (group.rank == 2)]]})

    with ThreadGroup(3) as tg:
        errors = tg.run(fn, return_exceptions=True)
    assert all(isinstance(e, ConfigMismatch) for e in errors)
    assert "shapes" in str(errors[0]) and "[4]" in str(errors[0]) and "[5]" in str(errors[0])


def test_raise_names_the_lost_peer():
    def fn(group, tg):
        if group.rank == 1:
            tg.kill(1)
            return None
        return group.all_reduce(rank_input(group.rank, 10_000), codec="q8").wait()

    with ThreadGroup(3, on_failure="raise") as tg:
        results = tg.run(fn, tg, return_exceptions=True)
    for r in (0, 2):
        assert isinstance(results[r], PeerLost) and 1 in results[r].peers


@pytest.mark.parametrize("codec", [None, "q4", "topk:k=64,tile=4096+q8"])
@pytest.mark.parametrize("victim", [0, 2])
def test_drop_recomputes_among_survivors(codec, victim):
    n = 3 * SHARD_ALIGN

    def fn(group, tg):
        x = rank_input(group.rank, n)
        w = group.all_reduce(x, codec=codec, op="sum")
        if group.rank == victim:
            tg.kill(victim)  # dies at some point inside the collective
            return None
        out = w.wait()
        after = group.all_reduce(torch.ones(8), op="sum").wait()  # the group keeps working
        return out, w.participants, group.epoch, after

    with ThreadGroup(4, on_failure="drop") as tg:
        results = tg.run(fn, tg)
    survivors = [r for r in range(4) if r != victim]
    outs = [results[r] for r in survivors]
    for out, participants, epoch, after in outs:
        assert torch.equal(out, outs[0][0])
        assert participants == outs[0][1] and epoch == outs[0][2] == 1
        assert torch.equal(after, torch.full((8,), 3.0))
    # the victim is excluded unless, rarely, everyone committed before it died
    assert outs[0][1] == tuple(survivors) or outs[0][1] == (0, 1, 2, 3)
    c = None if codec is None else parse(codec)
    expected = torch.zeros(n)
    for r in outs[0][1]:
        x = rank_input(r, n)
        expected += x if c is None or not c.sparse else c.decode(c.encode(x)).float()
    if c is None or c.sparse:
        tol = 1e-5
    else:  # quantized contributions, then the sum quantized once more
        tol = sum(roundtrip_error(codec, rank_input(r, n)) for r in outs[0][1])
        tol += 2 * roundtrip_error(codec, expected)
    assert float((outs[0][0] - expected).abs().max()) <= tol


def test_wait_timeout_when_a_peer_never_joins():
    with ThreadGroup(2) as tg:
        w = tg.groups[0].all_reduce(torch.ones(4))
        with pytest.raises(CollectiveTimeout):
            w.wait(timeout=0.2)
        assert not w.done()
        assert tg.groups[0].stats.seconds_waited >= 0.2


def test_malformed_bytes_from_a_peer_raise_codec_error():
    def fn(group):
        if group.rank == 1:  # a hostile peer: junk where its q8 shard for rank 0 belongs
            group.carrier.send(0, (0, 1, 0), [b"\x00", b"LBND junk"], payload_bytes=9)
            return None
        return group.all_reduce(rank_input(0, 100), codec="q8").wait()

    with ThreadGroup(2) as tg:
        results = tg.run(fn, return_exceptions=True, timeout=30)
    assert isinstance(results[0], CodecError) and "peer 1" in str(results[0])


@pytest.mark.parametrize("op", ["median", "trimmed_mean", "norm_clip"])
@pytest.mark.parametrize("codec", [None, "q8"])
def test_robust_rules_resist_one_hostile_peer_of_eight(op, codec):
    n = 2 * SHARD_ALIGN
    truth = torch.linspace(-1, 1, n)

    def fn(group, op):
        noise = torch.randn(n, generator=torch.Generator().manual_seed(group.rank)) * 0.05
        x = truth + noise
        if group.rank == 3:
            x = -100 * x  # scaled and flipped
        return group.all_reduce(x, codec=codec, op=op).wait()

    with ThreadGroup(8) as tg:
        robust = tg.run(fn, op)
        plain = tg.run(fn, "mean")
    assert_identical(robust)
    assert float((plain[0] - truth).abs().max()) > 5  # the plain mean is ruined
    tol = 0.2 if op != "norm_clip" else 0.4  # norm_clip still admits one clipped (flipped) peer
    assert float((robust[0] - truth).abs().max()) < tol, op


def test_restarted_peer_rejoins_at_the_next_epoch():
    def fn(group, tg):
        if group.rank == 3:  # restarted: no state but its rank
            g = tg.rejoin(3)
            return g.all_reduce(torch.full((8,), 4.0), op="sum").wait(), g.participants, g.epoch
        for _ in range(500):  # the survivors keep training until the joiner waits, then admit it
            w = group.all_reduce(torch.ones(8))
            w.wait()
            assert 3 not in group.participants  # never admitted without an admit()
            if w.waiting:
                assert group.admit().wait() == (3,)
                break
            time.sleep(0.01)
        out = group.all_reduce(torch.full((8,), float(group.rank + 1)), op="sum").wait()
        return out, group.participants, group.epoch

    with ThreadGroup(4, on_failure="drop") as tg:
        tg.kill(3)
        results = tg.run(fn, tg, timeout=60)
    for out, participants, epoch in results:
        assert torch.equal(out, torch.full((8,), 10.0))
        assert participants == (0, 1, 2, 3) and epoch == results[0][2] == 2


def test_drop_mode_cuts_off_a_peer_that_sends_junk():
    def fn(group):
        if group.rank == 1:  # hostile: junk to rank 0, nothing to anyone else, never commits
            group.carrier.send(0, (0, 1, 0), [b"\x00", b"LBND junk"], payload_bytes=9)
            return None
        w = group.all_reduce(torch.full((3 * SHARD_ALIGN,), float(group.rank)), codec="q8", op="sum")
        return w.wait(), w.participants

    with ThreadGroup(3, on_failure="drop", timeout=2.0) as tg:
        results = tg.run(fn, timeout=60)
    (out0, parts0), (out2, parts2) = results[0], results[2]
    assert parts0 == parts2 == (0, 2)
    assert torch.equal(out0, out2) and torch.allclose(out0, torch.full_like(out0, 2.0), atol=0.02)


def test_error_feedback_applied_once_when_a_drop_forces_a_retry():
    n = 3 * SHARD_ALIGN

    def fn(group, tg):
        ef = ErrorFeedback("q2")
        x = rank_input(group.rank, n)
        w = group.all_reduce(x, op="sum", error_feedback=ef, key="w")
        if group.rank == 1:
            tg.kill(1)
            return None
        w.wait()
        return x, ef.residuals["w"].clone(), w.participants

    with ThreadGroup(3, on_failure="drop") as tg:
        results = tg.run(fn, tg)
    c = parse("q2")
    for r in (0, 2):
        x, residual, participants = results[r]
        assert participants == (0, 2) or participants == (0, 1, 2)
        assert torch.allclose(residual, x - c.decode(c.encode(x)), atol=1e-5)



def test_all_reduce_out_and_future() -> None:
    """Issue 17: ``out=`` receives the result in place (fp32 and codecs, raise and drop
    modes); ``Work.future()`` is completed by the group with the result."""

    def step(group):
        x = torch.arange(10_000, dtype=torch.float32) * (group.rank + 1)
        plain = group.all_reduce(x, codec="q8").wait()
        out = torch.full((10_000,), 5.0)
        w = group.all_reduce(x, codec="q8", out=out)
        got = w.future().wait()
        assert got.data_ptr() == out.data_ptr() and torch.equal(got, plain)
        seen = []
        w.add_done_callback(lambda work: seen.append(work.done()))  # already done: runs at once
        fp32 = group.all_reduce(x.view(100, 100), out=torch.empty(10_000)).wait()
        assert torch.equal(fp32.reshape(-1), group.all_reduce(x).wait())
        return seen, tuple(fp32.shape)

    for mode in ("raise", "drop"):
        with ThreadGroup(2, on_failure=mode) as tg:
            for seen, shape in tg.run(step):
                assert seen == [True] and shape == (100, 100)


def test_out_must_fit() -> None:
    with ThreadGroup(1) as tg:
        with pytest.raises(ConfigError, match="out must be"):
            tg.groups[0].all_reduce(torch.ones(4), out=torch.empty(5))


def test_future_carries_the_error() -> None:
    with ThreadGroup(2, peer_timeout=2.0) as tg:
        tg.kill(1)
        fut = tg.groups[0].all_reduce(torch.ones(8)).future()
        with pytest.raises(PeerLost):
            fut.wait()
