"""Checkpoints: atomic writes, full disk, crash mid-write, bit-for-bit resume."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import shutil
import subprocess
import uuid

import numpy as np
import pytest
import torch

import lowband
from lowband.errors import CheckpointError, ConfigError


def make() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(4, 8)  # data drawn from the RNG: resuming must restore it
        noise = float(np.random.rand()) + random.random()
        loss = ((model(x) - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_resume_matches_uninterrupted_run_bit_for_bit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, opt = make()
    train(model, opt, 5)
    lowband.save(tmp_path / "c.pt", model, opt, step=5, data_position=[5, 0])
    train(model, opt, 7)
    straight = [p.detach().clone() for p in model.parameters()]

    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)  # disturb every RNG: load must restore them
    model2, opt2 = make()
    extra = lowband.load(tmp_path / "c.pt", model2, opt2)
    assert extra == {"step": 5, "data_position": [5, 0]}
    train(model2, opt2, 7)
    for a, b in zip(straight, model2.parameters()):
        assert torch.equal(a, b)


def test_unloadable_extra_is_refused_before_writing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, opt = make()
    lowband.save(tmp_path / "c.pt", model, opt, step=1)
    with pytest.raises(ConfigError, match="bad"):
        lowband.save(tmp_path / "c.pt", model, opt, bad={"x": object()})  # load (weights_only) could not read it
    assert lowband.load(tmp_path / "c.pt", model, opt) == {"step": 1}
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root to mount a tiny tmpfs (a real full disk)")
def test_full_disk_mid_checkpoint_keeps_previous(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)], check=True)
    try:
        small = torch.nn.Linear(4, 4)
        lowband.save(d / "c.pt", small, None, step=1)
        big = torch.nn.Linear(1024, 1024)  # 4 MiB: cannot fit
        with pytest.raises(CheckpointError, match="previous checkpoint is untouched"):
            lowband.save(d / "c.pt", big, None, step=2)
        assert lowband.load(d / "c.pt", small, None) == {"step": 1}
        assert sorted(os.listdir(d)) == ["c.pt"]
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def _write_forever(path: str) -> None:
    big = torch.nn.Linear(2048, 2048)
    for i in range(10_000):
        lowband.save(path, big, None, step=i)


def test_kill_mid_write_leaves_a_loadable_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "c.pt")
    lowband.save(path, torch.nn.Linear(2048, 2048), None, step=-1)
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_write_forever, args=(path,), daemon=True)
    p.start()
    try:
        deadline = 60.0
        import time

        t0 = time.monotonic()
        while not any(f.endswith(".tmp") for f in os.listdir(tmp_path)) and time.monotonic() - t0 < deadline:
            time.sleep(0.01)
        p.kill()  # SIGKILL while a write is (very likely) in progress
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
    extra = lowband.load(path, torch.nn.Linear(2048, 2048), None)
    assert isinstance(extra["step"], int)


def test_corrupt_or_foreign_file_raises_checkpoint_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        lowband.load(tmp_path / "junk.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a"):
        lowband.load(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        lowband.load(tmp_path / "missing.pt")
