"""Attacks on checkpoints (issue 15 item 6), each against real files and processes.

``ATTACKS`` holds zero-argument functions; each returns
``{"attack": str, "bound": str, "measured": str, "held": bool}`` (printed by benchmarks/attack.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from collections.abc import Callable
from typing import Any

import torch

import lowband
from lowband import checkpoint as ck
from lowband.errors import CheckpointError

__all__ = ["ATTACKS"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bit_flips(n: int = 200) -> dict[str, Any]:
    """Flip n random single bits of a real checkpoint; count the loads that did not raise."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.pt")
        lowband.save(path, model, torch.optim.AdamW(model.parameters()), step=1)
        good = open(path, "rb").read()
        rnd = random.Random(0)
        undetected = 0
        for _ in range(n):
            bit = rnd.randrange(len(good) * 8)
            bad = bytearray(good)
            bad[bit // 8] ^= 1 << (bit % 8)
            with open(path, "wb") as f:
                f.write(bad)
            try:
                lowband.load(path, model, None, restore_rng=False)
                undetected += 1
            except CheckpointError:
                pass
    return {"attack": f"checkpoint: {n} single-bit flips in a {len(good)}-byte file",
            "bound": "every flip raises CheckpointError (sha256 over the whole file)",
            "measured": f"{n - undetected}/{n} detected", "held": undetected == 0}


def bomb() -> dict[str, Any]:
    """A 300-byte file that declares 1 GiB of tensors (correct hash); the old format's deflate bomb."""
    huge = {"tensor": ["float32", [1 << 28], 1 << 30, "cpu"]}
    tree = {"dict": [["format", ck.FORMAT], ["model", {"dict": [["w", huge]]}], ["optimizer", None],
                     ["rng", None], ["extra", {"dict": []}]]}
    header = json.dumps(tree).encode()
    body = ck._PREFIX.pack(len(header)) + header
    refused = 0
    rss0 = _rss_mb()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bomb.pt")
        with open(path, "wb") as f:
            f.write(body + hashlib.sha256(body).digest())
        size = os.path.getsize(path)
        try:
            lowband.load(path)
        except CheckpointError:
            refused += 1

        zpath = os.path.join(d, "zip.pt")
        with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as z, z.open("archive/data/0", "w") as f:
            for _ in range(256):
                f.write(bytes(1 << 20))  # 256 MiB of zeros, about 256 KiB deflated
        zsize = os.path.getsize(zpath)
        try:
            lowband.load(zpath)
        except CheckpointError:
            refused += 1
    grew = _rss_mb() - rss0
    return {"attack": f"checkpoint: {size} B file declaring 1 GiB; {zsize >> 10} KiB torch zip inflating to 256 MiB",
            "bound": "refused before allocating (allocation <= file size); peak RSS growth < 64 MB",
            "measured": f"{refused}/2 refused, peak RSS +{grew:.1f} MB", "held": refused == 2 and grew < 64}


_WRITER = textwrap.dedent("""
    import sys, torch, lowband
    big = torch.nn.Linear(1024, 2048)
    for i in range(100000):
        lowband.save(sys.argv[1], big, None, step=i)
""")


def kills_mid_save(kills: int = 5) -> dict[str, Any]:
    """SIGKILL writers while their temp file exists; then one save: no orphan left, the checkpoint loads."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.pt")
        lowband.save(path, torch.nn.Linear(1024, 2048), None, step=-1)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        procs = [subprocess.Popen([sys.executable, "-c", _WRITER, path], env=env) for _ in range(kills)]
        try:
            for p in procs:
                t0 = time.monotonic()
                while time.monotonic() - t0 < 30 and p.poll() is None and not any(f".{p.pid}." in f for f in os.listdir(d)):
                    time.sleep(0.002)
                p.send_signal(signal.SIGKILL)
                p.wait(10)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
        orphans = [f for f in os.listdir(d) if f.endswith(".tmp")]
        orphan_mb = sum(os.path.getsize(os.path.join(d, f)) for f in orphans) / 1e6
        try:
            lowband.load(path, torch.nn.Linear(1024, 2048), None, restore_rng=False)
            intact = True
        except CheckpointError:
            intact = False
        lowband.save(path, torch.nn.Linear(4, 4), None)
        left = [f for f in os.listdir(d) if f != "c.pt"]
    return {"attack": f"checkpoint: {kills} writers SIGKILLed mid-save, then one save",
            "bound": "0 temp files left after the next save; the last good checkpoint loads",
            "measured": f"{len(orphans)} orphans ({orphan_mb:.0f} MB) before, {len(left)} after; intact={intact}",
            "held": not left and intact}


ATTACKS: list[Callable[[], dict[str, Any]]] = [bit_flips, bomb, kills_mid_save]

if __name__ == "__main__":
    for attack in ATTACKS:
        print(attack())
