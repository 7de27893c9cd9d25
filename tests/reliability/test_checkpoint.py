"""Checkpoints: atomic writes, full disk, crash mid-write, bit-for-bit resume, integrity and hostile files."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
import zipfile

import numpy as np
import pytest
import torch

import lowband
from lowband import checkpoint as ck
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


# -- integrity, validation before applying, caps (issue 15 item 6) ------------------------------



def split(blob: bytes) -> tuple[int, dict, bytes]:
    """(version, header tree, tensor data) of a checkpoint's bytes."""
    _, version, hlen = ck._PREFIX.struct.unpack_from(blob)
    start = ck._PREFIX.size
    return version, json.loads(blob[start : start + hlen]), blob[start + hlen : -ck.DIGEST]


def join(tree: object, data: bytes, version: int = ck.VERSION) -> bytes:
    """A checkpoint with correct lengths and hash around ``tree`` and ``data``."""
    header = json.dumps(tree).encode()
    body = ck._PREFIX.struct.pack(ck.MAGIC, version, len(header)) + header + data
    return body + hashlib.sha256(body).digest()


def params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.state_dict().values()]


def test_every_single_bit_flip_is_detected(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, opt = make()
    train(model, opt, 1)
    lowband.save(tmp_path / "c.pt", model, opt, step=1)
    good = (tmp_path / "c.pt").read_bytes()
    rnd = random.Random(15)
    bits = [rnd.randrange(len(good) * 8) for _ in range(48)] + [0, 7, len(good) * 8 - 1]  # the ends too
    target, _ = make()
    before = params(target)
    for bit in bits:
        bad = bytearray(good)
        bad[bit // 8] ^= 1 << (bit % 8)
        (tmp_path / "bad.pt").write_bytes(bytes(bad))
        with pytest.raises(CheckpointError):
            lowband.load(tmp_path / "bad.pt", target, None, restore_rng=False)
    assert all(torch.equal(a, b) for a, b in zip(before, params(target)))


def test_a_bad_rng_section_leaves_model_and_optimizer_untouched(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, opt = make()
    train(model, opt, 2)
    lowband.save(tmp_path / "c.pt", model, opt, step=2)
    version, tree, data = split((tmp_path / "c.pt").read_bytes())
    rng = dict(tree["dict"])["rng"]
    for item in rng["dict"]:
        if item[0] == "python":
            item[1] = {"tuple": [3, {"tuple": [1, 2, 3]}, None]}  # well formed, but not a Mersenne state
    (tmp_path / "bad.pt").write_bytes(join(tree, data, version))
    target, target_opt = make()
    before, opt_before = params(target), target_opt.state_dict()
    py_state = random.getstate()
    with pytest.raises(CheckpointError, match="rng"):
        lowband.load(tmp_path / "bad.pt", target, target_opt)
    assert all(torch.equal(a, b) for a, b in zip(before, params(target)))
    assert target_opt.state_dict() == opt_before and random.getstate() == py_state
    lowband.load(tmp_path / "bad.pt", target, target_opt, restore_rng=False)  # the rest was fine
    assert not all(torch.equal(a, b) for a, b in zip(before, params(target)))


def test_a_model_section_of_the_wrong_shape_changes_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lowband.save(tmp_path / "c.pt", torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)), None)
    target, _ = make()  # the last layer has 1 output, not 2: torch would copy the first layer, then fail
    before = params(target)
    with pytest.raises(CheckpointError, match="shape"):
        lowband.load(tmp_path / "c.pt", target, None)
    assert all(torch.equal(a, b) for a, b in zip(before, params(target)))


def test_declared_sizes_beyond_the_file_are_refused_before_allocating(tmp_path) -> None:  # type: ignore[no-untyped-def]
    huge = {"tensor": ["float32", [1 << 28], 1 << 30, "cpu"]}  # 1 GiB declared in a file of a few hundred bytes
    tree = {"dict": [["format", ck.FORMAT], ["model", {"dict": [["w", huge]]}], ["optimizer", None],
                     ["rng", None], ["extra", {"dict": []}]]}
    (tmp_path / "bomb.pt").write_bytes(join(tree, b""))
    with pytest.raises(CheckpointError, match="does not fit"):
        lowband.load(tmp_path / "bomb.pt")
    (tmp_path / "bighead.pt").write_bytes(ck._PREFIX.pack(1 << 40) + b"{}")
    with pytest.raises(CheckpointError, match="header of"):
        lowband.load(tmp_path / "bighead.pt")
    lowband.save(tmp_path / "c.pt", torch.nn.Linear(64, 64), None)
    with pytest.raises(CheckpointError, match="over the cap"):
        lowband.load(tmp_path / "c.pt", max_bytes=1000)


def test_a_deflate_bomb_in_the_old_torch_zip_format_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with zipfile.ZipFile(tmp_path / "bomb.pt", "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("archive/data/0", "w") as f:
            chunk = bytes(1 << 20)
            for _ in range(64):  # 64 MiB of zeros, deflated to ~64 KiB
                f.write(chunk)
    assert (tmp_path / "bomb.pt").stat().st_size < 1 << 20
    with pytest.raises(CheckpointError, match="torch zip"):
        lowband.load(tmp_path / "bomb.pt")


def test_unknown_format_versions_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lowband.save(tmp_path / "c.pt", torch.nn.Linear(2, 2), None)
    _, tree, data = split((tmp_path / "c.pt").read_bytes())
    for version in (1, 3, 2**32 - 1):
        (tmp_path / "v.pt").write_bytes(join(tree, data, version))
        with pytest.raises(CheckpointError, match=f"version {version}"):
            lowband.load(tmp_path / "v.pt")


def test_hostile_structures_raise_checkpoint_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lowband.save(tmp_path / "c.pt", torch.nn.Linear(2, 2), None, step=1)
    good = (tmp_path / "c.pt").read_bytes()
    _, tree, data = split(good)
    cases = [
        good[: len(good) // 2], good[:5], b"", b"\x00" * 100,
        join([1, 2], data), join({"dict": "x"}, data), join({"dict": [[1.5, None]]}, data),
        join({"nope": 1}, data), join(tree, data + b"x"), join(tree, data[:-1]),
        join({"list": [{"list": []}] * 0 + [None]}, b""), join(json.loads("[" * 10 + "]" * 10), b""),
    ]
    deep: object = None
    for _ in range(200):
        deep = {"list": [deep]}
    cases.append(join(deep, b""))
    for i, blob in enumerate(cases):
        (tmp_path / f"h{i}.pt").write_bytes(blob)
        with pytest.raises(CheckpointError):
            lowband.load(tmp_path / f"h{i}.pt", torch.nn.Linear(2, 2), None)
    with pytest.raises(CheckpointError):
        lowband.load(tmp_path)  # a directory


# -- temporary files of dead writers -----------------------------------------------------------

_WRITER = textwrap.dedent("""
    import sys, torch, lowband
    big = torch.nn.Linear(1024, 2048)
    for i in range(100000):
        lowband.save(sys.argv[1], big, None, step=i)
""")


def test_kills_mid_save_leave_no_orphans_after_the_next_save(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "c.pt"
    lowband.save(path, torch.nn.Linear(1024, 2048), None, step=-1)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], env=env) for _ in range(5)]
    try:
        for p in procs:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 60 and p.poll() is None:
                if any(f".{p.pid}." in f for f in os.listdir(tmp_path)):
                    break
                time.sleep(0.002)
            p.send_signal(signal.SIGKILL)  # mid-save: its temp file was there a moment ago
            p.wait(10)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    orphans = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert orphans, "no writer was caught mid-save"
    assert isinstance(lowband.load(path, torch.nn.Linear(1024, 2048), None)["step"], int)  # the last good one
    lowband.save(path, torch.nn.Linear(4, 4), None, step=99)
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]
    assert lowband.load(path, torch.nn.Linear(4, 4), None) == {"step": 99}


