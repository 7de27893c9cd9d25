"""``lowband bench --islands``: flag parsing, the per-island roll-up, and (opt-in,
``LOWBAND_SLOW_ISLANDS=1``, about 90 s on 2 cores) a real 2+1 run behind the link emulator."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lowband.bench.cli import main, parse_args
from lowband.bench.islands import parse_islands, per_island
from lowband.errors import ConfigError


def test_shapes_parse() -> None:
    assert parse_islands("2x2") == (2, 2)
    assert parse_islands("3x1") == (1, 1, 1)
    assert parse_islands("2+1") == (2, 1)
    assert parse_islands("4+2") == (4, 2)
    for bad in ("2", "2x", "x2", "2+", "1x4", "2+0", "2*2", "40x2"):
        with pytest.raises(ConfigError):
            parse_islands(bad)


def test_flags() -> None:
    args = parse_args(["--islands", "2+1", "--quick"])
    assert args.islands == (2, 1) and args.workers == 2
    assert args.methods == ("diloco", "sparseloco")
    with pytest.raises(ConfigError, match="not 'ddp'"):
        parse_args(["--islands", "2x2", "--methods", "diloco,ddp"])
    with pytest.raises(ConfigError, match="contradicts"):
        parse_args(["--islands", "2x2", "--workers", "4"])
    with pytest.raises(ConfigError, match="split evenly"):
        parse_args(["--islands", "2+1", "--quick", "--batch-size", "3"])
    assert parse_args(["--quick"]).islands == ()


def _result(sent: int, outer: int, local: int, loss: float) -> dict:
    comm = {"bytes_sent": sent, "bytes_received": sent, "seconds_in_comm": 1.0 + local}
    return {
        "comm": comm, "setup": {"bytes_sent": 1}, "wall_s": 2.0 + local, "syncs": 3,
        "outer_state_bytes": outer, "flows": 1, "local_rank": local, "final_val_loss": loss,
    }


def test_per_island_sums_bytes_and_keeps_each_rank() -> None:
    results = {0: _result(10, 50, 0, 1.5), 1: _result(12, 50, 1, 1.5), 2: _result(22, 100, 0, 1.4)}
    curves = {r: [{"step": 0, "bytes_sent": 0.0, "wall_s": 0.0}, {"step": 5, "bytes_sent": 5.0, "wall_s": 1.0 + r}]
              for r in results}
    by_island, by_island_curves = per_island(results, curves, (2, 1))
    assert by_island[0]["comm"]["bytes_sent"] == 22 and by_island[1]["comm"]["bytes_sent"] == 22
    assert by_island[0]["comm"]["seconds_in_comm"] == 2.0  # the slowest rank's
    assert by_island[0]["wall_s"] == 3.0
    assert [r["outer_state_bytes"] for r in by_island[0]["ranks"]] == [50, 50]
    assert by_island_curves[0][1] == {"step": 5, "bytes_sent": 10.0, "wall_s": 2.0}


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LOWBAND_SLOW_ISLANDS") != "1", reason="opt-in: LOWBAND_SLOW_ISLANDS=1")
@pytest.mark.timeout(400)
def test_islands_run_matches_the_flat_run(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    argv = ["--islands", "2+1", "--quick", "--steps", "10", "--methods", "diloco,sparseloco",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capfd.readouterr().out
    assert "WAN bytes per island and outer state per rank" in printed
    rows = json.loads((out / "results.json").read_text())["islands_vs_flat"]
    assert {(r["method"], r["island"]) for r in rows} == {(m, k) for m in ("diloco", "sparseloco") for k in (0, 1)}
    for r in rows:
        flat, isl = r["wan_payload_sent_flat"], r["wan_payload_sent_islands"]
        assert flat > 0 and abs(isl - flat) <= 0.02 * flat + 512  # payload headers only
        assert r["outer_state_per_rank_max_islands"] <= r["outer_state_per_rank_flat"] / r["ranks"] + 64
        assert r["flows"] == 2
    assert (out / "flat" / "results.json").exists() and (out / "loss_vs_bytes.png").exists()
