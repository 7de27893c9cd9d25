"""``lowband wan``: run commands on emulated hosts, or clean up what a killed run left behind.

    lowband wan run --hosts 2 --rate 100mbit --rtt 100ms --on 1 "iperf3 -s -1" --on 0 "iperf3 -c {1}"
    lowband wan cleanup [--all]

In ``run``, ``{i}`` in a command is replaced by host ``i``'s address and ``{hub}`` by the hub's.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from lowband.errors import ConfigError
from lowband.wan._netns import list_namespaces
from lowband.wan.emulator import HUB, LinkEmulator
from lowband.wan.topology import Topology

__all__ = ["main", "cleanup"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup(*, everything: bool = False) -> list[str]:
    """Remove ``lbw*`` namespaces (and end their processes) whose creator is gone.

    With ``everything``, remove them all, also those of live runs. Returns what was removed.
    """
    removed: list[str] = []
    if os.geteuid() == 0 and shutil.which("ip"):
        for ns in list_namespaces("lbw"):
            owner = ns[3:].split("x", 1)[0]
            if not everything and owner.isdigit() and _pid_alive(int(owner)):
                continue
            pids = subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            removed.append(ns)
    for d in glob.glob(os.path.join(os.environ.get("TMPDIR", "/tmp"), "lowband-wan-*")):
        sock = os.path.join(d, "relay.sock")
        if everything or not os.path.exists(sock) or time.time() - os.path.getmtime(d) > 86400:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _run(args: argparse.Namespace) -> int:
    try:
        topo = Topology.uniform(
            args.hosts,
            rate=args.rate,
            basis=args.basis,
            up=args.up,
            rtt=args.rtt,
            jitter=args.jitter,
            queue=args.queue,
            loss=args.loss,
        )
    except ConfigError as exc:
        print(f"lowband wan: {exc}", file=sys.stderr)
        return 2
    with LinkEmulator(topo, mode=args.mode) as net:
        names = {str(i): net.host_address(i) for i in range(topo.n)}
        names["hub"] = net.hub_address
        print(
            f"lowband wan: {net.mode} mode, hosts {[names[str(i)] for i in range(topo.n)]}, hub {names['hub']}",
            file=sys.stderr,
        )
        procs = []
        for host, cmd in args.on:
            h = HUB if host == "hub" else int(host)
            for key, value in names.items():
                cmd = cmd.replace("{" + key + "}", value)
            procs.append(net.popen(h, ["sh", "-c", cmd]))
            time.sleep(args.stagger)
        codes = [p.wait() for p in procs]
        print(json.dumps({"link_bytes": net.link_bytes()}))
    return max((abs(c) for c in codes), default=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowband wan", description="emulated internet links")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="start the emulator and run commands on its hosts")
    run.add_argument("--hosts", type=int, default=2)
    run.add_argument("--rate", default="100mbit", help="downlink (and uplink) rate, e.g. 100mbit")
    run.add_argument("--up", default=None, help="uplink rate if different")
    run.add_argument(
        "--basis",
        choices=("payload", "frames"),
        default="payload",
        help="what rates count: TCP payload of a bulk transfer (default) or Ethernet frames",
    )
    run.add_argument("--rtt", default="100ms", help="round trip between any two hosts")
    run.add_argument("--jitter", default="0ms")
    run.add_argument(
        "--queue", default=None, help="bottleneck queue bytes per direction (default 50 ms)"
    )
    run.add_argument("--loss", type=float, default=0.0, help="random loss per packet (netns only)")
    run.add_argument("--mode", choices=("auto", "netns", "proxy"), default="auto")
    run.add_argument(
        "--on",
        nargs=2,
        action="append",
        default=[],
        metavar=("HOST", "COMMAND"),
        help="run COMMAND (sh -c) on HOST (an index or 'hub'); repeatable",
    )
    run.add_argument("--stagger", type=float, default=0.5, help="seconds between starting commands")
    clean = sub.add_parser("cleanup", help="remove namespaces and relay files left by dead runs")
    clean.add_argument("--all", action="store_true", help="also those of runs still alive")
    args = parser.parse_args(argv)
    if args.cmd == "cleanup":
        for item in cleanup(everything=args.all):
            print(f"removed {item}")
        return 0
    return _run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