def test_a_live_writers_temp_file_is_kept(tmp_path) -> None:  # type: ignore[no-untyped-def]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait(30)
        live_tmp = f".lowband-ckpt.{ck._HOST}.{sleeper.pid}.abc123.tmp"
        dead_tmp = f".lowband-ckpt.{ck._HOST}.{dead.pid}.abc123.tmp"
        other_host = f".lowband-ckpt.elsewhere.{dead.pid}.abc123.tmp"  # another host's writer: its pid means nothing here
        for name in (live_tmp, dead_tmp, other_host):
            (tmp_path / name).write_bytes(b"partial")
        lowband.save(tmp_path / "c.pt", torch.nn.Linear(2, 2), None)
        assert sorted(os.listdir(tmp_path)) == sorted(["c.pt", live_tmp, other_host])
    finally:
        sleeper.kill()
        sleeper.wait(10)


_FULL_DISK = textwrap.dedent("""
    import resource, signal, sys, torch, lowband
    from lowband.errors import CheckpointError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    lowband.save(sys.argv[1], torch.nn.Linear(4, 4), None, step=1)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    try:
        lowband.save(sys.argv[1], torch.nn.Linear(1024, 1024), None, step=2)
    except CheckpointError as e:
        print("refused:", e)
""")


def test_file_size_limit_mid_save_keeps_previous(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "c.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", _FULL_DISK, str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert "refused:" in out.stdout and "previous checkpoint is untouched" in out.stdout, out.stderr
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]
    assert lowband.load(path, torch.nn.Linear(4, 4), None) == {"step": 1}
