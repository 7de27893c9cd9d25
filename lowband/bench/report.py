"""Turning the workers' counters and clocks into the benchmark's results: table, JSON, projections.

Every figure here is computed from what the run counted: payload and transport bytes
from each worker's ``group.stats``, link bytes from the link emulator, wall time from
each worker's clock (evaluation pauses excluded). The only estimates are the link
projections of :func:`link_projections`, and they are marked as such wherever shown.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowband.bench._units import format_bytes, format_rate

__all__ = [
    "MIN_SYNCS",
    "summarize",
    "compare_to_baseline",
    "format_table",
    "format_notes",
    "gap_note",
    "link_projections",
    "format_projections",
    "write_json",
]

#: Other links the projections consider: (label, bits per second, one-way delay in seconds or None
#: for the measured run's delay).
PROJECTED_LINKS: tuple[tuple[str, float | None, float | None], ...] = (
    ("1 Gbit/s", 1e9, None),
    ("10 Mbit/s", 1e7, None),
    ("200 ms one way", None, 0.2),
)
PROJECTED_MODELS: tuple[tuple[str, float], ...] = (("1B params", 1e9), ("10B params", 1e10))

#: A method that synced fewer times than this in a run gets a note under the table: its
#: ratios against ddp rest on too few syncs to say what it does over a longer run.
MIN_SYNCS = 5


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(
    name: str,
    results: dict[int, dict[str, Any]],
    curves: dict[int, list[dict[str, float]]],
    link: dict[int, dict[str, int]] | None,
) -> dict[str, Any]:
    """One method's figures from its per-worker results, eval records and link byte deltas."""
    ranks = sorted(results)
    per_worker = []
    for r in ranks:
        c = results[r]["comm"]
        row = {
            "rank": r,
            "payload_bytes_sent": int(c["bytes_sent"]),
            "payload_bytes_received": int(c["bytes_received"]),
            "transport_bytes_sent": int(c["transport_bytes_sent"]),
            "transport_bytes_received": int(c["transport_bytes_received"]),
            "messages": int(c["messages"]),
            # the method's own count (optimizer or ddp reducer); the group does not count syncs
            "syncs": int(results[r].get("syncs", c["syncs"])),
            "seconds_in_comm": c["seconds_in_comm"],
            "seconds_waited": c["seconds_waited"],
            "setup_payload_bytes_sent": int(results[r]["setup"]["bytes_sent"]),
            "wall_s": results[r]["wall_s"],
            "eval_s": results[r]["eval_s"],
            "setup_s": results[r].get("setup_s"),
            "final_train_loss": results[r]["final_train_loss"],
            "final_val_loss": results[r]["final_val_loss"],
        }
        if results[r].get("outer_state_bytes") is not None:
            row["outer_state_bytes"] = int(results[r]["outer_state_bytes"])
        if "ranks" in results[r]:  # an island: its ranks' own figures (lowband.bench.islands)
            row["ranks"] = results[r]["ranks"]
        if link is not None and r in link:
            row["link_bytes_sent"] = int(link[r]["up"])
            row["link_bytes_received"] = int(link[r]["down"])
        per_worker.append(row)

    # The curve: at each evaluation step, mean loss and bytes over workers, slowest clock.
    steps = sorted({rec["step"] for r in ranks for rec in curves.get(r, [])})
    curve = []
    for s in steps:
        recs = [rec for r in ranks for rec in curves.get(r, []) if rec["step"] == s]
        curve.append(
            {
                "step": int(s),
                "train_loss": _mean([x["train_loss"] for x in recs]),
                "val_loss": _mean([x["val_loss"] for x in recs]),
                "bytes_sent": _mean([x["bytes_sent"] for x in recs]),
                "syncs": min(int(x.get("syncs", 0)) for x in recs),
                "wall_s": max(x["wall_s"] for x in recs),
            }
        )

    def avg(key: str) -> float:
        return _mean([w[key] for w in per_worker if key in w])

    out: dict[str, Any] = {
        "method": name,
        "payload_bytes_sent": avg("payload_bytes_sent"),
        "payload_bytes_received": avg("payload_bytes_received"),
        "transport_bytes_sent": avg("transport_bytes_sent"),
        "transport_bytes_received": avg("transport_bytes_received"),
        "link_bytes_sent": avg("link_bytes_sent") if link is not None else None,
        "link_bytes_received": avg("link_bytes_received") if link is not None else None,
        "messages_sent": avg("messages"),
        "syncs": min(w["syncs"] for w in per_worker),
        # Sequential one-way hops: each collective phase sends one message to each other peer.
        "hops": avg("messages") / (len(ranks) - 1) if len(ranks) > 1 else 0.0,
        "wall_s": max(w["wall_s"] for w in per_worker),
        "comm_s": avg("seconds_in_comm"),
        "waited_s": avg("seconds_waited"),
        "initial_val_loss": curve[0]["val_loss"] if curve else float("nan"),
        "final_train_loss": avg("final_train_loss"),
        "final_val_loss": avg("final_val_loss"),
        "per_worker": per_worker,
        "curve": curve,
    }
    return out


