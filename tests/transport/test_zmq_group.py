"""backend="zmq" end to end: init_group in real processes, the coordinator in its own
process, collectives bit-identical on every peer, a kill -9 mid-collective (rank 0 too)."""

from __future__ import annotations

import os

import pytest
import torch

import lowband
from lowband.errors import ConfigMismatch
from lowband.testing import kill_self
from lowband.transport.coordinator import start_coordinator

pytestmark = pytest.mark.slow
N = 50_000


def rank_input(rank: int, n: int = N) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(100 + rank)) * (rank + 1)


def reduce_codecs(rank, world, addr, name, codecs):
    group = lowband.init_group(rank, world, store=addr, backend="zmq", peer_timeout=20, group_name=name, streams=2)
    try:
        before = group.stats.as_dict()
        works = {c: group.all_reduce(rank_input(rank), codec=c, op="mean") for c in codecs}
        out = {c: w.wait() for c, w in works.items()}
        t = rank_input(rank, 77)
        bw = group.broadcast(t, src=world - 1)
        bw.wait()
        out["broadcast"] = t
        out["stats"] = group.stats.as_dict()
        out["before"] = before
        out["works"] = [w.stats.as_dict() for w in [*works.values(), bw]]
        return out
    finally:
        group.close()


@pytest.fixture(scope="module")
def coordinator():
    with start_coordinator() as co:
        yield co.address


def test_all_reduce_bit_identical_over_zmq(process_pool, coordinator: str) -> None:
    codecs = [None, "q4", "topk:k=64,tile=4096+q8"]
    world = 4
    res = process_pool.run(world, reduce_codecs, coordinator, f"codecs-{os.getpid()}", codecs, timeout=240)
    expected = torch.stack([rank_input(r) for r in range(world)]).mean(0)
    for c in codecs:
        for r in range(1, world):
            assert torch.equal(res[r][c], res[0][c]), f"{c}: rank {r} differs from rank 0"
    torch.testing.assert_close(res[0][None], expected, rtol=1e-5, atol=1e-5)
    assert (res[0]["q4"] - expected).abs().mean() < expected.abs().mean()  # a real, lossy reduction
    for r in range(world):
        assert torch.equal(res[r]["broadcast"], rank_input(world - 1, 77))
        assert res[r]["stats"]["bytes_sent"] > 0
        assert res[r]["stats"]["transport_bytes_sent"] > res[r]["stats"]["bytes_sent"]
        # each Work counts its own messages exactly: together, all the group's payload
        # messages since; the group's transport bytes also hold heartbeats and acks
        works, now, was = res[r]["works"], res[r]["stats"], res[r]["before"]
        for name in ("bytes_sent", "bytes_received", "messages"):
            assert sum(w[name] for w in works) == now[name] - was[name], name
        for name in ("transport_bytes_sent", "transport_bytes_received"):
            assert sum(w[name] for w in works) <= now[name] - was[name], name
        assert all(w["transport_bytes_sent"] > w["bytes_sent"] for w in works if w["bytes_sent"])


def killed(rank, world, addr, name, victim):
    group = lowband.init_group(rank, world, store=addr, backend="zmq", peer_timeout=3, group_name=name,
                               on_failure="drop", streams=2)
    try:
        group.all_reduce(rank_input(rank, 1000)).wait(timeout=60)  # everyone is up
        w = group.all_reduce(rank_input(rank, 1 << 18), codec="q8")
        if rank == victim:
            kill_self()
        result = w.wait(timeout=120)
        after = group.all_reduce(rank_input(rank, 1000), op="sum").wait(timeout=120)
        return result, tuple(w.participants), after
    finally:
        group.close()


@pytest.mark.parametrize("victim", [0, 2])
def test_kill_9_mid_collective_survivors_agree(process_pool, coordinator: str, victim: int) -> None:
    world = 4
    res = process_pool.run(world, killed, coordinator, f"kill{victim}-{os.getpid()}", victim, timeout=240,
                           return_exceptions=True)
    survivors = [r for r in range(world) if r != victim]
    first = res[survivors[0]]
    for r in survivors:
        assert not isinstance(res[r], BaseException), res[r]
        assert torch.equal(res[r][0], first[0]) and torch.equal(res[r][2], first[2])
    parts = first[1]
    # the collective either finished before the kill (all four) or among the survivors alone
    assert parts in (tuple(range(world)), tuple(survivors))
    expected_after = torch.stack([rank_input(r, 1000) for r in survivors]).sum(0)
    torch.testing.assert_close(first[2], expected_after, rtol=1e-5, atol=1e-4)


def mismatched(rank, world, addr, name):
    config = {"sync_every": 100 if rank != 1 else 50}
    lowband.init_group(rank, world, store=addr, backend="zmq", peer_timeout=10, group_name=name,
                       config=config, init_timeout=60)


def test_config_mismatch_fails_clearly(process_pool, coordinator: str) -> None:
    res = process_pool.run(2, mismatched, coordinator, f"mm-{os.getpid()}", timeout=120, return_exceptions=True)
    assert all(isinstance(e, ConfigMismatch) for e in res), res
    assert any("sync_every" in str(e) for e in res)


def reduce_into(rank, world, addr, name):
    """fp32 all-reduces of changing sizes into one preallocated ``out`` (issue 17.1): messages of
    many chunks land in posted buffers, the receive space is reused across collectives, and a
    result changed by the caller at once never reaches a peer (it was sent from scratch space)."""
    group = lowband.init_group(
        rank, world, store=addr, backend="zmq", peer_timeout=20, group_name=name, streams=2, chunk_size=4096
    )
    try:
        out = torch.empty(N)
        results = []
        for k, n in enumerate([N, 3 * 4096 + 5, N, 9000, N]):
            x = rank_input(rank, n) + k
            r = group.all_reduce(x, op="sum", out=out[:n]).wait()
            assert r.data_ptr() == out.data_ptr()
            results.append(r.clone())
            r.mul_(-7.0)  # the caller reuses its buffer at once
        inbound = group.carrier.io.inbound
        return results, {p: ib.pending_bytes for p, ib in inbound.items()}
    finally:
        group.close()


def test_all_reduce_into_preallocated_out_over_zmq(process_pool, coordinator: str) -> None:
    world = 3
    res = process_pool.run(world, reduce_into, coordinator, f"into-{os.getpid()}", timeout=240)
    for k, n in enumerate([N, 3 * 4096 + 5, N, 9000, N]):
        exact = torch.stack([rank_input(r, n) + k for r in range(world)]).sum(0)
        for r in range(world):
            assert torch.equal(res[r][0][k], res[0][0][k])
        assert torch.allclose(res[0][0][k], exact, rtol=1e-5, atol=1e-5)
    for _, pending in res:
        assert all(v == 0 for v in pending.values())
