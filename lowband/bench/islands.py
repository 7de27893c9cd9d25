"""``lowband bench --islands 2x2`` (or ``2+1``, ``4+2``): islands of gloo CPU processes
behind the link emulator, against the flat run of the same model (docs/islands.md).

The flat run comes first: one process per replica (``workers`` = number of islands), the
usual table, JSON and plots under ``OUT/flat``. Then the islands run: island ``k`` is
``sizes[k]`` processes on emulated host ``k`` (they share its access link), FSDP2 inside
(an island of one runs the plain model), lowband between islands; its table, JSON and
plots are ``OUT``'s, with one row per island (bytes summed over the island's ranks).
Last, a comparison: WAN payload bytes per island in both runs (equal but for payload
headers: the islands run sends one payload per canonical bucket) and the host bytes of
outer state per rank (at most ``1/L`` of the flat run's plus the buckets' rounding).
"""

from __future__ import annotations

import re
from typing import Any

from lowband.errors import ConfigError

__all__ = ["ISLAND_METHODS", "parse_islands", "per_island", "compare", "format_comparison"]

#: The methods that run over islands (ddp, dense data parallelism, is the flat baseline's own).
ISLAND_METHODS = ("diloco", "streaming-diloco-q4", "sparseloco", "demo")
DEFAULT_ISLAND_METHODS = "diloco,sparseloco"


def parse_islands(text: str) -> tuple[int, ...]:
    """``"2x2"`` -> (2, 2) (islands x ranks); ``"2+1"`` -> (2, 1) (ranks of each island)."""
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if m:
        sizes = (int(m.group(2)),) * int(m.group(1))
    elif re.fullmatch(r"\d+(\+\d+)+", text):
        sizes = tuple(int(x) for x in text.split("+"))
    else:
        raise ConfigError(f"--islands must be NxL (N islands of L ranks) or L1+L2+..., got {text!r}")
    if len(sizes) < 2 or min(sizes) < 1:
        raise ConfigError(f"--islands {text!r}: at least 2 islands of at least 1 rank each")
    if sum(sizes) > 64:
        raise ConfigError(f"--islands {text!r}: {sum(sizes)} processes, more than this benchmark supports (64)")
    return sizes


def check_methods(methods: tuple[str, ...]) -> None:
    for m in methods:
        if m not in ISLAND_METHODS and not m.startswith("grad:"):
            raise ConfigError(
                f"--islands runs {', '.join(ISLAND_METHODS)} and grad:<codec>; not {m!r}"
            )


def per_island(
    results: dict[int, dict[str, Any]],
    curves: dict[int, list[dict[str, float]]],
    sizes: tuple[int, ...],
) -> tuple[dict[int, dict[str, Any]], dict[int, list[dict[str, float]]]]:
    """Per-process results and curves -> per island: bytes summed over the island's ranks,
    times the slowest rank's, losses local rank 0's (every rank of an island holds the same
    replica); ``ranks`` keeps each rank's outer-state bytes, flows and payload bytes."""
    out: dict[int, dict[str, Any]] = {}
    out_curves: dict[int, list[dict[str, float]]] = {}
    first = 0
    for k, n in enumerate(sizes):
        ranks = list(range(first, first + n))
        first += n
        rs = [results[r] for r in ranks]
        island = dict(rs[0])
        island["comm"] = {
            key: (max if key.startswith("seconds") else sum)(r["comm"][key] for r in rs)
            for key in rs[0]["comm"]
        }
        island["setup"] = {key: sum(r["setup"][key] for r in rs) for key in rs[0]["setup"]}
        island["wall_s"] = max(r["wall_s"] for r in rs)
        island["syncs"] = min(r["syncs"] for r in rs)
        island["ranks"] = [
            {
                "rank": r,
                "local_rank": results[r].get("local_rank"),
                "outer_state_bytes": results[r].get("outer_state_bytes"),
                "flows": results[r].get("flows"),
                "payload_bytes_sent": results[r]["comm"]["bytes_sent"],
            }
            for r in ranks
        ]
        out[k] = island
        recs0 = curves.get(ranks[0], [])
        merged = []
        for rec in recs0:
            same = [c for r in ranks for c in curves.get(r, []) if c["step"] == rec["step"]]
            merged.append({**rec, "bytes_sent": sum(c["bytes_sent"] for c in same),
                           "wall_s": max(c["wall_s"] for c in same)})
        out_curves[k] = merged
    return out, out_curves


def compare(flat: dict[str, Any], isl: dict[str, Any], sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    """One row per (method, island): WAN payload bytes and outer state per rank, both runs."""
    rows = []
    for name, m in isl["methods"].items():
        f = flat["methods"].get(name)
        if f is None:
            continue
        flat_by_rank = {w["rank"]: w for w in f["per_worker"]}
        flat_outer = {w["rank"]: w.get("outer_state_bytes") for w in f["per_worker"]}
        for w in m["per_worker"]:
            k = w["rank"]
            ranks = w.get("ranks", [])
            outer = [r["outer_state_bytes"] for r in ranks if r["outer_state_bytes"] is not None]
            rows.append(
                {
                    "method": name,
                    "island": k,
                    "ranks": sizes[k],
                    "flows": sum(int(r["flows"] or 0) for r in ranks),
                    "wan_payload_sent_islands": w["payload_bytes_sent"],
                    "wan_payload_sent_flat": flat_by_rank[k]["payload_bytes_sent"],
                    "link_sent_islands": w.get("link_bytes_sent"),
                    "link_sent_flat": flat_by_rank[k].get("link_bytes_sent"),
                    "outer_state_per_rank_max_islands": max(outer) if outer else None,
                    "outer_state_per_rank_flat": flat_outer.get(k),
                }
            )
    return rows


def format_comparison(rows: list[dict[str, Any]]) -> str:
    from lowband.bench._units import format_bytes

    head = (
        f"{'method':<20} {'island':>6} {'ranks':>5} {'flows':>5}  {'WAN payload sent':>16} "
        f"{'flat run':>10} {'diff':>9}   {'outer state/rank':>16} {'flat run':>10} {'flat/L':>10}"
    )
    lines = ["WAN bytes per island and outer state per rank, islands run against the flat run:", head]
    for r in rows:
        diff = r["wan_payload_sent_islands"] - r["wan_payload_sent_flat"]
        o, fo = r["outer_state_per_rank_max_islands"], r["outer_state_per_rank_flat"]
        lines.append(
            f"{r['method']:<20} {r['island']:>6} {r['ranks']:>5} {r['flows']:>5}  "
            f"{format_bytes(r['wan_payload_sent_islands']):>16} {format_bytes(r['wan_payload_sent_flat']):>10} "
            f"{diff:>+9.0f}   {('-' if o is None else format_bytes(o)):>16} "
            f"{('-' if fo is None else format_bytes(fo)):>10} "
            f"{('-' if fo is None else format_bytes(fo / r['ranks'])):>10}"
        )
    lines.append(
        "diff: payload bytes, islands minus flat (headers of the extra payloads: one per canonical "
        "bucket); outer state: global copy, outer optimizer state and error-feedback residuals"
    )
    return "\n".join(lines)