def compare_to_baseline(methods: dict[str, dict[str, Any]], baseline: str = "ddp") -> None:
    """Add compression ratio, speed-up and loss gap against ``baseline`` to each method, in place."""
    base = methods.get(baseline)
    for m in methods.values():
        if base is None:
            m["compression_vs_ddp"] = m["speedup_vs_ddp"] = m["loss_gap_to_ddp"] = None
            m["gap_fraction_of_ddp_drop"] = None
            continue
        sent = m["payload_bytes_sent"]
        m["compression_vs_ddp"] = base["payload_bytes_sent"] / sent if sent > 0 else math.inf
        m["speedup_vs_ddp"] = base["wall_s"] / m["wall_s"] if m["wall_s"] > 0 else math.inf
        m["loss_gap_to_ddp"] = m["final_val_loss"] - base["final_val_loss"]
        drop = base["initial_val_loss"] - base["final_val_loss"]
        m["gap_fraction_of_ddp_drop"] = m["loss_gap_to_ddp"] / drop if drop > 0 else None


def targets(methods: dict[str, dict[str, Any]], preset: str) -> list[dict[str, Any]]:
    """The issue's "done when" checks that this run's figures can answer, evaluated on them.

    Default preset: sparseloco and demo send >= 300x fewer payload bytes per worker than ddp
    and finish >= 5x sooner. Long preset: ddp's validation loss ends below 40% of its initial
    value; sparseloco's gap to ddp <= 10% of ddp's drop, demo's <= 15%.
    """
    out: list[dict[str, Any]] = []
    if "ddp" not in methods:
        return out

    def check(what: str, value: float | None, op: str, bound: float) -> None:
        ok = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out.append({"check": what, "value": value, "op": op, "bound": bound, "met": ok})

    if preset == "default":
        for m in ("sparseloco", "demo"):
            if m in methods:
                check(
                    f"{m}: payload bytes, ddp / {m}", methods[m]["compression_vs_ddp"], ">=", 300.0
                )
                check(f"{m}: wall time, ddp / {m}", methods[m]["speedup_vs_ddp"], ">=", 5.0)
    if preset == "long":
        ddp = methods["ddp"]
        init = ddp["initial_val_loss"]
        check(
            "ddp: final / initial validation loss",
            ddp["final_val_loss"] / init if init else None,
            "<=",
            0.4,
        )
        for m, bound in (("sparseloco", 0.10), ("demo", 0.15)):
            if m in methods:
                check(
                    f"{m}: loss gap to ddp / ddp's drop",
                    methods[m]["gap_fraction_of_ddp_drop"],
                    "<=",
                    bound,
                )
    return out


def format_targets(rows: list[dict[str, Any]]) -> str:
    """The targets this run checked, one a line (empty when none apply to the run)."""
    if not rows:
        return ""
    lines = ["targets (from this run's counters and clocks):"]
    for r in rows:
        v = "n/a" if r["value"] is None else f"{r['value']:,.3f}"
        mark = {True: "met", False: "NOT MET", None: "n/a"}[r["met"]]
        lines.append(f"  {r['check']:<45} {v:>12} (target {r['op']} {r['bound']:g}): {mark}")
    return "\n".join(lines)


