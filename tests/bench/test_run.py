"""A tiny real run of ``lowband bench``: real worker processes, coordinator and link emulator."""

from __future__ import annotations

import json
import math
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowband.bench.cli import main
from lowband.testing import interruptible

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quick_run_of_two_methods_writes_json_and_plots(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench"
    argv = [
        "--quick",
        "--workers",
        "2",
        "--methods",
        "ddp,sparseloco",
        "--steps",
        "10",
        "--out",
        str(out),
        "--no-progress",
        "--link-model",
    ]
    assert main(argv) == 0
    captured = capfd.readouterr()  # file descriptors: the workers' and coordinator's too
    printed, everything = captured.out, captured.out + captured.err
    assert "PROJECTIONS (not measured)" in printed
    assert "link emulator:" in printed
    # Said once by the launcher, not once per worker and again by the coordinator.
    assert everything.count("without CURVE") <= 1, everything[-3000:]
    table = printed[printed.index("method ") :].splitlines()
    assert table[0].split()[:3] == ["method", "sync_every", "syncs"]
    rows = {line.split()[0]: line.split()[1:3] for line in table[2:4]}
    assert rows == {"ddp": ["1", "10"], "sparseloco": ["10", "1"]}
    assert "gap to ddp: final validation loss minus ddp's; in parentheses" in printed
    assert "note: sparseloco synced 1 time in 10 steps (sync_every 10), fewer than 5" in printed
    assert "none apply" not in printed

    results = json.loads((out / "results.json").read_text())
    assert results["command"] == ["lowband", "bench", *argv]
    assert results["settings"]["emulator_mode"] in ("netns", "proxy")
    assert len(results["corpus"]["sha256"]) == 64 and results["corpus"]["bytes"] > 0
    assert set(results["methods"]) == {"ddp", "sparseloco"}
    ddp, sl = results["methods"]["ddp"], results["methods"]["sparseloco"]
    assert (ddp["syncs"], ddp["sync_every"], sl["syncs"], sl["sync_every"]) == (10, 1, 1, 10)
    assert [c["syncs"] for c in sl["curve"]] == [0] * 10 + [1]
    for m in (ddp, sl):
        assert len(m["per_worker"]) == 2
        assert [c["step"] for c in m["curve"]] == list(range(11))  # every step: 10 // 8 = 1
        assert all(math.isfinite(c["val_loss"]) for c in m["curve"])
        assert m["wall_s"] > 0
        assert (
            m["link_bytes_sent"] >= m["payload_bytes_sent"] > 0
        )  # links carry payload plus headers
    # ddp all-reduces every step; sparseloco sends a sparse pseudo-gradient every 10 steps.
    assert sl["compression_vs_ddp"] > 10
    assert ddp["compression_vs_ddp"] == 1.0 and ddp["loss_gap_to_ddp"] == 0.0
    assert ddp["curve"][-1]["val_loss"] < ddp["curve"][0]["val_loss"]
    assert results["projections"] and all(p["projection"] for p in results["projections"])

    for name in ("loss_vs_bytes.png", "loss_vs_time.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_a_corpus_too_short_for_the_context_is_refused_before_any_process_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "short.txt"
    f.write_bytes(b"abc" * 1500)
    argv = [
        "--quick",
        "--model",
        "tiny:block_size=4000",
        "--data",
        str(f),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    assert "too short for the model's context" in capsys.readouterr().err


def _own_processes(sid: int) -> list[str]:
    """Command lines of the live processes in session ``sid`` (the run under test)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(pid)) != sid:
                continue
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # a zombie has ended; only its parent's wait is missing
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, IndexError):
            continue
    return found


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_ctrl_c_stops_workers_coordinator_and_emulator(tmp_path: Path) -> None:
    """SIGINT to the run's process group, as a terminal sends it: exit 130, nothing left."""
    argv = [
        sys.executable,
        "-m",
        "lowband.bench",
        "--quick",
        "--workers",
        "2",
        "--methods",
        "ddp",
        "--steps",
        "100000",
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
        "-v",
    ]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=interruptible,  # the test sends SIGINT: CI may run with it ignored
    )
    lines: list[str] = []
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not any("event eval" in x for x in lines):
            if sel.select(1.0):
                line = proc.stderr.readline()
                if not line:
                    break
                lines.append(line)
        sel.close()
        assert any("event eval" in x for x in lines), "".join(lines[-20:])
        namespaces = [x for x in lines if "netns link emulator" in x and " up:" in x]
        os.killpg(proc.pid, signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
        assert proc.returncode == 130, rest[-3000:]
        assert "interrupted" in rest
        left = _own_processes(proc.pid)
        deadline = time.monotonic() + 15
        while left and time.monotonic() < deadline:  # a process may be mid-exit: give it a moment
            time.sleep(0.5)
            left = _own_processes(proc.pid)
        assert left == []
        if namespaces:  # netns mode: the run's namespaces are gone
            prefix = namespaces[0].split("netns link emulator ")[1].split()[0]
            from lowband.wan._netns import list_namespaces

            assert [n for n in list_namespaces() if n.startswith(prefix)] == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
