"""4 peers all-reduce 64 MiB of fp32 on loopback: lowband (ZeroMQ) vs hivemind's averager.

    python benchmarks/bench_transport_loopback.py [--size 64MiB] [--repeat 3] [--hivemind /tmp/hm/bin/python]

lowband: four processes, ``init_group(backend="zmq")`` with the coordinator in its own process,
``all_reduce(op="mean")`` timed from a barrier to the last peer's result, best of ``--repeat``.
Every result is checked against the exact mean and across peers (identical bits).

hivemind (issue 5's reference): the same tensors averaged by ``hivemind.averaging.
DecentralizedAverager`` in four processes of a separate environment (``python -m venv /tmp/hm &&
/tmp/hm/bin/pip install hivemind``), timed the same way, each result checked against the exact
mean. Both run in this one invocation, interleaved round by round, on the same machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORLD = 4

HIVEMIND_PEER = r'''
import json, sys, time, torch, hivemind
from hivemind.averaging import DecentralizedAverager
rank, world, n, rounds, initial = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
dht = hivemind.DHT(start=True, initial_peers=initial or None, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
if rank == 0:
    print(json.dumps({"maddrs": [str(a) for a in dht.get_visible_maddrs()]}), flush=True)
inputs = [torch.randn(n, generator=torch.Generator().manual_seed(7 + r)) for r in range(world)]
expected = torch.stack(inputs).mean(0)
t = inputs[rank].clone()
avg = DecentralizedAverager([t], dht=dht, prefix="bench", target_group_size=world, min_group_size=world,
                            start=True, min_matchmaking_time=5.0, request_timeout=3.0)
for k in range(rounds):
    with avg.get_tensors() as ts:
        ts[0].copy_(inputs[rank])
    sys.stdin.readline()  # the parent starts every peer's round together
    t0 = time.monotonic()
    out = avg.step(timeout=300)
    t1 = time.monotonic()
    with avg.get_tensors() as ts:
        ok = bool(torch.allclose(ts[0], expected, rtol=1e-4, atol=1e-5)) and out is not None
    print(json.dumps({"round": k, "t0": t0, "t1": t1, "ok": ok}), flush=True)
avg.shutdown(); dht.shutdown()
'''


def lowband_peer(rank: int, world: int, coord: str, n: int, rounds: int, q: Any, go: Any) -> None:
    import torch

    import lowband

    g = lowband.init_group(rank, world, store=coord, backend="zmq", peer_timeout=60, group_name="loop")
    try:
        inputs = [torch.randn(n, generator=torch.Generator().manual_seed(7 + r)) for r in range(world)]
        expected = torch.stack(inputs).mean(0)
        g.all_reduce(inputs[rank][:4096]).wait()
        for k in range(rounds):
            go.get()
            g.barrier()
            t0 = time.monotonic()
            out = g.all_reduce(inputs[rank], op="mean").wait()
            t1 = time.monotonic()
            ok = bool(torch.allclose(out, expected, rtol=1e-5, atol=1e-6))
            q.put((k, rank, t0, t1, ok, hashlib.sha256(out.numpy().tobytes()).hexdigest()))
    finally:
        g.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="64MiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--hivemind", default="/tmp/hm/bin/python", help="python of the hivemind environment")
    args = ap.parse_args(argv)
    from lowband.transport.coordinator import start_coordinator
    from lowband.wan.topology import parse_bytes

    n = parse_bytes(args.size) // 4
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    gos = [ctx.Queue() for _ in range(WORLD)]
    hm_ok = os.path.exists(args.hivemind)
    best = {"lowband": float("inf"), "hivemind": float("inf")}
    print(f"all_reduce of {n * 4 / 2**20:.0f} MiB fp32, {WORLD} peers on loopback, best of {args.repeat}")
    with start_coordinator() as co:
        procs = [ctx.Process(target=lowband_peer, args=(r, WORLD, co.address, n, args.repeat, q, gos[r]))
                 for r in range(WORLD)]
        for p in procs:
            p.start()
        hm: list[subprocess.Popen[str]] = []
        if hm_ok:
            script = Path("/tmp/lowband_hivemind_peer.py")
            script.write_text(HIVEMIND_PEER)
            first = subprocess.Popen([args.hivemind, str(script), "0", str(WORLD), str(n), str(args.repeat)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
            maddrs = json.loads(first.stdout.readline())["maddrs"]  # type: ignore[union-attr]
            hm = [first] + [subprocess.Popen([args.hivemind, str(script), str(r), str(WORLD), str(n),
                                              str(args.repeat), *maddrs],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                             start_new_session=True)
                            for r in range(1, WORLD)]
            time.sleep(5)
        try:
            for k in range(args.repeat):
                for g in gos:
                    g.put(k)
                rows = [q.get(timeout=600) for _ in range(WORLD)]
                t = max(r[3] for r in rows) - min(r[2] for r in rows)
                ok = all(r[4] for r in rows) and len({r[5] for r in rows}) == 1
                best["lowband"] = min(best["lowband"], t)
                line = f"  round {k}: lowband {t:.3f} s ({'verified, identical' if ok else 'WRONG'})"
                if hm:
                    for p in hm:
                        p.stdin.write("go\n")  # type: ignore[union-attr]
                        p.stdin.flush()  # type: ignore[union-attr]
                    res = [json.loads(p.stdout.readline()) for p in hm]  # type: ignore[union-attr]
                    th = max(r["t1"] for r in res) - min(r["t0"] for r in res)
                    hok = all(r["ok"] for r in res)
                    best["hivemind"] = min(best["hivemind"], th)
                    line += f" | hivemind {th:.3f} s ({'verified' if hok else 'WRONG RESULT'})"
                print(line, flush=True)
        finally:
            for p in procs:
                p.join(60)
                if p.is_alive():
                    p.kill()
            for p in hm:  # each peer and its p2pd daemon share a session: end them together
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)
    print(f"lowband best {best['lowband']:.3f} s")
    if hm:
        print(f"hivemind best {best['hivemind']:.3f} s: lowband is {best['hivemind'] / best['lowband']:.1f}x faster")
    else:
        print(f"hivemind not measured: {args.hivemind} does not exist")
    return 0


if __name__ == "__main__":
    sys.exit(main())
