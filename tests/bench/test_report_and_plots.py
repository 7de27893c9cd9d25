"""What ``lowband bench`` prints and draws: columns, notes, presets, plots and warnings."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from lowband.bench._curve_note import EmulatedBindFilter, quiet_emulated_binds
from lowband.bench.cli import MIN_EVALS, PRESETS, _train_config, parse_args
from lowband.bench.methods import METHODS, sync_every
from lowband.bench.plots import bytes_floor, bytes_series, time_series, title
from lowband.bench.report import (
    MIN_SYNCS,
    compare_to_baseline,
    format_notes,
    format_projections,
    format_table,
    format_targets,
    link_projections,
    summarize,
)
from lowband.transport.security import warn_if_exposed

SETTINGS = {
    "workers": 2,
    "bandwidth": "100 Mbit/s",
    "bandwidth_bps": 1e8,
    "delay_ms": 50.0,
    "emulator_mode": "netns",
    "params": 21984,
}


def _worker(sent: int, syncs: int, val: float) -> dict[str, Any]:
    comm = dict.fromkeys(
        (
            "bytes_sent",
            "bytes_received",
            "transport_bytes_sent",
            "transport_bytes_received",
            "messages",
            "syncs",
            "seconds_in_comm",
            "seconds_waited",
        ),
        0.0,
    )
    comm.update(bytes_sent=sent, bytes_received=sent, messages=120, seconds_in_comm=5.0)
    return {
        "comm": comm,  # the group's syncs stay 0: the count comes from the method
        "setup": dict(comm, bytes_sent=0),
        "syncs": syncs,
        "wall_s": 10.0,
        "eval_s": 0.1,
        "final_train_loss": val,
        "final_val_loss": val,
    }


def _curve(bytes_at: list[int], syncs_at: list[int]) -> dict[int, list[dict[str, float]]]:
    recs = [
        {
            "step": 10 * i,
            "train_loss": 5.5 - i / 10,
            "val_loss": 5.5 - i / 10,
            "bytes_sent": b,
            "syncs": s,
            "wall_s": float(i),
        }
        for i, (b, s) in enumerate(zip(bytes_at, syncs_at))
    ]
    return {0: recs, 1: recs}


def _methods() -> dict[str, dict[str, Any]]:
    ddp = summarize(
        "ddp",
        {r: _worker(7_000_000, 60, 3.2) for r in (0, 1)},
        _curve([0, 1_000_000, 2_000_000, 3_000_000], [0, 10, 20, 30]),
        None,
    )
    diloco = summarize(  # nothing sent until its only sync at the end
        "diloco",
        {r: _worker(130_000, 1, 3.3) for r in (0, 1)},
        _curve([0, 0, 0, 130_000], [0, 0, 0, 1]),
        None,
    )
    sl = summarize(
        "sparseloco",
        {r: _worker(14_000, 6, 4.7) for r in (0, 1)},
        _curve([0, 4_000, 9_000, 14_000], [0, 2, 4, 6]),
        None,
    )
    methods = {"ddp": ddp, "diloco": diloco, "sparseloco": sl}
    for name, every in (("ddp", 1), ("diloco", 50), ("sparseloco", 10)):
        methods[name]["sync_every"] = every
    compare_to_baseline(methods)
    return methods


def test_the_table_has_sync_every_and_syncs_columns_from_the_methods_counts() -> None:
    methods = _methods()
    assert [methods[m]["syncs"] for m in methods] == [60, 1, 6]  # not the group's 0
    lines = format_table(methods).splitlines()
    head = lines[0].split()
    assert head[:3] == ["method", "sync_every", "syncs"]
    rows = {line.split()[0]: line.split()[1:3] for line in lines[2:]}
    assert rows == {"ddp": ["1", "60"], "diloco": ["50", "1"], "sparseloco": ["10", "6"]}


def test_notes_say_what_the_gap_is_a_share_of_and_label_too_few_syncs() -> None:
    notes = format_notes(_methods(), steps=60, settings=SETTINGS)
    first = notes.splitlines()[0]
    assert first.startswith("gap to ddp: final validation loss minus ddp's")
    assert "share of ddp's drop in validation loss" in first
    assert "(initial 5.500 - final 3.200 = 2.300)" in first  # ddp's first evaluation and its end
    few = [line for line in notes.splitlines() if "fewer than" in line]
    assert len(few) == 1 and few[0].startswith("note: diloco synced 1 time in 60 steps")
    assert f"fewer than {MIN_SYNCS}" in few[0]


def test_a_latency_bound_run_says_so() -> None:
    # ddp: 7 MB in 60 steps at 100 Mbit/s is 9 ms a step; 120 messages to 1 peer over 60
    # steps are 2 hops of 50 ms a step.
    notes = format_notes(_methods(), steps=60, settings=SETTINGS)
    assert "ms at 100 Mbit/s, against 100 ms of one-way hops" in notes
    fast = dict(SETTINGS, bandwidth_bps=1e6)  # 1 Mbit/s: 933 ms a step, rate-bound
    assert "one-way hops" not in format_notes(_methods(), steps=60, settings=fast)


def test_no_targets_prints_nothing_instead_of_internal_wording() -> None:
    assert format_targets([]) == ""
    text = format_targets([{"check": "x", "value": 2.0, "op": ">=", "bound": 1.0, "met": True}])
    assert "met" in text and "none apply" not in text


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_evaluates_often_enough_to_draw_a_curve(preset: str) -> None:
    p = PRESETS[preset]
    assert p.steps // p.eval_every >= MIN_EVALS


def test_steps_override_keeps_enough_evaluations() -> None:
    for steps in (10, 23, 60, 1000):
        p = parse_args(["--quick", "--steps", str(steps)]).preset
        assert p.steps // p.eval_every >= min(MIN_EVALS, steps)


@pytest.mark.parametrize("method", METHODS)
def test_the_quick_preset_syncs_every_method_at_least_min_syncs_times(method: str) -> None:
    train = _train_config(parse_args(["--quick"]))
    assert train.steps // sync_every(method, train) >= MIN_SYNCS


def test_every_curve_on_the_bytes_axis_has_more_than_one_visible_point() -> None:
    methods = _methods()
    floor = bytes_floor(methods)
    assert 0 < floor < 4_000  # below every positive count
    series = {s.label: s for s in bytes_series(methods, floor)}
    assert set(series) == {"ddp", "diloco", "sparseloco"}
    for s in series.values():
        assert len(s.xs) == 4 and all(x > 0 for x in s.xs)  # all drawable on a log axis
    assert series["diloco"].xs == (floor, floor, floor, 130_000)
    assert series["diloco"].at_floor == (True, True, True, False)
    assert [len(s.xs) for s in time_series(methods)] == [4, 4, 4]


def test_drawn_figures_have_only_visible_legend_entries_and_name_the_mode() -> None:
    pytest.importorskip("matplotlib")
    from lowband.bench.plots import _pyplot, draw_loss_vs_bytes, draw_loss_vs_time

    plt = _pyplot()
    methods = _methods()
    colours = []
    for draw in (draw_loss_vs_bytes, draw_loss_vs_time):
        fig, ax = plt.subplots()
        try:
            draw(ax, methods, SETTINGS)
            fig.canvas.draw()
            handles, labels = ax.get_legend_handles_labels()
            assert labels == ["ddp", "diloco", "sparseloco"]  # no "initial loss", no empty line
            lo, hi = ax.get_xlim()
            for h in handles:
                xs = list(h.get_xdata())
                assert len(xs) > 1 and all(lo <= x <= hi for x in xs)
                if ax.get_xscale() == "log":
                    assert all(x > 0 for x in xs)
            colours.append([h.get_color() for h in handles])
            assert "netns link emulator" in ax.get_title()
            assert "100 Mbit/s" in ax.get_title() and "50 ms one way" in ax.get_title()
        finally:
            plt.close(fig)
    assert colours[0] == colours[1]  # hollow 0-byte markers do not shift the colours
    assert "proxy link emulator" in title(dict(SETTINGS, emulator_mode="proxy"))


def test_projections_set_the_measured_time_beside_the_measured_link_and_say_why() -> None:
    rows = link_projections(_methods(), measured_bps=1e8, measured_delay=0.05, params=21984)
    here = [r for r in rows if r["measured_here"]]
    assert len(here) == 3 and all(r["link"].startswith("measured") for r in here)
    text = format_projections(rows)
    assert "assumes no CPU time" in text and "lower bound" in text
    measured_lines = [line for line in text.splitlines() if "measured 5.0 s in comm" in line]
    assert len(measured_lines) == 3 and all("10.0 s wall" in line for line in measured_lines)


def test_the_bench_drops_only_its_own_hosts_exposure_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    f = quiet_emulated_binds("10.77.0.2")
    try:
        with caplog.at_level(logging.WARNING, logger="lowband.transport.security"):
            warn_if_exposed("10.77.0.2", None, "rank 0")  # the bench's emulated host: dropped
            warn_if_exposed("192.0.2.7", None, "rank 0")  # anything else still warns
        texts = [r.getMessage() for r in caplog.records]
        assert len(texts) == 1 and "192.0.2.7" in texts[0] and "without CURVE" in texts[0]
    finally:
        logging.getLogger("lowband.transport.security").removeFilter(f)
    assert isinstance(f, EmulatedBindFilter)
