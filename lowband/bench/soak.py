"""Soak: DiLoCo training over the ZeroMQ group under seeded faults (issue 9, "Done when").

    python benchmarks/soak.py --minutes 10 --seed 0 --world 8      # the issue's figure
    python benchmarks/soak.py --minutes 1 --world 4                 # a short run

(``benchmarks/soak.py`` runs :func:`main`; ``tests/reliability/test_faults.py`` runs
:func:`run` with a fixed schedule.)

``world`` peers (processes on the link emulator's netns hosts, 1 Gbit/s, 2 ms round
trip; the coordinator at the hub) train a tiny MLP on a teacher task with
``DiLoCo(sync_every=H, outer_lr=1)`` over ``init_group(backend="zmq",
on_failure="drop")``. Faults, drawn from ``--seed`` every ``--fault-every`` seconds on
average: SIGKILL of a random peer (rank 0 included), restarted a few seconds later from
its last checkpoint (``lowband.save/load``); SIGSTOP of a peer for 1.5 to 3 x
``peer_timeout`` (a stall); a cut of a random link for 0.5 or 3 x ``peer_timeout``.

Every outer round is three collectives: DiLoCo's sync, a "who needs state" flag
(sum), and a state transfer (sum, one donor: the lowest participant that does not
need state). A peer that was dropped (PeerLost: stalled or cut off) or restarted
rejoins the group (it enters at the coordinator's next commit), finds its place in
the round from ``group.joined_at``, and takes the donor's global parameters. Peers
report each round's fingerprint (``lowband.kernels.checksum`` over the bytes of the
global parameters) and the global model's loss on a fixed evaluation batch.

Then a fault-free run of the same number of rounds. Printed: hangs (no round settled
within the hang limit), rounds whose reporting peers disagree on the fingerprint,
whether every live peer's fingerprint is equal after the final sync, and the loss
drop of both runs (fault run / fault-free, within 10% passes).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, cast

ROUND_COLLECTIVES = 3  # sync, flag, state
DIM, HIDDEN, BATCH = 8, 16, 32


# -- the peer ----------------------------------------------------------------------------------


def make_model() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))


def batch(seed: int, n: int = BATCH) -> tuple[Any, Any]:
    """A batch of the teacher task ``y = sin(x @ w)`` from ``seed`` (rank, round, step)."""
    import torch

    w = torch.randn(DIM, 1, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))
    return x, torch.sin(x @ w)


def eval_loss(model: Any) -> float:
    import torch

    x, y = batch(999_999, 512)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), y))


class _Solo:
    """World of one, to build DiLoCo on a rejoining peer without its start-up collectives
    (DiLoCo's constructor agrees with rank 0; a running group is past that point)."""

    rank, world_size = 0, 1

    def __init__(self) -> None:
        from lowband.transport import CommStats

        self.stats = CommStats()


def peer(conn: Connection, rank: int, world: int, coord: str, o: dict[str, Any]) -> None:
    """One peer: train, sync, heal, report; rejoin after being dropped; stop at ``o['stop']``."""
    import torch

    import lowband
    from lowband.errors import CollectiveTimeout, PeerLost, TransportError
    from lowband.kernels import checksum
    from lowband.optim import DiLoCo
    from lowband.wan import local_address

    torch.set_num_threads(1)
    pt, H = o["peer_timeout"], o["sync_every"]
    ckpt = os.path.join(o["dir"], f"rank{rank}.pt")
    stop_file = os.path.join(o["dir"], "stop")

    def connect(init_timeout: float) -> Any:
        return lowband.init_group(rank, world, store=coord, backend="zmq", peer_timeout=pt, on_failure="drop",
                                  group_name=o["name"], host=local_address(), streams=1, timeout=10 * pt,
                                  init_timeout=init_timeout)

    def build(group: Any) -> tuple[Any, Any, int]:
        model = make_model()
        opt = DiLoCo(torch.optim.AdamW(model.parameters(), lr=o["lr"]), group=group, sync_every=H,
                     outer_lr=1.0, outer_momentum=0.0, nesterov=False)
        start = 0
        if group is not None and not isinstance(group, _Solo):
            return model, opt, start
        if os.path.exists(ckpt):  # a restart: this peer's own last checkpoint (inner state, round)
            start = int(lowband.load(ckpt, model, opt)["round"])
        return model, opt, start

    def flat_global(opt: Any) -> Any:
        return torch.cat([g.reshape(-1) for g in opt.state_dict()["diloco"]["global"]])

    def load_global(opt: Any, vec: Any) -> None:
        sd = opt.state_dict()
        d = sd["diloco"]
        off, out = 0, []
        for g in d["global"]:
            out.append(vec[off : off + g.numel()].view_as(g).clone())
            off += g.numel()
        d["global"], d["local"] = out, [t.clone() for t in out]
        opt.load_state_dict(sd)

    def heal(group: Any, opt: Any, needy: bool, r: int, flag: bool = True) -> tuple[bool, int, tuple[int, ...]]:
        """The round's flag collective (unless already past) and state collective."""
        n = sum(g.numel() for g in opt.state_dict()["diloco"]["global"])
        parts: tuple[int, ...] = ()
        donor = -1
        if flag:
            flags = torch.zeros(world)
            flags[rank] = float(needy)
            w = group.all_reduce(flags, op="sum")
            got = w.wait(timeout=20 * pt)
            parts = tuple(w.participants)
            ok = [p for p in parts if got[p] == 0]
            donor = min(ok) if ok else -1
        state = torch.zeros(2 + n)
        if rank == donor:
            state[0], state[1] = 1.0, float(r)
            state[2:] = flat_global(opt)
        w = group.all_reduce(state, op="sum")
        res = w.wait(timeout=20 * pt)
        parts = parts or tuple(w.participants)
        if float(res[0]) != 1.0:
            return needy, r, parts  # the donor was lost mid-transfer: try again next round
        if needy:
            load_global(opt, res[2:].clone())
            return False, int(res[1]), parts
        if not torch.equal(flat_global(opt), res[2:]):
            conn.send(("mismatch", rank, r))
        return False, r, parts

    def join(restart: bool) -> tuple[Any, Any, Any, int, bool]:
        """Rejoin the running group (bounded tries: the joiner itself may be dropped again)."""
        for _ in range(5):
            model, opt, start = build(_Solo())
            group = connect(o["init_timeout"])
            opt.group = group
            if group.joined_at is None:  # the group had not started yet: nothing to heal
                return group, model, opt, start, False
            skip = group.joined_at[1] % ROUND_COLLECTIVES  # rounds start at multiples of 3 (see below)
            try:
                if skip == 0:  # the round's DiLoCo sync is next: take part with a zero pseudo-gradient
                    n = sum(g.numel() for g in opt.state_dict()["diloco"]["global"])
                    group.all_reduce(torch.zeros(n), op="mean", key="diloco.0").wait(timeout=20 * pt)
                needy, r, _ = heal(group, opt, True, start, flag=skip < 2)
            except (PeerLost, CollectiveTimeout, TransportError) as e:
                conn.send(("dropped", rank, start, f"{type(e).__name__} while rejoining: {e}"))
                group.close()
                continue
            conn.send(("joined", rank, r, restart, needy))
            return group, model, opt, (r + 1 if not needy else start), needy
        raise TransportError(f"rank {rank}: could not rejoin in 5 tries")

    if o.get("restart"):
        group, model, opt, r, needy = join(True)
    else:
        group = connect(o["init_timeout"])
        try:
            model, opt, r = build(group)
            needy = False
            # Every round starts at a collective number that is a multiple of 3, so that a
            # joiner knows from joined_at where in the round the group is (the count of
            # collectives issued so far; the group keeps it in _seq).
            while group._seq % ROUND_COLLECTIVES:
                group.all_reduce(torch.zeros(1), op="sum").wait(timeout=20 * pt)
        except (PeerLost, CollectiveTimeout, TransportError) as e:  # too slow at start-up: dropped
            conn.send(("dropped", rank, -1, f"{type(e).__name__}: {e}"))
            group.close()
            group, model, opt, r, needy = join(False)
    stop_at: int | None = None
    try:
        while stop_at is None or r <= stop_at:
            if stop_at is None and os.path.exists(stop_file):
                stop_at = int(Path(stop_file).read_text() or 0)
                continue
            try:
                for s in range(H):
                    if o.get("die_mid_sync") == r and s == H - 1:
                        import threading

                        from lowband.testing import kill_self

                        threading.Timer(0.05, kill_self).start()  # dies inside the sync below
                    x, y = batch((rank * 1_000_003 + r) * 64 + s)
                    opt.zero_grad()
                    torch.nn.functional.mse_loss(model(x), y).backward()
                    opt.step()
                needy, r, parts = heal(group, opt, needy, r)
            except (PeerLost, CollectiveTimeout, TransportError) as e:
                conn.send(("dropped", rank, r, f"{type(e).__name__}: {e}"))
                group.close()
                group, model, opt, r, needy = join(False)
                continue
            g = flat_global(opt)
            # after a sync (or a heal) the model holds the global parameters
            conn.send(("round", rank, r, checksum(g.numpy().tobytes()), eval_loss(model), parts, needy))
            if r % o["ckpt_every"] == 0 and not needy:
                lowband.save(ckpt, model, opt, round=r + 1)
            r += 1
    finally:
        group.close()
        conn.send(("done", rank, r))


# -- the orchestrator ----------------------------------------------------------------------


def run_coordinator(conn: Connection, hub: str) -> None:
    import logging

    from lowband.transport.coordinator import Coordinator

    logging.getLogger("lowband.transport.security").setLevel(logging.ERROR)  # loopback-only netns

    co = Coordinator(f"{hub}:0")
    conn.send(co.address)
    co.serve(stop_after=24 * 3600)


def run(
    *,
    world: int,
    seed: int = 0,
    minutes: float | None = None,
    rounds: int | None = None,
    faults: bool = True,
    schedule: dict[int, tuple[str, int]] | None = None,
    peer_timeout: float = 5.0,
    sync_every: int = 5,
    fault_every: float = 8.0,
    say: Any = print,
) -> dict[str, Any]:
    """Run one scenario; returns its figures. ``schedule`` ({round: (fault, rank)}) replaces
    the seeded random faults; ``rounds`` or ``minutes`` bounds the run."""
    import multiprocessing

    from lowband.wan import HUB, LinkEmulator, Topology

    rng = random.Random(seed)
    ctx = multiprocessing.get_context("spawn")
    pt = peer_timeout
    hang_s = 20 * pt + 90  # a rejoin pays process start-up and the join; nothing settles for longer: a hang
    f: dict[str, Any] = dict(kills=0, stalls=0, cuts=0, restarts=0, drops=0, rejoins=0, mismatches=0, hangs=0,
                             divergent=0, crashed=0)
    reports: dict[int, dict[int, tuple]] = {}
    with tempfile.TemporaryDirectory(prefix="lowband-soak-") as d, \
            LinkEmulator(Topology.uniform(world, rate="1gbit", rtt="2ms"), mode="netns") as net:
        rx, tx = ctx.Pipe(duplex=False)
        net.spawn(HUB, run_coordinator, args=(tx, net.hub_address))
        tx.close()
        if not rx.poll(180):
            raise RuntimeError("the coordinator did not start")
        coord = rx.recv()
        o: dict[str, Any] = dict(peer_timeout=pt, sync_every=sync_every, lr=0.02, dir=d, name=f"soak{seed}",
                                 ckpt_every=2, init_timeout=120.0)
        procs: dict[int, Any] = {}
        conns: dict[Connection, int] = {}
        done: set[int] = set()
        joined: set[int] = set(range(world))

        def start(r: int, **extra: Any) -> None:
            a, b = ctx.Pipe(duplex=False)
            procs[r] = net.spawn(r, peer, args=(b, r, world, coord, {**o, **extra}))
            b.close()
            conns[a] = r

        # scheduled "kill" faults die inside that round's sync (a real SIGKILL, by the peer itself)
        die = {v: rnd for rnd, (act, v) in (schedule or {}).items() if act == "kill"}
        for r in range(world):
            start(r, die_mid_sync=die.get(r))
        t0 = last = time.monotonic()
        max_round, stop_round = -1, None
        next_fault = float("inf")
        later: list[tuple[float, str, int, int]] = []  # (when, action, a, b)
        stopped: set[int] = set()
        fired: set[int] = set()

        def fault(act: str, victim: int, now: float) -> None:
            if act == "kill":  # scheduled kills happen inside the peer; random ones from here
                if schedule is None:
                    procs[victim].kill()
                f["kills"] += 1
                later.append((now + (pt if schedule else rng.uniform(1, 3)), "restart", victim, 0))
            elif act == "stall":
                f["stalls"] += 1
                stopped.add(victim)
                os.kill(procs[victim].pid, signal.SIGSTOP)
                later.append((now + rng.uniform(1.5, 3) * pt, "cont", victim, 0))
            elif act == "cut":
                others = [r for r in range(world) if r != victim]
                other = rng.choice(others)
                f["cuts"] += 1
                net.cut(victim, other)
                later.append((now + rng.choice([0.5, 3.0]) * pt, "restore", victim, other))
            say(f"{time.monotonic() - t0:7.1f} s round {max_round}: {act} rank {victim}")
        while conns:
            now = time.monotonic()
            for item in sorted(x for x in later if x[0] <= now):
                later.remove(item)
                _, act, a, b = item
                if act == "restore":
                    net.restore(a, b)
                elif act == "cont":
                    os.kill(procs[a].pid, signal.SIGCONT)
                    stopped.discard(a)
                elif act == "restart" and procs[a].is_alive():
                    later.append((now + 0.5, act, a, b))  # a scheduled kill has not happened yet
                elif act == "restart" and stop_round is None:
                    f["restarts"] += 1
                    joined.discard(a)
                    start(a, restart=True)
            alive = sorted(r for r, p in procs.items() if p.is_alive() and r not in stopped)
            if schedule is not None:
                for rnd, (act, victim) in sorted(schedule.items()):
                    if rnd <= max_round + (act == "kill") and rnd not in fired:
                        fired.add(rnd)
                        fault(act, victim, now)
            elif faults and now >= next_fault and stop_round is None and len(alive) > 2:
                next_fault = now + rng.expovariate(1 / fault_every)
                act = rng.choice(["kill", "stall", "cut"])
                fault(act, rng.choice(alive), now)
            # a run bounded by rounds also waits for its restarted peers to be back
            back = not any(x[1] == "restart" for x in later) and all(
                r in joined or not p.is_alive() for r, p in procs.items())
            if stop_round is None and ((minutes is not None and now - t0 > 60 * minutes)
                                       or (rounds is not None and max_round >= rounds - 3 and back)):
                stop_round = max_round + 2
                Path(d, "stop").write_text(str(stop_round))
                for item in list(later):
                    if item[1] != "restart":
                        later.remove(item)
                        (net.restore(item[2], item[3]) if item[1] == "restore"
                         else os.kill(procs[item[2]].pid, signal.SIGCONT))
                later = [x for x in later if x[1] != "restart"]
                stopped.clear()
            if stop_round is not None and joined <= done | {r for r, p in procs.items() if not p.is_alive()}:
                for left, r in list(conns.items()):  # what is left never joined: end it
                    procs[r].kill()
                    del conns[left]
                break
            for ready in wait(list(conns), timeout=0.2):
                c = cast(Connection, ready)
                r = conns[c]
                try:
                    msg = c.recv()
                except (EOFError, OSError):
                    del conns[c]
                    procs[r].join(5)
                    if r not in done and procs[r].exitcode != -signal.SIGKILL:
                        f["crashed"] += 1
                        say(f"rank {r} ended with exit code {procs[r].exitcode}")
                    continue
                kind = msg[0]
                if kind == "round" and not msg[6]:
                    reports.setdefault(msg[2], {})[msg[1]] = (msg[3], msg[4], msg[5])
                    if msg[2] > max_round:
                        max_round, last = msg[2], time.monotonic()
                        if max_round == 0 and faults and schedule is None:
                            next_fault = last + rng.expovariate(1 / fault_every)
                elif kind == "dropped":
                    f["drops"] += 1
                    joined.discard(msg[1])
                    say(f"{time.monotonic() - t0:7.1f} s: rank {msg[1]} dropped ({msg[3]}), rejoins")
                elif kind == "joined":
                    f["rejoins"] += 1
                    joined.add(msg[1])
                    say(f"{time.monotonic() - t0:7.1f} s: rank {msg[1]} rejoined at round {msg[2]}"
                        f"{' from its checkpoint' if msg[3] else ''}{', state pending' if msg[4] else ''}")
                elif kind == "mismatch":
                    f["mismatches"] += 1
                elif kind == "done":
                    done.add(msg[1])
            if time.monotonic() - last > hang_s:
                f["hangs"] += 1
                say(f"HANG: no round settled for {time.monotonic() - last:.0f} s (last round {max_round})")
                break

        for p in procs.values():
            if p.is_alive():
                p.kill()
            p.join(10)
    for rnd, rows in reports.items():
        if len({fp for fp, _, _ in rows.values()}) > 1:
            f["divergent"] += 1
            say(f"DIVERGENT round {rnd}: {rows}")
    last_rows = reports.get(stop_round if stop_round is not None else max_round, {})
    say(f"final round {stop_round}: fingerprints by rank {{{', '.join(f'{r}: {v[0]:#x}' for r, v in sorted(last_rows.items()))}}}; "
        f"peers that finished: {sorted(done)}")
    f["final_live"] = sorted(last_rows)
    f["final_equal"] = bool(last_rows) and len({fp for fp, _, _ in last_rows.values()}) == 1
    f["rounds"] = max_round + 1
    f["losses"] = [reports[r][min(reports[r])][1] if r in reports else None for r in range(max_round + 1)]
    f["initial_loss"] = eval_loss(make_model())
    f["seconds"] = time.monotonic() - t0
    return f


def _drop(fig: dict[str, Any]) -> float:
    return fig["initial_loss"] - [x for x in fig["losses"] if x is not None][-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the fault run")
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fault-every", type=float, default=8.0, help="mean seconds between faults")
    ap.add_argument("--peer-timeout", type=float, default=5.0)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root for the netns link emulator")
        return 2
    print(f"soak: {args.world} peers, {args.minutes} min of seeded faults (seed {args.seed}, one every "
          f"{args.fault_every} s on average), peer_timeout {args.peer_timeout} s; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    fault = run(world=args.world, seed=args.seed, minutes=args.minutes, fault_every=args.fault_every,
                peer_timeout=args.peer_timeout, say=lambda m: print(m, flush=True))
    print(f"fault run: {fault['rounds']} rounds in {fault['seconds']:.0f} s; then a fault-free run of as many", flush=True)
    clean = run(world=args.world, seed=args.seed, rounds=fault["rounds"], faults=False,
                peer_timeout=args.peer_timeout, say=lambda m: print(m, flush=True))
    d_fault, d_clean = _drop(fault), _drop(clean)
    ratio = d_fault / d_clean if d_clean else float("nan")
    ok = (fault["hangs"] == 0 and fault["final_equal"] and fault["divergent"] == 0 and abs(1 - ratio) <= 0.10)
    print(f"faults: {fault['kills']} kills (+{fault['restarts']} restarts from checkpoint), {fault['stalls']} stalls, "
          f"{fault['cuts']} link cuts; {fault['drops']} peers dropped, {fault['rejoins']} rejoins, "
          f"{fault['crashed']} unexpected exits")
    print(f"hangs: {fault['hangs']}")
    print(f"rounds with disagreeing fingerprints: {fault['divergent']}; heal mismatches: {fault['mismatches']}")
    print(f"final sync: live peers {fault['final_live']}, global parameters equal by fingerprint: {fault['final_equal']}")
    print(f"loss drop: fault run {fault['initial_loss']:.4f} -> {fault['initial_loss'] - d_fault:.4f} "
          f"(drop {d_fault:.4f}); fault-free {clean['initial_loss']:.4f} -> {clean['initial_loss'] - d_clean:.4f} "
          f"(drop {d_clean:.4f}); ratio {ratio:.3f} ({'within' if abs(1 - ratio) <= 0.10 else 'NOT within'} 10%)")
    print(f"fault-free run: hangs {clean['hangs']}, divergent rounds {clean['divergent']}, "
          f"{clean['rounds']} rounds in {clean['seconds']:.0f} s")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
