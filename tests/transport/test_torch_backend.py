"""backend="torch": real processes, a real TCPStore, gloo point-to-point over loopback."""

from __future__ import annotations

import os
import socket

import pytest
import torch

import lowband
from lowband.compress import parse
from lowband.errors import ConfigError, ConfigMismatch, PeerLost
from lowband.testing import ProcessDied, kill_self

pytestmark = pytest.mark.slow

CODECS = [None, "fp32", "fp16", "bf16", "q8", "q4", "q2", "q1", "sign", "q8+lz4", "topk:k=64,tile=4096+q8"]
N = 10_000


def rank_input(rank: int, n: int = N) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(rank)) * (rank + 1)


# -- worker functions: run in the pool's processes as fn(rank, world_size, *args) ----------------


def every_collective(rank, world, addr, codecs):
    group = lowband.init_group(rank, world, store=addr, backend="torch", peer_timeout=30)
    try:
        out = {}
        for codec in codecs:
            out[codec] = group.all_reduce(rank_input(rank), codec=codec, op="mean").wait()
        q8 = parse("q8")
        gathered = group.all_gather(q8.encode(rank_input(rank, 64))).wait()
        out["gather"] = [q8.decode(p) for p in gathered]
        t = rank_input(rank, 33)
        group.broadcast(t, src=world - 1).wait()
        out["broadcast"] = t
        group.barrier()
        out["stats"] = group.stats.as_dict()
        return out
    finally:
        group.close()


def mismatched(rank, world, addr):
    config = {"sync_every": 100, "shapes": [[8, 8], [8]] if rank != 1 else [[8, 8], [9]]}
    lowband.init_group(rank, world, store=addr, backend="torch", peer_timeout=30, config=config)


def killed_mid_collective(rank, world, addr, victim):
    group = lowband.init_group(rank, world, store=addr, backend="torch", peer_timeout=30)
    try:
        w = group.all_reduce(rank_input(rank, 1 << 20), codec="q8")
        if rank == victim:
            kill_self()  # SIGKILL with the collective in flight
        try:
            w.wait(timeout=60)
        except PeerLost as e:
            return ("lost", e.peers)
        return ("finished", None)
    finally:
        group.close()


def from_env(rank, world, port):
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        group = lowband.init_group(backend="torch", peer_timeout=30)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        return group.rank, group.all_reduce(torch.full((5,), float(rank)), op="sum").wait()
    finally:
        group.close()


# -- tests --------------------------------------------------------------------------------------


def test_every_codec_bit_identical_across_four_processes(process_pool, tcp_store):
    _, addr = tcp_store
    world = 4
    results = process_pool.run(world, every_collective, addr, CODECS, timeout=120)
    inputs = [rank_input(r) for r in range(world)]
    exact = torch.stack(inputs).mean(0)
    for codec in CODECS:
        for r in range(world):
            assert torch.equal(results[r][codec], results[0][codec]), f"{codec}: rank {r} differs"
        err = float((results[0][codec] - exact).abs().max())
        if codec in (None, "fp32"):
            assert err < 1e-5
        elif codec.startswith("topk"):
            c = parse(codec)
            sent = torch.stack([c.decode(c.encode(x)) for x in inputs]).mean(0)
            assert torch.allclose(results[0][codec], sent, atol=1e-5)
        else:
            c = parse(codec)
            bound = max(float((c.decode(c.encode(x)) - x).abs().max()) for x in inputs)
            bound += 2 * float((c.decode(c.encode(exact)) - exact).abs().max()) + 1e-5
            assert 0 < err <= bound, codec
    q8 = parse("q8")
    for r in range(world):
        assert torch.equal(results[r]["broadcast"], rank_input(world - 1, 33))
        for src in range(world):
            assert torch.equal(results[r]["gather"][src], q8.decode(q8.encode(rank_input(src, 64))))
        stats = results[r]["stats"]
        assert stats["bytes_sent"] > 0 and stats["transport_bytes_sent"] > stats["bytes_sent"]
        assert set(stats["per_peer"]) == set(range(world)) - {r}


# 3 and 4 processes run in the tests around; 8 peers run in-process (test_collectives.py):
# eight processes importing torch on two shared cores would cost minutes here.
@pytest.mark.parametrize("world", [2])
def test_world_sizes(process_pool, tcp_store, world):
    _, addr = tcp_store
    results = process_pool.run(world, every_collective, addr, [None, "q4"], timeout=180)
    exact = torch.stack([rank_input(r) for r in range(world)]).mean(0)
    for r in range(world):
        assert torch.equal(results[r][None], results[0][None])
        assert torch.equal(results[r]["q4"], results[0]["q4"])
    assert torch.allclose(results[0][None], exact, atol=1e-5)


def test_handshake_mismatch_fails_clearly(process_pool, tcp_store):
    _, addr = tcp_store
    results = process_pool.run(3, mismatched, addr, timeout=60, return_exceptions=True)
    for e in results:
        assert isinstance(e, ConfigMismatch), e
        assert "config.shapes" in str(e) and "[9]" in str(e)


# rank 0 is the interesting victim (nothing may depend on it); the ZeroMQ tests kill others.
@pytest.mark.parametrize("victim", [0])
def test_kill_9_mid_collective_raises_peer_lost(process_pool, tcp_store, victim):
    _, addr = tcp_store
    results = process_pool.run(3, killed_mid_collective, addr, victim, timeout=90, return_exceptions=True)
    assert isinstance(results[victim], ProcessDied) and results[victim].exitcode == -9
    for r in range(3):
        if r != victim:
            assert results[r][0] == "lost" and victim in results[r][1], results[r]


def test_env_rendezvous_like_torchrun(process_pool):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = process_pool.run(3, from_env, port, timeout=90)
    assert [r for r, _ in results] == [0, 1, 2]
    for _, out in results:
        assert torch.equal(out, torch.full((5,), 3.0))


def test_torch_backend_refuses_drop_and_bad_arguments():
    with pytest.raises(ConfigError, match="on_failure"):
        lowband.init_group(0, 2, store="127.0.0.1:1", backend="torch", on_failure="drop")
    with pytest.raises(ConfigError, match="rank"):
        lowband.init_group(2, 2, store="127.0.0.1:1", backend="torch")
    with pytest.raises(ConfigError, match="host:port"):
        lowband.init_group(0, 2, store="nowhere", backend="torch")
    with pytest.raises(ConfigError, match="backend"):
        lowband.init_group(0, 2, store="127.0.0.1:1", backend="mpi")
