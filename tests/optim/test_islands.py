"""Islands (docs/islands.md): FSDP2, DDP or a plain model inside each island of gloo
processes, lowband between islands; each run must equal flat DiLoCo (one whole replica per
rank of a plain group, the same data per replica).

Bit for bit: each rank of an island sees the whole of its island's batch, so the island's
averaged gradient is exactly one process's (a sum of 2 equal fp32 values, halved, is
exact), and the outer reduction over the canonical layout adds the same values in the same
order as the flat group. With ``split=True`` each rank sees half the batch: the island's
gradient is a mean of two half-batch means, equal to the whole-batch mean to fp32 rounding.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from island_workers import flat, island

from lowband.testing import ThreadGroup, spawn_group, start_store
from lowband.transport.coordinator import start_coordinator

_names = itertools.count()


@pytest.fixture(scope="module")
def coordinator():
    with start_coordinator() as co:
        yield co.address


def _run(coordinator: str, sizes: list[int], **kw):
    store, addr = start_store()
    name = f"islands-{os.getpid()}-{next(_names)}"
    try:
        return spawn_group(sum(sizes), island, sizes, addr, coordinator, name, timeout=120, **kw)
    finally:
        del store


def _flat(n: int, method: str = "diloco", steps: int = 9, codec=None):
    with ThreadGroup(n) as tg:
        return tg.run(flat, method, steps, codec)


def _same(a, b) -> None:
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


def test_fsdp2_2x2_equals_flat_bit_for_bit(coordinator: str) -> None:
    results = _run(coordinator, [2, 2], wrap=["fsdp", "fsdp"])
    want = _flat(2)
    for r in results:
        _same(r["params"], want[r["island"]])
        assert r["syncs"] == 3 and r["flows"] == 1 and r["island_flows"] == 2


def test_ddp_2x2_split_batch_equals_flat_to_rounding(coordinator: str) -> None:
    results = _run(coordinator, [2, 2], wrap=["ddp", "ddp"], split=True)
    want = _flat(2)
    for r in results:
        for x, y in zip(r["params"], want[r["island"]]):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    # the two ranks of an island hold the same replica, bit for bit
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b)


def test_uneven_2_plus_1_equals_flat_bit_for_bit(coordinator: str) -> None:
    results = _run(coordinator, [2, 1], wrap=["fsdp", "plain"])
    want = _flat(2)
    for r in results:
        _same(r["params"], want[r["island"]])
    # the island of 1 owns both canonical segments: two flows from its one rank
    assert [r["flows"] for r in results] == [1, 1, 2]
    assert all(r["island_flows"] == 2 for r in results)
    # WAN payload bytes per island: the flat peer's, but for the headers of one more payload
    # per sync and peer (two segments: two buckets where the flat run has one)
    from island_workers import flat_bytes

    for k in (0, 1):
        island_bytes = sum(r["bytes_sent"] for r in results if r["island"] == k)
        assert 0 <= island_bytes - flat_bytes[k] <= 3 * 2 * 128, (island_bytes, flat_bytes[k])
    # outer state per rank: half the model on each rank of the island of 2
    assert results[0]["outer_bytes"] + results[1]["outer_bytes"] == results[2]["outer_bytes"]


def test_uneven_islands_reduce_like_equal_islands_with_a_codec(coordinator: str) -> None:
    """With q8 and error feedback the wire is lossy, so the flat run (other buckets) differs;
    but 2+1 and 2x2 share the canonical layout and give the same bits."""
    uneven = _run(coordinator, [2, 1], wrap=["fsdp", "plain"], codec="q8")
    even = _run(coordinator, [2, 2], wrap=["fsdp", "ddp"], codec="q8")
    by_island = {r["island"]: r["params"] for r in even}
    for r in uneven:
        _same(r["params"], by_island[r["island"]])
    assert sum(r["bytes_sent"] for r in uneven if r["island"] == 1) == sum(
        r["bytes_sent"] for r in even if r["island"] == 1
    )


@pytest.mark.parametrize("method", ["streaming", "demo"])
def test_sharded_checkpoint_resumes_bit_for_bit(coordinator: str, method: str) -> None:
    """Save mid-run (FSDP2 model state dict and the optimizer's, per rank: each rank keeps
    its own shards and outer state), rebuild, load, finish: the same bits as without the
    break. Streaming fragments with overlap, so a sync in flight is saved too (DeMo with
    overlap: its exchange in flight)."""
    results = _run(
        coordinator, [2, 1], wrap=["fsdp", "plain"], method=method, codec="q8" if method == "streaming" else None,
        steps=10, resume_at=5,
    )
    for r in results:
        _same(r["params"], r["straight"])
    # overlap mixes local and global values; still the three ranks agree per island
    _same(results[0]["params"], results[1]["params"])


def test_dead_island_is_dropped(coordinator: str) -> None:
    results = _run(
        coordinator, [2, 1], wrap=["fsdp", "plain"], on_failure="drop", die=1, steps=9,
        return_exceptions=True,
    )
    alive = [r for r in results if isinstance(r, dict)]
    assert len(alive) == 2 and {r["island"] for r in alive} == {0}
    assert all(r["syncs"] == 3 for r in alive)
    # alone after the first sync, island 0 is flat DiLoCo of one replica from there on
    _same(alive[0]["params"], alive[1]["params"])


def test_compressed_gradients_over_islands_equal_flat(coordinator: str) -> None:
    results = _run(coordinator, [2, 1], wrap=["fsdp", "plain"], method="compressed", steps=4)
    want = _flat(2, "compressed", steps=4)
    for r in results:
        _same(r["params"], want[r["island"]])
    assert all(r["syncs"] == 4 for r in results)


def test_sparseloco_uneven_islands_equal_even_islands(coordinator: str) -> None:
    uneven = _run(coordinator, [2, 1], wrap=["ddp", "plain"], method="sparseloco")
    even = _run(coordinator, [2, 2], wrap=["ddp", "fsdp"], method="sparseloco")
    by_island = {r["island"]: r["params"] for r in even}
    for r in uneven:
        _same(r["params"], by_island[r["island"]])


def test_islands_need_a_shared_coordinator(monkeypatch: pytest.MonkeyPatch) -> None:
    import lowband
    from lowband.errors import ConfigError

    monkeypatch.delenv("LOWBAND_COORDINATOR", raising=False)
    with pytest.raises(ConfigError, match="one lowband coordinator shared by every island"):
        lowband.init_group(island=object(), island_id=0, islands=2)
    monkeypatch.delenv("LOWBAND_ISLAND", raising=False)
    with pytest.raises(ConfigError, match="LOWBAND_ISLAND"):
        lowband.init_group(island=object(), islands=2, store="127.0.0.1:1")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LOWBAND_SLOW_ISLANDS") != "1", reason="opt-in: LOWBAND_SLOW_ISLANDS=1")
def test_torchrun_islands_with_a_shared_coordinator(coordinator: str, tmp_path) -> None:
    """The recipe of docs/islands.md: torchrun per island, $LOWBAND_* for the rest."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("island_torchrun.py")
    procs = []
    try:
        for k, n in enumerate((2, 1)):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            env = {**os.environ, "LOWBAND_COORDINATOR": coordinator, "LOWBAND_ISLAND": str(k),
                   "LOWBAND_ISLANDS": "2", "PYTHONPATH": str(script.parents[2])}  # lowband's checkout
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                 "--master-addr", "127.0.0.1", "--master-port", str(port), str(script)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            ))
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), outs
    lines = [line.split() for out in outs for line in out.splitlines() if line.startswith("island ")]
    assert sorted((int(x[1]), int(x[3]), int(x[5]), int(x[7])) for x in lines) == [
        (0, 0, 2, 1), (0, 1, 2, 1), (1, 0, 2, 2)
    ]
    assert len({x[9] for x in lines}) == 1  # 6 steps end on a sync: one model everywhere


