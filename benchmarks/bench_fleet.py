"""RL weight sync to a fleet: time to deliver a version to 8 actors, direct vs through relays (issue 19).

Faithful link emulation (``lowband.wan`` netns mode: veth + tc tbf + a TUN delay line,
so the kernel's TCP sees the real round trips; needs root). Hosts:

- the learner: 100 Mbit/s up (the bottleneck), 1 Gbit/s down;
- two relays (``WeightRelay``) in datacenters near the learner: 1 Gbit/s, 10 ms one way
  to the learner and to each other;
- 8 actors: 100 Mbit/s down, 20-100 Mbit/s up, 15-75 ms one way to everyone else.

A bf16 model of ``--params`` values; each version flips a mantissa bit at ``--fraction``
of the positions (below 1: an exact sparse delta; 1, the default: every value changes, so
every chunk travels dense, as when Adam moves every weight). All processes share this
machine's cores while each stands for its own host: the default keeps the work per byte
small (a dense chunk is copied and hashed), so the links, not the CPU, set the times.
Sparse deltas cost more CPU per byte (decode, scatter, hash), and with 10 processes on 2
cores ``--fraction 0.1`` measures mostly the CPU. Three set-ups, ``--rounds`` versions each:

- ``direct-1``: the farthest actor alone, subscribed to the learner (T1, the time for one);
- ``direct-8``: all 8 actors subscribed to the learner (today's fan-out: about 8 x T1);
- ``tree-8``: learner -> relay 1 -> relay 2 (cut-through), actors 0-3 on relay 1, 4-7 on
  relay 2, each with ``connect=[own relay, other relay, learner]`` and ``origin=learner``.

Per version: time from ``publish()`` to the last actor having applied it (each actor's
fingerprint must equal the learner's), and the learner's uplink link bytes for it
(counted by the emulator) against the version's payload bytes. Pass when tree-8 <=
1.5 x direct-1 (median) and the learner's upload <= 2 x one delta.

    python benchmarks/bench_fleet.py [--params 4000000 --fraction 1.0 --rounds 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from multiprocessing.connection import Connection

import numpy as np
import torch

LEARNER, RELAY1, RELAY2 = 0, 1, 2
ACTOR0 = 3
N_ACTORS = 8


def _shapes(params: int, tensors: int) -> dict[str, tuple[int, ...]]:
    return {f"layer{i}.weight": (params // tensors,) for i in range(tensors)}


def _learner(params: int, tensors: int, fraction: float, conn: Connection) -> None:
    from lowband.sync import WeightPublisher
    from lowband.wan import local_address

    torch.set_num_threads(1)

    g = torch.Generator().manual_seed(0)
    model = {
        k: torch.randn(s, generator=g).to(torch.bfloat16)
        for k, s in _shapes(params, tensors).items()
    }
    rng = np.random.default_rng(1)
    with WeightPublisher(model, bind=f"{local_address()}:0", chunk_elems=1 << 18) as pub:
        pub.publish()
        conn.send(pub.address)
        while True:
            cmd = conn.recv()
            if cmd == "stop":
                return
            for t in model.values():
                b = t.view(torch.int16).numpy()
                if fraction >= 1.0:  # every value changes: each chunk travels dense
                    b ^= 1
                else:
                    b[rng.choice(b.size, int(fraction * b.size), replace=False)] ^= 1
            t0 = time.monotonic()
            st = pub.publish()
            conn.send((t0, st.version, st.fingerprint, st.payload_bytes))


def _relay(connect: list[str], origin: str | None, conn: Connection) -> None:
    from lowband.sync import WeightRelay
    from lowband.wan import local_address

    torch.set_num_threads(1)

    with WeightRelay(connect=connect, origin=origin, bind=f"{local_address()}:0", retry_s=2.0) as r:
        conn.send(r.address)
        conn.recv()
        if r.error is not None:
            raise SystemExit(f"relay stopped: {r.error}")


def _actor(
    params: int, tensors: int, connect: list[str], origin: str | None, conn: Connection
) -> None:
    from lowband.errors import CollectiveTimeout
    from lowband.sync import WeightSubscriber

    torch.set_num_threads(1)

    model = {k: torch.zeros(s, dtype=torch.bfloat16) for k, s in _shapes(params, tensors).items()}
    with WeightSubscriber(model, connect=connect, origin=origin, retry_s=2.0) as sub:
        while not conn.poll(0):
            try:
                v = sub.update(block=True, timeout=0.05)
            except CollectiveTimeout:
                continue
            if v is not None:
                conn.send((v, sub.fingerprint, time.monotonic(), sub.failovers))


def _topology():  # type: ignore[no-untyped-def]
    from lowband.wan import HostLink, Topology

    links = [HostLink(up_bps=100e6, down_bps=1e9, queue_bytes=1 << 20)]
    links += [HostLink(up_bps=1e9, down_bps=1e9, queue_bytes=4 << 20)] * 2
    ups = [20e6, 30e6, 40e6, 50e6, 60e6, 80e6, 90e6, 100e6]
    links += [HostLink(up_bps=u, down_bps=100e6, queue_bytes=1 << 20) for u in ups]
    n = len(links)
    actor_delay = [0.015 + 0.06 * i / (N_ACTORS - 1) for i in range(N_ACTORS)]
    d = [[0.0] * n for _ in range(n)]
    for a in range(n):
        for b in range(n):
            if a == b:
                continue
            if a < ACTOR0 and b < ACTOR0:
                d[a][b] = 0.010
            else:  # an actor's own access delay dominates
                d[a][b] = max(
                    actor_delay[a - ACTOR0] if a >= ACTOR0 else 0.0,
                    actor_delay[b - ACTOR0] if b >= ACTOR0 else 0.0,
                )
    return Topology.from_links(links, d)


def _run(net, setup: str, args: argparse.Namespace) -> dict:  # type: ignore[no-untyped-def]
    ctx = mp.get_context("spawn")
    pipes = []

    def start(host: int, target, *a):  # type: ignore[no-untyped-def]
        mine, theirs = ctx.Pipe()
        net.spawn(host, target, args=(*a, theirs))
        pipes.append(mine)
        return mine

    learner = start(LEARNER, _learner, args.params, args.tensors, args.fraction)
    if not learner.poll(120):
        raise SystemExit("the learner did not start")
    addr = learner.recv()
    actors: list[Connection] = []
    others: list[Connection] = []
    if setup.startswith("direct"):
        # direct-1: the farthest actor alone (75 ms one way), so T1 is the slowest single delivery
        for i in [N_ACTORS - 1] if setup == "direct-1" else range(N_ACTORS):
            actors.append(start(ACTOR0 + i, _actor, args.params, args.tensors, [addr], None))
    else:
        r1 = start(RELAY1, _relay, [addr], None)
        a1 = r1.recv()
        r2 = start(RELAY2, _relay, [a1, addr], addr)
        a2 = r2.recv()
        others += [r1, r2]
        for i in range(N_ACTORS):
            mine, other = (a1, a2) if i < N_ACTORS // 2 else (a2, a1)
            actors.append(
                start(ACTOR0 + i, _actor, args.params, args.tensors, [mine, other, addr], addr)
            )
    deadline = time.monotonic() + 300
    for c in actors:  # the first version (a snapshot), from wherever each actor gets it
        if not c.poll(max(1.0, deadline - time.monotonic())):
            raise SystemExit(f"{setup}: an actor did not get the first version")
        c.recv()
    out = {"times": [], "upload": [], "delta": [], "failovers": 0}
    for _ in range(args.rounds):
        time.sleep(0.5)
        up0 = net.link_bytes()[LEARNER]["up"]
        learner.send("publish")
        t0, version, finger, nbytes = learner.recv()
        done = []
        for c in actors:
            while True:
                if not c.poll(120):
                    raise SystemExit(f"{setup}: version {version} not delivered in 120 s")
                v, fp, t, fo = c.recv()
                if v == version:
                    break
            if fp != finger:
                raise SystemExit(
                    f"{setup}: an actor holds fingerprint {fp:#x}, learner {finger:#x}"
                )
            done.append(t)
            out["failovers"] += fo
        time.sleep(0.3)
        out["times"].append(max(done) - t0)
        out["upload"].append(net.link_bytes()[LEARNER]["up"] - up0)
        out["delta"].append(nbytes)
    for c in [learner, *others, *actors]:
        c.send("stop")
    time.sleep(1.0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=int, default=4_000_000)
    ap.add_argument("--tensors", type=int, default=40)
    ap.add_argument("--fraction", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--setups", default="direct-1,direct-8,tree-8")
    args = ap.parse_args(argv)

    from lowband.wan import LinkEmulator

    results = {}
    with LinkEmulator(_topology(), mode="netns") as net:
        for setup in args.setups.split(","):
            results[setup] = _run(net, setup, args)  # its processes end at "stop"
    print(f"model {args.params / 1e6:.0f}M bf16 values, {args.fraction:.0%} changed per version")
    print(f"{'setup':>9} {'median s':>9} {'best s':>7} {'upload/delta':>13} {'failovers':>9}")
    med = {}
    for setup, r in results.items():
        med[setup] = statistics.median(r["times"])
        ratio = statistics.median(u / d for u, d in zip(r["upload"], r["delta"]))
        print(
            f"{setup:>9} {med[setup]:9.2f} {min(r['times']):7.2f} {ratio:13.2f} {r['failovers']:9d}"
        )
        r["ratio"] = ratio
    if "direct-1" in med and "tree-8" in med:
        k = med["tree-8"] / med["direct-1"]
        ok = k <= 1.5 and results["tree-8"]["ratio"] <= 2.0
        print(
            f"tree-8 / direct-1 = {k:.2f} (target <= 1.5); learner upload "
            f"{results['tree-8']['ratio']:.2f} x one delta (target <= 2): {'PASS' if ok else 'FAIL'}"
        )
        if "direct-8" in med:
            print(f"direct-8 / direct-1 = {med['direct-8'] / med['direct-1']:.2f}")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
