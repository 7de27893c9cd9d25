"""The benchmark's two figures: validation loss against bytes sent, and against wall time.

matplotlib is imported only here and only when a plot is drawn (the ``bench`` extra),
with the non-interactive Agg backend so it works without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowband.errors import ConfigError

__all__ = ["plot_loss_vs_bytes", "plot_loss_vs_time"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ConfigError("the plots need matplotlib: pip install 'lowband[bench]'") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _title(settings: dict[str, Any]) -> str:
    return (
        f"{settings['workers']} workers, {settings['bandwidth']} up/down, "
        f"{settings['delay_ms']:g} ms one way; {settings['params']:,}-parameter model"
    )


def plot_loss_vs_bytes(
    methods: dict[str, dict[str, Any]], settings: dict[str, Any], path: Path
) -> None:
    """Validation loss against cumulative payload bytes sent per worker (log scale).

    The evaluation at step 0 has sent nothing and cannot sit on a log axis; it is drawn as a
    dotted horizontal line at the initial loss instead.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    initial = None
    for name, m in methods.items():
        pts = [(c["bytes_sent"], c["val_loss"]) for c in m["curve"] if c["bytes_sent"] > 0]
        if m["curve"]:
            initial = m["curve"][0]["val_loss"]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=name)
        else:  # nothing sent (e.g. fewer steps than one sync): say so rather than drop the name
            ax.plot([], [], marker="o", markersize=3, label=f"{name} (sent 0 bytes)")
    if initial is not None:
        ax.axhline(initial, color="grey", linestyle=":", linewidth=1, label="initial loss")
    ax.set_xscale("log")
    ax.set_xlabel("payload bytes sent per worker (bytes, log scale)")
    ax.set_ylabel("validation loss (nats per byte)")
    ax.set_title("Validation loss vs bytes sent\n" + _title(settings), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_loss_vs_time(
    methods: dict[str, dict[str, Any]], settings: dict[str, Any], path: Path
) -> None:
    """Validation loss against training wall time (slowest worker, evaluation pauses excluded)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for name, m in methods.items():
        xs = [c["wall_s"] for c in m["curve"]]
        ys = [c["val_loss"] for c in m["curve"]]
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_xlabel("wall time (seconds, emulated links)")
    ax.set_ylabel("validation loss (nats per byte)")
    ax.set_title("Validation loss vs wall time\n" + _title(settings), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
