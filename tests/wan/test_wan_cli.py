"""``lowband wan run``: commands on hosts, placeholders, exit codes, bad flags."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lowband.wan.cli import main


def test_run_passes_the_worst_exit_code_and_prints_link_bytes(
    mode: str, capsys: pytest.CaptureFixture
) -> None:
    code = main(
        ["run", "--mode", mode, "--stagger", "0", "--on", "0", "exit 3", "--on", "1", "true"]
    )
    assert code == 3
    out = capsys.readouterr().out
    assert set(json.loads(out)["link_bytes"]) == {"0", "1"}


def test_run_substitutes_host_addresses(
    mode: str, capfd: pytest.CaptureFixture, tmp_path: Path
) -> None:
    script = tmp_path / "addr.py"
    script.write_text(
        "import os, sys, json; print(sys.argv[1], json.loads(os.environ['LOWBAND_WAN'])['address'])"
    )
    assert (
        main(
            [
                "run",
                "--mode",
                mode,
                "--hosts",
                "3",
                "--stagger",
                "0",
                "--on",
                "2",
                f"{sys.executable} {script} {{2}}",
            ]
        )
        == 0
    )
    given, own = capfd.readouterr().out.splitlines()[0].split()  # the child writes to fd 1
    assert given == own  # {2} is the address host 2's processes bind


def test_run_rejects_a_bad_rate(capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "--rate", "fast", "--on", "0", "true"]) == 2
    assert "invalid rate" in capsys.readouterr().err
