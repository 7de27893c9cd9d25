"""Issue 13 item 7: a peer whose process ended (SIGKILL: its TCP connections close and its
address refuses new ones) is declared lost from the closed connections, not after
``peer_timeout`` of silence, in both failure modes, with real processes.

``peer_timeout`` is 120 s here, so the closed-connection path is the only one that can
answer first; the assertions are on what the survivor is told, not on times
(``benchmarks/first_contact.py`` measures the times).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_killed_peer_is_lost_from_its_closed_connections(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "first_contact.py"), "--case", "killed-peer",
         "--case", "killed-peer-drop", "--peer-timeout", "120", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert out.exists(), proc.stdout + proc.stderr
    rows = {r["case"]: r for r in json.loads(out.read_text())}
    raised = rows["killed-peer"]
    assert raised["error"] == "PeerLost", raised
    assert "rank 0 lost rank 1" in raised["message"] and "connections closed" in raised["message"], raised
    assert "on_failure='drop'" in raised["message"]
    dropped = rows["killed-peer-drop"]
    assert dropped["error"] == "none (completed)", dropped  # the survivor went on without rank 1
    assert dropped["message"] == "completed: 1", dropped     # a sum of ones over rank 0 alone
