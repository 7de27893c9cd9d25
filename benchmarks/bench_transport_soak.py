"""Soak of the ZeroMQ transport: many all_reduce rounds under seeded random kills and link cuts.

    python benchmarks/bench_transport_soak.py --rounds 10000 --seed 0        # issue 5's figure
    python benchmarks/bench_transport_soak.py --minutes 5 --seed 0           # bounded by time

Four peers on the link emulator's netns hosts (1 Gbit/s, 2 ms round trip), the coordinator at
the hub, ``init_group(backend="zmq", on_failure="drop")``. Each round every peer all-reduces (sum)
a small tensor that depends on (generation, round, rank) and reports the participants, a digest
of its result and whether the result equals the exact sum over the participants it reports.
Faults, drawn from ``--seed``: SIGKILL of a random peer (rank 0 included), and cuts of a random
link for a random time on either side of ``peer_timeout``. When fewer than two peers remain, the
generation ends and a fresh group of four starts (the collectives have no rejoin path yet).

Checked for every round: every peer that finished it reports the same participants and the
same bits, and the value is right. A hang is no round finishing within 5 x peer_timeout.
Prints rounds, faults, checks and wall time.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowband.wan import HUB, LinkEmulator, Topology, local_address  # noqa: E402

PEER_TIMEOUT = 2.0
WORLD = 4
N = 1024


def run_coordinator(q: Any, hub: str) -> None:
    from lowband.transport.coordinator import Coordinator

    co = Coordinator(f"{hub}:0")
    q.put(("coord", co.address))
    co.serve(stop_after=24 * 3600)


def value(gen: int, k: int, rank: int) -> Any:
    import torch

    return torch.randn(N, generator=torch.Generator().manual_seed((gen * 1_000_003 + k) * 16 + rank))


def peer(q: Any, rank: int, coord: str, gen: int, rounds: int) -> None:
    import hashlib

    import torch

    import lowband
    from lowband.errors import PeerLost, TransportError

    g = lowband.init_group(rank, WORLD, store=coord, backend="zmq", peer_timeout=PEER_TIMEOUT,
                           group_name=f"soak{gen}", on_failure="drop", host=local_address(), streams=2,
                           init_timeout=300)
    try:
        for k in range(rounds):
            w = g.all_reduce(value(gen, k, rank), op="sum")
            try:
                out = w.wait(timeout=20 * PEER_TIMEOUT)
            except (PeerLost, TransportError) as e:  # this rank was dropped (a cut isolated it)
                q.send(("out", gen, k, rank, repr(e)))
                return
            parts = tuple(w.participants)
            exact = torch.stack([value(gen, k, r) for r in parts]).to(torch.float64).sum(0).float()
            ok = bool(torch.allclose(out, exact, rtol=1e-5, atol=1e-5))
            q.send(("round", gen, k, rank, parts, hashlib.sha256(out.numpy().tobytes()).hexdigest(), ok))
    finally:
        g.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10_000, help="total rounds to run (all generations)")
    ap.add_argument("--minutes", type=float, default=None, help="stop after this long, whatever the rounds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fault-every", type=float, default=4.0, help="mean seconds between faults")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root for the netns link emulator")
        return 2
    rng = random.Random(args.seed)
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    stop_at = time.monotonic() + (args.minutes * 60 if args.minutes else 1e9)
    t_start = time.monotonic()
    done_rounds = kills = cuts = long_cuts = wrong = divergent = hangs = gens = dropped = 0
    with LinkEmulator(Topology.uniform(WORLD, rate="1gbit", rtt="2ms"), mode="netns") as net:
        net.spawn(HUB, run_coordinator, args=(q, net.hub_address))
        coord = q.get(timeout=120)[1]
        gen = 0
        while done_rounds < args.rounds and time.monotonic() < stop_at:
            gens += 1
            # one pipe per peer: a peer killed while writing must not wedge the others' channel
            # (a shared multiprocessing.Queue would: its writer lock dies with the writer)
            pipes = {r: ctx.Pipe(duplex=False) for r in range(WORLD)}
            procs = {r: net.spawn(r, peer, args=(pipes[r][1], r, coord, gen, args.rounds - done_rounds))
                     for r in range(WORLD)}
            readers = {pipes[r][0]: r for r in range(WORLD)}
            live = set(range(WORLD))
            reports: dict[int, dict[int, tuple]] = {}
            next_fault = float("inf")  # faults start once the group has settled its first round
            last_progress = time.monotonic() + 300  # start-up (spawn, import torch, join) gets 5 min
            restore: list[tuple[float, int, int]] = []
            finished_k = -1
            pending: list[tuple] = []
            while len(live) >= 2 and time.monotonic() < stop_at and done_rounds < args.rounds:
                now = time.monotonic()
                for item in [x for x in restore if x[0] <= now]:
                    net.restore(item[1], item[2])
                    restore.remove(item)
                if now >= next_fault:
                    next_fault = now + rng.expovariate(1 / args.fault_every)
                    if rng.random() < 0.5:
                        victim = rng.choice(sorted(live))
                        procs[victim].kill()
                        live.discard(victim)
                        kills += 1
                    else:
                        a, b = rng.sample(sorted(live), 2)
                        secs = rng.choice([0.5 * PEER_TIMEOUT, 3 * PEER_TIMEOUT])
                        long_cuts += secs > PEER_TIMEOUT
                        net.cut(a, b)
                        restore.append((now + secs, a, b))
                        cuts += 1
                if not pending:
                    ready = wait(list(readers), timeout=0.2)
                    for conn in ready:
                        try:
                            pending.append(conn.recv())
                        except (EOFError, OSError):  # that peer is gone (killed)
                            del readers[conn]
                if not pending:
                    if time.monotonic() - last_progress > 5 * PEER_TIMEOUT + 20:
                        hangs += 1
                        print(f"HANG: generation {gen}, no round finished for {time.monotonic() - last_progress:.0f} s")
                        break
                    continue
                item = pending.pop(0)
                if item[0] == "out":
                    live.discard(item[3])
                    dropped += 1
                    continue
                _, _, k, rank, parts, digest, ok = item
                last_progress = time.monotonic()
                reports.setdefault(k, {})[rank] = (parts, digest, ok)
                wrong += not ok
                # a round is settled once every peer still running has reported it
                while finished_k + 1 in reports and set(reports[finished_k + 1]) >= live:
                    finished_k += 1
                    rows = reports.pop(finished_k)
                    if len({(p, d) for p, d, _ in rows.values()}) != 1:
                        divergent += 1
                        print(f"DIVERGENT: generation {gen} round {finished_k}: {rows}")
                    done_rounds += 1
                    if done_rounds % 500 == 0:
                        print(f"  {done_rounds} rounds settled after {time.monotonic() - t_start:.0f} s "
                              f"(generation {gen}; {kills} kills, {cuts} cuts so far)", flush=True)
                    if next_fault == float("inf"):
                        next_fault = time.monotonic() + rng.expovariate(1 / args.fault_every)
            for a_, b_ in [(x[1], x[2]) for x in restore]:
                net.restore(a_, b_)
            for p in procs.values():
                p.kill()
                p.join(10)
            gen += 1
            if hangs:
                break
    wall = time.monotonic() - t_start
    print(f"soak seed {args.seed}: {done_rounds} rounds settled in {wall:.0f} s over {gens} groups; "
          f"{kills} kills, {cuts} link cuts ({long_cuts} longer than peer_timeout={PEER_TIMEOUT}s), "
          f"{dropped} peers dropped by cuts; wrong results {wrong}, divergent rounds {divergent}, hangs {hangs}")
    return 0 if not (wrong or divergent or hangs) else 1


if __name__ == "__main__":
    sys.exit(main())