def _fmt_ratio(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:,.0f}x" if x >= 100 else f"{x:.2f}x"


def format_table(methods: dict[str, dict[str, Any]]) -> str:
    """The per-method table (bytes are per worker, means over workers)."""
    head = (
        "method",
        "sync_every",
        "syncs",
        "payload sent",
        "payload recv",
        "link sent",
        "link recv",
        "vs ddp",
        "wall",
        "speed-up",
        "in comm",
        "train loss",
        "val loss",
        "gap to ddp",
    )
    rows = [head]
    for m in methods.values():
        gap = m.get("loss_gap_to_ddp")
        frac = m.get("gap_fraction_of_ddp_drop")
        gap_txt = (
            "-" if gap is None else f"{gap:+.3f}" + (f" ({frac:.0%})" if frac is not None else "")
        )
        lb = m.get("link_bytes_sent")
        rows.append(
            (
                m["method"],
                str(m.get("sync_every", "-")),
                str(m.get("syncs", "-")),
                format_bytes(m["payload_bytes_sent"]),
                format_bytes(m["payload_bytes_received"]),
                "-" if lb is None else format_bytes(lb),
                "-" if lb is None else format_bytes(m["link_bytes_received"]),
                _fmt_ratio(m.get("compression_vs_ddp")),
                f"{m['wall_s']:.1f} s",
                _fmt_ratio(m.get("speedup_vs_ddp")),
                f"{m['comm_s']:.1f} s",
                f"{m['final_train_loss']:.3f}",
                f"{m['final_val_loss']:.3f}",
                gap_txt,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def gap_note(methods: dict[str, dict[str, Any]], baseline: str = "ddp") -> str:
    """The line under the table that says what the gap column is, and a share of what."""
    base = methods.get(baseline)
    if base is None:
        return f"gap to {baseline}: not measured ({baseline} was not among the methods)"
    init, final = base["initial_val_loss"], base["final_val_loss"]
    return (
        f"gap to {baseline}: final validation loss minus {baseline}'s; in parentheses, that gap as a "
        f"share of {baseline}'s drop in validation loss over the run "
        f"(initial {init:.3f} - final {final:.3f} = {init - final:.3f})"
    )


def format_notes(
    methods: dict[str, dict[str, Any]], *, steps: int, settings: dict[str, Any]
) -> str:
    """The lines under the table: what the gap is, and what this run's figures cannot show."""
    lines = [gap_note(methods)]
    for m in methods.values():
        syncs = m.get("syncs")
        if syncs is not None and syncs < MIN_SYNCS:
            lines.append(
                f"note: {m['method']} synced {syncs} time{'s' if syncs != 1 else ''} in {steps} "
                f"steps (sync_every {m.get('sync_every', '?')}), fewer than {MIN_SYNCS}: its bytes, "
                "speed-up and gap against ddp rest on too few syncs to show what it does over a "
                "longer run (more --steps, or --preset long)"
            )
    ddp = methods.get("ddp")
    if ddp is not None and steps > 0 and ddp["hops"] > 0:
        bps, delay = settings["bandwidth_bps"], settings["delay_ms"] / 1e3
        per_step = max(ddp["payload_bytes_sent"], ddp["payload_bytes_received"]) / steps
        transfer = per_step * 8 / bps
        hops = ddp["hops"] / steps * delay
        if transfer < hops:
            lines.append(
                f"note: ddp moves {format_bytes(per_step)} per step, {transfer * 1e3:.0f} ms at "
                f"{format_rate(bps)}, against {hops * 1e3:.0f} ms of one-way hops: with this model "
                "the links' delay, not their rate, sets the time of every method that exchanges "
                "each step, so speed-ups show round trips and CPU work more than bytes (the "
                "default preset's larger model is rate-bound)"
            )
    for m in methods.values():
        speedup = m.get("speedup_vs_ddp")
        if m["method"] != "ddp" and speedup is not None and speedup < 1:
            why = (
                "it exchanges every step too, so it pays ddp's round trips and adds its own "
                "compression work on the CPU"
                if m.get("sync_every") == 1
                else "its communication or CPU work did not fit in ddp's time"
            )
            lines.append(f"note: {m['method']} finished later than ddp ({speedup:.2f}x): {why}")
    return "\n".join(lines)


def link_projections(
    methods: dict[str, dict[str, Any]],
    *,
    measured_bps: float,
    measured_delay: float,
    params: int,
) -> list[dict[str, Any]]:
    """PROJECTIONS, not measurements: each method's counted bytes and hops on other links.

    Model: communication time = hops x one-way delay + max(payload sent, received)
    per worker x 8 / rate (no overlap with compute, no TCP ramp-up: a lower bound on what a
    link adds). For the 1B and 10B rows, bytes are scaled by parameter count and the number
    of hops is kept. Hops are counted messages per worker / (workers - 1). Compute time is
    left out: it depends on hardware this run did not use.
    """
    links = [("measured link " + format_rate(measured_bps), measured_bps, measured_delay)]
    for label, bps, delay in PROJECTED_LINKS:
        links.append((label, bps or measured_bps, measured_delay if delay is None else delay))
    models = [(f"this model ({params:,} params)", 1.0)] + [
        (label, n / params) for label, n in PROJECTED_MODELS
    ]
    out = []
    for name, m in methods.items():
        volume = max(m["payload_bytes_sent"], m["payload_bytes_received"])
        for model_label, scale in models:
            for link_label, bps, delay in links:
                comm = m["hops"] * delay + volume * scale * 8 / bps
                out.append(
                    {
                        "method": name,
                        "model": model_label,
                        "link": link_label,
                        "bandwidth_bps": bps,
                        "one_way_delay_s": delay,
                        "payload_bytes_per_worker": volume * scale,
                        "projected_comm_s": comm,
                        "projection": True,
                        # this row is the run itself: the measured times belong beside it
                        "measured_here": scale == 1.0 and link_label.startswith("measured"),
                        "measured_wall_s": m["wall_s"],
                        "measured_comm_s": m["comm_s"],
                    }
                )
    return out


#: Why the projection on the measured link is not the measured time beside it.
PROJECTION_NOTE = (
    "The measured-link row sets each projection beside what this run measured. The projection\n"
    "assumes no CPU time (no encoding, decoding or reduction, no Python), every message crossing\n"
    "the link once at the full rate from its first byte (no TCP slow start or acknowledgement\n"
    "waits, no jitter, no commit round trip at the end of a collective), and no overlap with\n"
    "compute. So it is a lower bound on the time in communication: the measured 'in comm' is\n"
    "larger by those costs (and by other load on this machine), and the measured wall time adds\n"
    "compute, less whatever a method overlaps (streaming DiLoCo, DeMo)."
)


def format_projections(rows: list[dict[str, Any]]) -> str:
    lines = [
        "PROJECTIONS (not measured): communication time from this run's counted bytes and",
        "hops, = hops x one-way delay + bytes x 8 / rate; no overlap, compute excluded.",
        PROJECTION_NOTE,
    ]
    last = None
    for r in rows:
        if (r["method"], r["model"]) != last:
            last = (r["method"], r["model"])
            lines.append(
                f"  {r['method']} / {r['model']}: {format_bytes(r['payload_bytes_per_worker'])} per worker"
            )
        line = (
            f"      {r['link']:<28} {r['one_way_delay_s'] * 1e3:5.0f} ms  "
            f"~{r['projected_comm_s']:,.1f} s (projection)"
        )
        if r.get("measured_here"):
            line += (
                f"; measured {r['measured_comm_s']:,.1f} s in comm, "
                f"{r['measured_wall_s']:,.1f} s wall"
            )
        lines.append(line)
    return "\n".join(lines)


def write_json(path: Path, results: dict[str, Any]) -> None:
    """Write ``results`` (NaN and infinity as null, so any JSON reader accepts the file)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean(results), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
