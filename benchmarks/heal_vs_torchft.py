"""Heal time, lowband vs torchft: from the restart of a killed replica to the first sync
that includes it, on the same 2-replica model, in one run (issue 16, "Done when").

    python benchmarks/heal_vs_torchft.py --torchft-python /work/torchft-venv/bin/python

Both sides: 2 replicas of the same MLP on CPU, one gradient sync per step (lowband:
``CompressedGradients(codec="fp32")`` over ``init_group(on_failure="drop")`` with a
``lowband coordinator``; torchft 0.2.0: ``Manager`` + ``DistributedDataParallel`` +
``OptimizerWrapper`` over gloo with a ``LighthouseServer``, ``min_replica_size=1``). After
``--kill-after`` steps replica 1 is SIGKILLed and started again at once (a new process:
interpreter start-up and ``import torch`` are part of the figure on both sides). Printed,
per side: seconds from the restart to the restarted replica's first completed step whose
sync had 2 participants, and the same from its first line of Python (the protocol's own
share), and from the end of its set-up (imports of torch and the library, the model and
its inner AdamW built: what is left is the protocol's own share: connect, join or quorum,
heal, the sync). torchft runs in its own venv (``--torchft-python``), as its wheel pins its deps.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DIM, HIDDEN = 32, 64


def _model() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))


def _batch(i: int) -> Any:
    import torch

    x = torch.randn(16, DIM, generator=torch.Generator().manual_seed(i))
    return x, x[:, :1].sin()


# -- lowband replica -----------------------------------------------------------------------------


def lowband_replica(conn: Any, rank: int, coord: str, steps: int, pause: float) -> None:
    t_py = time.time()
    import torch

    import lowband
    from lowband.optim import CompressedGradients  # imported here, as torchft's DDP is below

    torch.set_num_threads(1)
    model = _model()  # model and inner optimizer before the clock: not the protocol's share
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    t_imp = time.time()
    if os.environ.get("HEAL_LOG"):  # the protocol's steps, timed (for finding where time goes)
        logging.basicConfig(level=logging.DEBUG, format=f"%(created).3f r{rank} %(name)s %(message)s")
    if os.environ.get("HEAL_LOG"):
        logging.info("imports done")
    group = lowband.init_group(rank, 2, store=coord, backend="zmq", on_failure="drop", peer_timeout=5.0,
                               group_name="heal", init_timeout=120)
    if os.environ.get("HEAL_LOG"):
        logging.info("init_group returned, joined_at %s", group.joined_at)
    opt = CompressedGradients(inner, group=group, codec="fp32")
    if os.environ.get("HEAL_LOG"):
        logging.info("optimizer built")
    for i in range(steps):
        x, y = _batch(rank * 100_000 + i)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if os.environ.get("HEAL_LOG") and i < 1:
            logging.info("backward done")
        opt.step()
        conn.send((time.time(), t_py, t_imp, len(group.participants)))
        if os.environ.get("HEAL_LOG") and i < 3:
            logging.info("step %d done, participants %s", i, group.participants)
        time.sleep(pause)
    group.close()


def run_lowband(kill_after: int, steps: int, pause: float) -> dict[str, float]:
    from lowband.transport.coordinator import start_coordinator

    ctx = mp.get_context("spawn")
    with start_coordinator() as co:
        pipes, procs = [], []
        for r in range(2):
            a, b = ctx.Pipe(duplex=False)
            p = ctx.Process(target=lowband_replica, args=(b, r, co.address, steps, pause))
            p.start()
            pipes.append(a)
            procs.append(p)
        return _drive(ctx, pipes, procs, kill_after,
                      lambda b: ctx.Process(target=lowband_replica, args=(b, 1, co.address, steps, pause)))


# -- torchft replica (runs under the torchft venv's python) ---------------------------------------


def torchft_replica(conn: Any, rank: int, lighthouse: str, steps: int, pause: float) -> None:
    t_py = time.time()
    import torch
    import torch.distributed as dist
    from torchft.ddp import DistributedDataParallel
    from torchft.manager import Manager
    from torchft.optim import OptimizerWrapper
    from torchft.process_group import ProcessGroupGloo

    torch.set_num_threads(1)
    model = _model()  # model and inner optimizer before the clock: not the protocol's share
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    t_imp = time.time()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)

    def load_state_dict(sd: dict) -> None:
        model.load_state_dict(sd["model"])
        inner.load_state_dict(sd["optim"])

    def state_dict() -> dict:
        return {"model": model.state_dict(), "optim": inner.state_dict()}

    manager = Manager(pg=ProcessGroupGloo(), min_replica_size=1, load_state_dict=load_state_dict,
                      state_dict=state_dict, replica_id=f"replica{rank}", store_addr="127.0.0.1",
                      store_port=store.port, rank=0, world_size=1, lighthouse_addr=lighthouse)
    ddp = DistributedDataParallel(manager, model)
    opt = OptimizerWrapper(manager, inner)
    for i in range(steps):
        x, y = _batch(rank * 100_000 + i)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        committed = opt.step()
        conn.send((time.time(), t_py, t_imp, manager.num_participants() if committed is not False else 0))
        time.sleep(pause)
    manager.shutdown(wait=False)


def run_torchft(kill_after: int, steps: int, pause: float) -> dict[str, float]:
    from torchft._torchft import LighthouseServer

    lh = LighthouseServer(bind="[::]:0", min_replicas=1, join_timeout_ms=100)
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for r in range(2):
        a, b = ctx.Pipe(duplex=False)
        p = ctx.Process(target=torchft_replica, args=(b, r, lh.address(), steps, pause))
        p.start()
        pipes.append(a)
        procs.append(p)
    try:
        return _drive(ctx, pipes, procs, kill_after,
                      lambda b: ctx.Process(target=torchft_replica, args=(b, 1, lh.address(), steps, pause)))
    finally:
        lh.shutdown()


# -- the shared driver -----------------------------------------------------------------------------


def _drive(ctx: Any, pipes: list, procs: list, kill_after: int, respawn: Any) -> dict[str, float]:
    """Wait until both replicas ran ``kill_after`` steps with 2 participants, kill replica 1,
    start it again at once, and time its first step with 2 participants."""
    seen = [0, 0]
    deadline = time.time() + 600
    while min(seen) < kill_after and time.time() < deadline:
        for i, c in enumerate(pipes):
            while c.poll(0.01):
                *_, n = c.recv()
                if n == 2:
                    seen[i] += 1
    procs[1].kill()
    procs[1].join(10)
    a, b = ctx.Pipe(duplex=False)
    t_restart = time.time()
    p = respawn(b)
    p.start()
    pipes[1], procs[1] = a, p
    out: dict[str, float] = {}
    while time.time() < deadline:
        while pipes[0].poll(0):  # keep the survivor's pipe drained
            pipes[0].recv()
        if a.poll(0.01):
            t, t_py, t_imp, n = a.recv()
            if n == 2:
                out = {"from_restart_s": t - t_restart, "from_python_s": t - t_py, "from_imports_s": t - t_imp}
                break
    for q in procs:
        q.kill()
        q.join(10)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--torchft-python", default="/work/torchft-venv/bin/python")
    ap.add_argument("--kill-after", type=int, default=20)
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--pause", type=float, default=0.05, help="seconds between steps")
    ap.add_argument("--side", choices=["both", "lowband", "torchft"], default="both")
    args = ap.parse_args(argv)
    if args.side == "torchft":
        print(json.dumps(run_torchft(args.kill_after, args.steps, args.pause)))
        return 0
    if args.side == "lowband":
        print(json.dumps(run_lowband(args.kill_after, args.steps, args.pause)))
        return 0
    low = run_lowband(args.kill_after, args.steps, args.pause)
    rep = subprocess.run([args.torchft_python, __file__, "--side", "torchft", "--kill-after", str(args.kill_after),
                          "--steps", str(args.steps), "--pause", str(args.pause)],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": ""})
    lines = [ln for ln in rep.stdout.splitlines() if ln.startswith("{")]
    tft = json.loads(lines[-1]) if lines else {}
    print(f"heal of a killed replica, 2 replicas, one sync per step (load average {os.getloadavg()[0]:.1f}):")
    print(f"{'':10} {'restart -> first 2-replica sync':>32} {'first line of Python -> it':>28} "
          f"{'set-up done -> it':>20}")
    for name, r in (("lowband", low), ("torchft", tft)):
        if r:
            print(f"{name:10} {r['from_restart_s']:31.2f}s {r['from_python_s']:27.2f}s {r['from_imports_s']:19.2f}s")
        else:
            print(f"{name:10} {'failed':>32}")
    if not tft:
        print(rep.stderr[-3000:])
    return 0 if low and tft else 1


if __name__ == "__main__":
    sys.exit(main())
