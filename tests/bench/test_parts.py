"""The benchmark's parts in one process: corpus, model, the ddp baseline, the report."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lowband.bench._ddp import BucketedAllReduce
from lowband.bench.data import get_batch, load_corpus
from lowband.bench.model import PRESETS, CharTransformer, evaluate_loss
from lowband.bench.report import compare_to_baseline, link_projections, summarize, targets
from lowband.errors import ConfigError
from lowband.testing import ThreadGroup


def test_default_corpus_is_hashed_and_split() -> None:
    c = load_corpus()
    assert c.nbytes == c.train.numel() + c.val.numel()
    assert len(c.sha256) == 64
    assert 0.09 < c.val.numel() / c.nbytes < 0.11
    assert load_corpus().sha256 == c.sha256  # a fixed list, read the same way twice


def test_data_file_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_bytes(bytes(range(256)) * 40)
    c = load_corpus(f)
    assert (c.name, c.nbytes) == ("t.txt", 10240)
    assert torch.equal(
        torch.cat([c.train, c.val]), torch.tensor(list(range(256)) * 40, dtype=torch.uint8)
    )
    (tmp_path / "small.txt").write_bytes(b"x" * 100)
    with pytest.raises(ConfigError, match="at least"):
        load_corpus(tmp_path / "small.txt")
    with pytest.raises(ConfigError, match="cannot read"):
        load_corpus(tmp_path / "missing.txt")


def test_batches_are_next_byte_windows_from_one_split() -> None:
    tokens = torch.arange(200, dtype=torch.uint8)
    x, y = get_batch(tokens, 5, 16, generator=torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (5, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))  # consecutive bytes of the split


@pytest.fixture
def one_thread():  # type: ignore[no-untyped-def]
    """Small models run faster on one thread, above all on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_model_learns_and_loss_starts_near_uniform(one_thread: None) -> None:
    torch.manual_seed(0)
    c = load_corpus()
    m = CharTransformer(PRESETS["tiny"])
    first = evaluate_loss(m, c.val, batches=2, batch_size=8)
    assert abs(first - math.log(256)) < 0.3
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        x, y = get_batch(c.train, 8, m.cfg.block_size, generator=g)
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert evaluate_loss(m, c.val, batches=2, batch_size=8) < first - 0.7


@pytest.mark.parametrize("bucket_bytes", [1 << 30, 4096])
def test_ddp_baseline_averages_gradients_like_one_big_batch(bucket_bytes: int) -> None:
    world = 3
    torch.manual_seed(0)
    reference = CharTransformer(PRESETS["tiny"])
    batches = [
        torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(r))
        for r in range(world)
    ]

    def rank_fn(group):  # type: ignore[no-untyped-def]
        m = CharTransformer(PRESETS["tiny"])
        if group.rank == 0:  # only rank 0 holds the reference weights: the reducer broadcasts them
            m.load_state_dict(reference.state_dict())
        ddp = BucketedAllReduce(m.parameters(), group, bucket_bytes=bucket_bytes)
        x = batches[group.rank]
        _, loss = m(x, x)
        loss.backward()
        ddp.wait()
        ddp.remove()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    with ThreadGroup(world) as tg:
        grads = tg.run(rank_fn, timeout=120)
    expected: dict[str, torch.Tensor] = {}
    for x in batches:
        reference.zero_grad()
        _, loss = reference(x, x)
        loss.backward()
        for n, p in reference.named_parameters():
            expected[n] = expected.get(n, 0) + p.grad / world
    for n in expected:
        for r in range(world):
            assert torch.equal(grads[r][n], grads[0][n])  # every peer the same bits
        torch.testing.assert_close(grads[0][n], expected[n], rtol=1e-5, atol=1e-6)


def _fake_worker_result(sent: int, wall: float, val: float) -> dict:
    comm = {
        k: 0.0
        for k in (
            "bytes_sent",
            "bytes_received",
            "transport_bytes_sent",
            "transport_bytes_received",
            "messages",
            "syncs",
            "seconds_in_comm",
            "seconds_waited",
        )
    }
    comm.update(bytes_sent=sent, bytes_received=sent, messages=20)
    return {
        "comm": comm,
        "setup": dict(comm, bytes_sent=0),
        "wall_s": wall,
        "eval_s": 0.1,
        "final_train_loss": val - 0.1,
        "final_val_loss": val,
    }


def test_report_ratios_gaps_and_targets_come_from_the_inputs() -> None:
    curve = {0: [{"step": 0, "train_loss": 5.5, "val_loss": 5.5, "bytes_sent": 0, "wall_s": 0.0}]}
    ddp = summarize(
        "ddp",
        {0: _fake_worker_result(600_000, 100.0, 2.0), 1: _fake_worker_result(400_000, 90.0, 2.0)},
        curve,
        None,
    )
    sl = summarize(
        "sparseloco",
        {0: _fake_worker_result(1000, 10.0, 2.3), 1: _fake_worker_result(1000, 12.0, 2.3)},
        curve,
        None,
    )
    methods = {"ddp": ddp, "sparseloco": sl}
    compare_to_baseline(methods)
    assert ddp["payload_bytes_sent"] == 500_000 and ddp["wall_s"] == 100.0
    assert sl["compression_vs_ddp"] == pytest.approx(500.0)
    assert sl["speedup_vs_ddp"] == pytest.approx(100.0 / 12.0)
    assert sl["gap_fraction_of_ddp_drop"] == pytest.approx(0.3 / 3.5)
    got = {t["check"]: t["met"] for t in targets(methods, "default")}
    assert got == {
        "sparseloco: payload bytes, ddp / sparseloco": True,
        "sparseloco: wall time, ddp / sparseloco": True,
    }
    long = {t["check"]: t["met"] for t in targets(methods, "long")}
    assert long["ddp: final / initial validation loss"] is True  # 2.0 / 5.5
    assert long["sparseloco: loss gap to ddp / ddp's drop"] is True
    rows = link_projections(methods, measured_bps=1e8, measured_delay=0.05, params=1000)
    assert all(r["projection"] for r in rows)
    one_gig = next(
        r
        for r in rows
        if r["method"] == "ddp" and r["link"] == "1 Gbit/s" and r["model"].startswith("this")
    )
    # two workers: 20 messages each are 20 one-way hops
    assert one_gig["projected_comm_s"] == pytest.approx(20 * 0.05 + 500_000 * 8 / 1e9)
    ten_b = next(
        r
        for r in rows
        if r["method"] == "ddp" and r["model"] == "10B params" and r["link"] == "1 Gbit/s"
    )
    assert ten_b["payload_bytes_per_worker"] == pytest.approx(500_000 * 1e7)
