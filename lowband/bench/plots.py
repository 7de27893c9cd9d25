"""The benchmark's two figures: validation loss against bytes sent, and against wall time.

The series are computed by :func:`bytes_series` and :func:`time_series` (plain data),
drawn on a given axes by the ``draw_*`` functions (so tests can check what a figure shows
without reading pixels) and written as PNG by the ``plot_*`` functions. matplotlib is imported only when a plot is drawn (the ``bench`` extra), with
the non-interactive Agg backend so it works without a display.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowband.bench._units import format_bytes
from lowband.errors import ConfigError

__all__ = [
    "Series",
    "bytes_floor",
    "bytes_series",
    "draw_loss_vs_bytes",
    "draw_loss_vs_time",
    "plot_loss_vs_bytes",
    "plot_loss_vs_time",
    "time_series",
    "title",
]


@dataclass(frozen=True)
class Series:
    """One method's line: x and y of each point, and which points stand for 0 bytes sent."""

    label: str
    xs: tuple[float, ...]
    ys: tuple[float, ...]
    at_floor: tuple[bool, ...] = ()


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ConfigError("the plots need matplotlib: pip install 'lowband[bench]'") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def title(settings: dict[str, Any]) -> str:
    """The run's links and model, the emulator mode included, for a figure's second line."""
    return (
        f"{settings['workers']} workers, {settings['bandwidth']} up/down, "
        f"{settings['delay_ms']:g} ms one way ({settings['emulator_mode']} link emulator); "
        f"{settings['params']:,}-parameter model"
    )


def bytes_floor(methods: dict[str, dict[str, Any]]) -> float:
    """Where 0 bytes sent is drawn on the log axis: a power of ten below every positive count."""
    positive = [
        c["bytes_sent"] for m in methods.values() for c in m["curve"] if c["bytes_sent"] > 0
    ]
    if not positive:
        return 1.0
    return 10.0 ** (math.floor(math.log10(min(positive))) - 1)


def bytes_series(methods: dict[str, dict[str, Any]], floor: float) -> list[Series]:
    """Loss against payload bytes sent; evaluations before any byte was sent sit at ``floor``.

    DiLoCo sends nothing until its first sync, so without the floor its line would lose every
    point before it (and a run with one sync would be a single dot).
    """
    out = []
    for name, m in methods.items():
        pts = [(c["bytes_sent"], c["val_loss"]) for c in m["curve"]]
        if not pts:
            continue
        label = name if any(b > 0 for b, _ in pts) else f"{name} (sent 0 bytes)"
        out.append(
            Series(
                label,
                tuple(b if b > 0 else floor for b, _ in pts),
                tuple(v for _, v in pts),
                tuple(b <= 0 for b, _ in pts),
            )
        )
    return out


def time_series(methods: dict[str, dict[str, Any]]) -> list[Series]:
    """Loss against training wall time (slowest worker, evaluation pauses excluded)."""
    return [
        Series(
            name, tuple(c["wall_s"] for c in m["curve"]), tuple(c["val_loss"] for c in m["curve"])
        )
        for name, m in methods.items()
        if m["curve"]
    ]


def draw_loss_vs_bytes(
    ax: Any, methods: dict[str, dict[str, Any]], settings: dict[str, Any]
) -> None:
    """Draw validation loss against cumulative payload bytes sent per worker on ``ax`` (log x).

    0 bytes cannot sit on a log axis: evaluations before a method's first byte are drawn at
    a stated floor, with hollow markers, left of every positive count.
    """
    floor = bytes_floor(methods)
    series = bytes_series(methods, floor)
    for i, s in enumerate(series):  # colours by position: the same method, the same colour
        (line,) = ax.plot(s.xs, s.ys, marker="o", markersize=3, label=s.label, color=f"C{i}")
        zero = [(x, y) for x, y, z in zip(s.xs, s.ys, s.at_floor) if z]
        if zero:  # hollow: "nothing sent yet", not a count of `floor` bytes
            ax.plot(
                [x for x, _ in zero],
                [y for _, y in zero],
                linestyle="none",
                marker="o",
                markersize=6,
                markerfacecolor="white",
                markeredgecolor=line.get_color(),
            )
    ax.set_xscale("log")
    ax.axvline(floor, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel(
        f"payload bytes sent per worker (log scale; hollow points at {format_bytes(floor)} "
        "have sent 0 bytes)"
    )
    ax.set_ylabel("validation loss (nats per byte)")
    ax.set_title("Validation loss vs bytes sent\n" + title(settings), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend()


def draw_loss_vs_time(
    ax: Any, methods: dict[str, dict[str, Any]], settings: dict[str, Any]
) -> None:
    """Draw validation loss against training wall time on ``ax``."""
    series = time_series(methods)
    for i, s in enumerate(series):
        ax.plot(s.xs, s.ys, marker="o", markersize=3, label=s.label, color=f"C{i}")
    ax.set_xlabel("wall time (seconds, emulated links, evaluation excluded)")
    ax.set_ylabel("validation loss (nats per byte)")
    ax.set_title("Validation loss vs wall time\n" + title(settings), fontsize=10)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend()


def _save(
    draw: Any, methods: dict[str, dict[str, Any]], settings: dict[str, Any], path: Path
) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    try:
        draw(ax, methods, settings)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def plot_loss_vs_bytes(
    methods: dict[str, dict[str, Any]], settings: dict[str, Any], path: Path
) -> None:
    """Write :func:`draw_loss_vs_bytes`'s figure to ``path`` (PNG)."""
    _save(draw_loss_vs_bytes, methods, settings, path)


def plot_loss_vs_time(
    methods: dict[str, dict[str, Any]], settings: dict[str, Any], path: Path
) -> None:
    """Write :func:`draw_loss_vs_time`'s figure to ``path`` (PNG)."""
    _save(draw_loss_vs_time, methods, settings, path)