def test_demo_uneven_islands_equal_even_islands(coordinator: str) -> None:
    """DeMo over islands: whole-parameter segments, one DeMo per segment on its owner."""
    uneven = _run(coordinator, [2, 1], wrap=["fsdp", "plain"], method="demo", steps=5)
    even = _run(coordinator, [2, 2], wrap=["fsdp", "ddp"], method="demo", steps=5)
    by_island = {r["island"]: r["params"] for r in even}
    for r in uneven:
        _same(r["params"], by_island[r["island"]])
    # overlap=True: the 5th exchange is still in flight
    assert [r["flows"] for r in uneven] == [1, 1, 2] and all(r["syncs"] == 4 for r in uneven)
    # every step exchanges: the islands hold one model (DeMo applies the same update everywhere)
    _same(uneven[0]["params"], uneven[2]["params"])


def test_hsdp_4_plus_fsdp_2_equals_flat_bit_for_bit(coordinator: str) -> None:
    """4+2: four canonical segments; HSDP (2 replicas x 2 shards) in the island of 4, FSDP2
    in the island of 2, whose ranks own two segments (two flows) each."""
    results = _run(coordinator, [4, 2], wrap=["hsdp", "fsdp"])
    want = _flat(2)
    for r in results:
        _same(r["params"], want[r["island"]])
    assert [r["flows"] for r in results] == [1, 1, 1, 1, 2, 2]
    assert all(r["island_flows"] == 4 for r in results)
