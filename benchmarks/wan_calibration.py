"""Calibration of the link emulator: the same transfers through ``netns`` and ``proxy`` mode.

    python benchmarks/wan_calibration.py                 # the table in docs/wan.md (~6 min)
    python benchmarks/wan_calibration.py --quick         # a smaller table (~1 min)
    python benchmarks/wan_calibration.py --limits        # also: where each delay-line engine falls behind
    python benchmarks/wan_calibration.py --limits-only   # only that (~2 min)

Every row sends ``size`` bytes from host 0 to host 1 over 1 or 4 TCP streams (default buffers,
the kernel's congestion control) and times first byte sent -> last byte received. ``ideal`` is
size / rate + one-way delay (rates are TCP payload rates, the emulator's default basis; the
wire carries 1514-byte frames per 1448-byte segment at the matching frame rate).
``netns`` is the faithful mode (the measuring stick); ``proxy/netns``
is the ratio of the two modes' times; ``line`` says whether the delay line kept its schedule
(mean lateness < 0.5 ms and < 1% of packets over 1 ms late). Needs root for ``netns`` mode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowband.wan import LinkEmulator, Topology  # noqa: E402
from lowband.wan._delayline import ENGINE_ENV, native_library  # noqa: E402
from lowband.wan._netns import netns_available  # noqa: E402
from lowband.wan.probes import transfer  # noqa: E402
from lowband.wan.topology import parse_bytes, parse_rate, parse_seconds  # noqa: E402

FULL = [
    # (rate, rtt, size) x streams (1, 4)
    *[("100mbit", rtt, "64MiB") for rtt in ("20ms", "100ms", "300ms")],
    *[("1gbit", rtt, "256MiB") for rtt in ("20ms", "100ms", "300ms")],
    ("1gbit", "100ms", "1GiB"),
]
QUICK = [("100mbit", "20ms", "64MiB"), ("1gbit", "100ms", "256MiB")]


def run_case(
    mode: str, rate: str, rtt: str, size: str, streams: int, *, offload: bool = True
) -> dict:
    topo = Topology.uniform(2, rate=rate, rtt=rtt)
    with LinkEmulator(topo, mode=mode, offload=offload) as net:
        r = transfer(net, 0, 1, parse_bytes(size), streams=streams, timeout=900)
        line = net.line_stats()
    count = line.get("packets", line.get("chunks", 0)) or 1
    r["late_mean_ms"] = line["late_sum_s"] / count * 1e3
    r["late_over_1ms_pct"] = line["late_over_1ms"] / count * 100
    r["late_max_ms"] = line["late_max_s"] * 1e3
    r["line_packets"] = line.get("packets", line.get("chunks", 0))
    r["engine"] = line.get("engine", "proxy")
    r["write_us"] = line.get("write_s", 0.0) / count * 1e6  # netns: kernel forwarding per packet
    r["keeps_up"] = r["late_mean_ms"] < 0.5 and r["late_over_1ms_pct"] < 1.0
    return r


def table(cases: list[tuple[str, str, str]], modes: list[str]) -> list[dict]:
    rows = []
    print(
        "| rate | RTT | streams | size | ideal s | netns s | netns Mbit/s | line "
        "| proxy s | proxy Mbit/s | proxy/netns | netns/ideal |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for rate, rtt, size in cases:
        for streams in (1, 4):
            nbytes = parse_bytes(size)
            ideal = nbytes * 8 / parse_rate(rate) + parse_seconds(rtt) / 2
            row = {
                "rate": rate,
                "rtt": rtt,
                "streams": streams,
                "size": size,
                "ideal_s": ideal,
            }
            for mode in modes:
                row[mode] = run_case(mode, rate, rtt, size, streams)
            n, p = row.get("netns"), row.get("proxy")
            cells = [rate, rtt, str(streams), size, f"{ideal:.2f}"]
            cells += (
                [
                    f"{n['seconds']:.2f}",
                    f"{n['mbps']:.0f}",
                    "ok" if n["keeps_up"] else f"late {n['late_mean_ms']:.1f} ms",
                ]
                if n
                else ["n/a"] * 3
            )
            cells += [f"{p['seconds']:.2f}", f"{p['mbps']:.0f}"] if p else ["n/a"] * 2
            cells += [f"{p['seconds'] / n['seconds']:.3f}" if n and p else "n/a"]
            cells += [f"{n['seconds'] / ideal:.3f}" if n else "n/a"]
            print("| " + " | ".join(cells) + " |", flush=True)
            rows.append(row)
    return rows


LIMITS = (
    (True, ("1gbit", "2gbit", "4gbit")),
    (False, ("50mbit", "100mbit", "200mbit", "500mbit", "1gbit")),
)


def limits() -> list[dict]:
    """4 streams at 20 ms RTT, raising the rate until the delay line falls behind.

    At every rate each delay-line engine runs in turn (``LOWBAND_DELAYLINE``, read by the delay
    line process), so both see the same machine load. ``line packets/s`` counts every packet the
    line released (both directions, acknowledgements included) over the transfer's time;
    ``share of rate`` is the steady payload rate over the link's (payload) rate; ``write us``
    is the mean time inside the delay line's write() per packet, where the kernel forwards the
    packet on (routing, the downlink's tbf, the receiving host's TCP, its acknowledgement).
    """
    engines = ["c", "python"]
    lib, why = native_library()
    if lib is None:
        print(f"the C delay line is not built ({why}): the Python engine only")
        engines = ["python"]
    rows = []
    print(
        "| offload | rate | engine | 4-stream Mbit/s | share of rate | line packets/s "
        "| write us/packet | mean late ms | >1 ms late % | max late ms | line |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    before = os.environ.get(ENGINE_ENV)
    try:
        for offload, rates in LIMITS:
            for rate in rates:
                for engine in engines:
                    os.environ[ENGINE_ENV] = engine
                    size = "512MiB" if offload else "128MiB"
                    r = run_case("netns", rate, "20ms", size, 4, offload=offload)
                    if r["engine"] != engine:
                        raise RuntimeError(f"asked for the {engine} engine, {r['engine']} ran")
                    share = r["steady_mbps"] / (parse_rate(rate) / 1e6)
                    pps = r["line_packets"] / r["seconds"]
                    print(
                        f"| {'GSO' if offload else '1500 B'} | {rate} | {engine} | "
                        f"{r['steady_mbps']:.0f} | {share:.2f} | {pps / 1e3:.0f}K | "
                        f"{r['write_us']:.1f} | "
                        f"{r['late_mean_ms']:.2f} | {r['late_over_1ms_pct']:.1f} | "
                        f"{r['late_max_ms']:.1f} | {'ok' if r['keeps_up'] else 'late'} |",
                        flush=True,
                    )
                    rows.append({"offload": offload, "rate": rate, **r})
    finally:
        if before is None:
            os.environ.pop(ENGINE_ENV, None)
        else:
            os.environ[ENGINE_ENV] = before
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="two cases instead of the full table")
    parser.add_argument(
        "--limits", action="store_true", help="also find where the delay line falls behind"
    )
    parser.add_argument(
        "--limits-only", action="store_true", help="only the delay-line limits, no calibration"
    )
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args()
    try:  # endpoints inherit it: other users' load on a shared machine stays out of the figures
        os.nice(-10)
        niceness = "nice -10"
    except OSError:
        niceness = "normal priority"
    ok, why = netns_available()
    modes = ["netns", "proxy"] if ok else ["proxy"]
    if not ok:
        print(f"netns mode unavailable ({why}): proxy mode only, nothing to calibrate against")
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')} UTC, {os.cpu_count()} CPUs, "
        f"tcp_wmem={open('/proc/sys/net/ipv4/tcp_wmem').read().split()}, "
        f"cc={open('/proc/sys/net/ipv4/tcp_congestion_control').read().strip()}, {niceness}, "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    t0 = time.monotonic()
    result: dict = {}
    if not args.limits_only:
        result["table"] = table(QUICK if args.quick else FULL, modes)
    if (args.limits or args.limits_only) and ok:
        print()
        result["limits"] = limits()
    print(f"\n{time.monotonic() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
