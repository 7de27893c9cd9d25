"""Everything an emulator makes goes away: on exit, on an exception, on SIGTERM/SIGINT, and
after SIGKILL through ``lowband wan cleanup``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowband.testing import interruptible
from lowband.wan._netns import list_namespaces
from lowband.wan.cli import main as wan_main

pytestmark = pytest.mark.slow

HOLDER = Path(__file__).with_name("_holder.py")
ROOT = Path(__file__).resolve().parents[2]


def _start(mode: str) -> tuple[subprocess.Popen, dict]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, str(HOLDER), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=interruptible,  # the test sends SIGINT: CI may run with it ignored
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if not line:
        proc.kill()
        raise AssertionError(f"holder did not start: {proc.communicate(timeout=30)[1]}")
    return proc, json.loads(line)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _ps(info: dict) -> str:
    pids = ",".join(map(str, info["pids"]))
    return subprocess.run(
        ["ps", "-o", "pid,ppid,stat,args", "-p", pids], capture_output=True, text=True
    ).stdout


def _gone(info: dict, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in info["pids"] if _alive(p)]
        ns = set(info["namespaces"]) & set(list_namespaces("lbw")) if info["namespaces"] else set()
        if not left and not ns:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("how", ["raise", "sigterm", "sigint"])
def test_everything_removed_when_the_run_ends_badly(mode: str, how: str) -> None:
    proc, info = _start(mode)
    try:
        assert all(_alive(p) for p in info["pids"])
        if mode == "netns":
            assert set(info["namespaces"]) <= set(list_namespaces("lbw"))
        if how == "raise":
            proc.stdin.write("raise\n")
            proc.stdin.flush()
        else:
            proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGINT)
        proc.wait(timeout=30)
        assert _gone(info), f"left behind after {how}: {info}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_cleanup_command_removes_what_sigkill_left(
    mode: str, capsys: pytest.CaptureFixture
) -> None:
    proc, info = _start(mode)
    try:
        proc.kill()
        proc.wait(timeout=10)
        if mode == "netns":
            assert set(info["namespaces"]) <= set(list_namespaces("lbw")), (
                "namespaces outlive SIGKILL"
            )
        assert wan_main(["cleanup"]) == 0
        assert _gone(info), f"left behind after cleanup: {info} {_ps(info)}"
        if mode == "netns":
            out = capsys.readouterr().out
            assert all(f"removed {ns}" in out for ns in info["namespaces"]), out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
