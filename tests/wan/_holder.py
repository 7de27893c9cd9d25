"""Test helper run as a script: builds an emulator, starts a sleeper on host 0, reports, waits."""

from __future__ import annotations

import json
import sys
import time

from lowband.wan import LinkEmulator, Topology

if __name__ == "__main__":
    with LinkEmulator(Topology.uniform(2, rate="10mbit", rtt="10ms"), mode=sys.argv[1]) as net:
        sleeper = net.spawn(0, time.sleep, args=(600,))
        cmd = net.popen(1, ["sleep", "600"])
        links = net._links
        helper = links.delayline if net.mode == "netns" else links.relay  # type: ignore[union-attr]
        info = {"namespaces": net.namespaces, "pids": [sleeper.pid, cmd.pid, helper.pid]}
        print(json.dumps(info), flush=True)
        if sys.stdin.readline().strip() == "raise":
            raise RuntimeError("a failing test")
        time.sleep(600)
