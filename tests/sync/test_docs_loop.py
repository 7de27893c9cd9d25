"""The actor/learner program of docs/rl_sync.md, run as written (two real processes, loopback)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowband.errors import ConfigError
from lowband.sync import WeightPublisher

DOC = Path(__file__).resolve().parents[2] / "docs" / "rl_sync.md"


def _program() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    full = [b for b in blocks if '__name__ == "__main__"' in b]
    assert len(full) == 1, "docs/rl_sync.md should hold one complete program"
    return full[0]


def test_documented_loop_runs_and_first_pull_gets_rollouts(tmp_path: Path) -> None:
    script = tmp_path / "rl_loop.py"
    script.write_text(_program())
    env = dict(os.environ, PYTHONPATH=str(DOC.parents[1]))
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = re.findall(r"step (\d+): (\d+) rollouts", proc.stdout)
    assert [int(s) for s, _ in steps] == [1, 2, 3, 4, 5]
    assert all(int(n) >= 1 for _, n in steps)  # no pull waited out its timeout empty-handed


def test_version_zero_is_valid_then_must_increase() -> None:
    with WeightPublisher({"w": torch.ones(4)}) as pub:
        assert pub.publish(version=0).version == 0
        with pytest.raises(ConfigError):
            pub.publish(version=0)
        assert pub.publish(version=1).version == 1
    with WeightPublisher({"w": torch.ones(4)}) as pub, pytest.raises(ConfigError):
        pub.publish(version=-1)
