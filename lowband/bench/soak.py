"""Soak: DiLoCo training over the ZeroMQ group under seeded faults (issues 9 and 16).

    python benchmarks/soak.py --minutes 10 --world 8      # the issue's figure (about 20 min)
    python benchmarks/soak.py --minutes 1 --world 4        # a short run (about 4 min)

Wall time: the peers' start-up (under a minute), ``--minutes`` of faults counted from the
first round, the stop, then the fault-free run of as many rounds (no faults: no longer). It
is bounded: the fault run ends at ``--minutes`` + 10 min of wall time, the fault-free run at
the fault run's length + 5 min, and a round that takes longer than ``20 x peer_timeout + 90``
s ends either run as a hang. The last lines are one ``[PASS]`` or ``[FAIL]`` per criterion of
issue 16's "Done when", then ``PASS`` or ``FAIL`` (exit status 0 or 1).

(``benchmarks/soak.py`` runs :func:`main`; ``tests/reliability/test_faults.py`` runs
:func:`run` with a fixed schedule.)

``world`` peers (processes on the link emulator's netns hosts, 1 Gbit/s, 2 ms round
trip; the coordinator at the hub) train a small MLP on a teacher task with
``DiLoCo(sync_every=H, outer_lr=1)`` over ``init_group(backend="zmq",
on_failure="drop")``. Each inner step sleeps ``--step-ms`` (default 300 ms) for the compute
a real model would spend there, so an outer step takes about 2 s (a real DiLoCo outer step
takes minutes; the bare MLP's, 0.1 to 0.2 s, is shorter than a process's join, which is what
the rejoin criterion then measures; ``--step-ms 0`` runs it so). Faults, drawn from ``--seed`` every ``--fault-every`` seconds on
average: SIGKILL of a random peer (rank 0 included), restarted a few seconds later by
this launcher running the same peer code (no flag: the group tells it that it joined a
running one); SIGSTOP of a peer for 1.5 to 3 x ``peer_timeout`` (a stall); a cut of a
random link for 0.5 or 3 x ``peer_timeout``; and ``--coordinator-kills`` SIGKILLs of the
coordinator, spread over the run, each restarted at the same address after 1 to 3 s
(the members re-register with it).

Every outer round is one DiLoCo sync. A restarted peer, or one dropped (stalled, cut
off) that joins again in its own process, is let in by the members after a sync and
takes the live state at its first step (DiLoCo's join path, ``lowband.transport._join``):
no collective of the soak's own, no retries. Peers report each round's fingerprint
(``lowband.kernels.checksum`` over the bytes of the global parameters) and the global
model's loss on a fixed evaluation batch.

Then a fault-free run of the same number of rounds. Printed: the distribution of rejoin
times (outer steps from a restart to the first sync that includes the peer), hangs (no
round settled within the hang limit), rounds whose reporting peers disagree on the
fingerprint (a healed peer reports from its first sync on), whether every live peer's
fingerprint is equal after the final sync, and the loss drop of both runs (within 5%
passes), with how much the fault-free loss still fell over its last quarter (the task
has not converged if it still falls).
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import signal
import sys
import tempfile
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, cast

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


def peer(conn: Connection, rank: int, world: int, coord: str, o: dict[str, Any]) -> None:
    """One peer, the same code for a first start and a restart: train, report each sync;
    when dropped (stalled, cut off), join again in the same process. A rank that enters a
    running group is let in after a sync and takes the live state at its first step
    (DiLoCo's join path); its inner optimizer comes from its own last checkpoint."""
    import torch

    import lowband
    from lowband.errors import CollectiveTimeout, PeerLost, TransportError
    from lowband.kernels import checksum
    from lowband.optim import DiLoCo
    from lowband.wan import local_address

    # what init_group imports on first use, imported before the process says it is joining:
    # the rejoin time measures the protocol, not module loading on a loaded machine
    importlib.import_module("lowband.transport._zmq")
    importlib.import_module("lowband.transport._init")

    torch.set_num_threads(1)
    pt, H = o["peer_timeout"], o["sync_every"]
    ckpt = os.path.join(o["dir"], f"rank{rank}.pt")
    stop_file = os.path.join(o["dir"], "stop")

    def start() -> tuple[Any, Any, Any]:
        conn.send(("joining", rank, time.time()))
        group = lowband.init_group(rank, world, store=coord, backend="zmq", peer_timeout=pt, on_failure="drop",
                                   group_name=o["name"], host=local_address(), streams=1, timeout=10 * pt,
                                   init_timeout=o["init_timeout"])
        model = make_model()
        opt = DiLoCo(torch.optim.AdamW(model.parameters(), lr=o["lr"]), group=group, sync_every=H,
                     outer_lr=1.0, outer_momentum=0.0, nesterov=False)
        if group.joined_at is not None:
            conn.send(("admitted", rank))
            if os.path.exists(ckpt):  # this peer's inner state; the first step takes the live rest
                lowband.load(ckpt, model, opt)
        return group, model, opt

    def flat_global(opt: Any) -> Any:
        return torch.cat([g.reshape(-1) for g in opt._global])

    group = model = opt = None
    stop_at: int | None = None
    try:
        while True:
            if group is None:
                try:
                    group, model, opt = start()
                except (PeerLost, CollectiveTimeout, TransportError) as e:
                    conn.send(("dropped", rank, -1, f"{type(e).__name__} at start: {e}"))
                    group = None
                    continue
            if stop_at is None and os.path.exists(stop_file):
                stop_at = int(Path(stop_file).read_text() or 0)
            r = opt.step_count // H  # the round this step belongs to
            if stop_at is not None and r > stop_at:
                break
            try:
                s = opt.step_count % H
                if o.get("die_mid_sync") == r and s == H - 1 and not o.get("restart"):
                    import threading

                    from lowband.testing import kill_self

                    threading.Timer(0.05, kill_self).start()  # dies inside the sync below
                x, y = batch((rank * 1_000_003 + r) * 64 + s)
                healing = opt._joining
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                if o["step_s"]:
                    time.sleep(o["step_s"])  # the rest of an inner step's compute (a real model's)
                opt.step()
                if healing:
                    conn.send(("joined", rank, opt.step_count, bool(o.get("restart")), time.time()))
            except (PeerLost, CollectiveTimeout, TransportError) as e:
                conn.send(("dropped", rank, r, f"{type(e).__name__}: {e}"))
                group.close()
                group = None
                continue
            if opt.step_count % H == 0:  # just synced: the model holds the global parameters
                done = opt.step_count // H - 1
                g = flat_global(opt)
                conn.send(("round", rank, done, checksum(g.numpy().tobytes()), eval_loss(model),
                           tuple(group.participants), False))
                if done % o["ckpt_every"] == 0:
                    lowband.save(ckpt, model, opt)
    finally:
        if group is not None:
            group.close()
        conn.send(("done", rank, -1))


# -- the orchestrator ----------------------------------------------------------------------


def run_coordinator(conn: Connection, hub: str, port: int = 0) -> None:
    import logging

    from lowband.transport.coordinator import Coordinator

    logging.getLogger("lowband.transport.security").setLevel(logging.ERROR)  # loopback-only netns

    co = Coordinator(f"{hub}:{port}")
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
    step_seconds: float = 0.0,
    fault_every: float = 8.0,
    coordinator_kills: int = 0,
    max_seconds: float | None = None,
    say: Any = print,
) -> dict[str, Any]:
    """Run one scenario; returns its figures. ``schedule`` ({round: (fault, rank)}) replaces
    the seeded random faults; ``rounds`` or ``minutes`` (counted from the first round) bounds
    the run, and ``max_seconds`` its wall time from the start of the peers. ``step_seconds``
    is each inner step's emulated compute (a sleep: no CPU), 0 for the bare MLP's step."""
    import multiprocessing

    from lowband.wan import HUB, LinkEmulator, Topology

    rng = random.Random(seed)
    ctx = multiprocessing.get_context("spawn")
    pt = peer_timeout
    hang_s = 20 * pt + 90  # a rejoin pays process start-up and the join; nothing settles for longer: a hang
    f: dict[str, Any] = dict(kills=0, stalls=0, cuts=0, restarts=0, drops=0, rejoins=0, mismatches=0, hangs=0,
                             divergent=0, crashed=0, coordinator_restarts=0, rejoin_detail=[])
    reports: dict[int, dict[int, tuple]] = {}
    with tempfile.TemporaryDirectory(prefix="lowband-soak-") as d, \
            LinkEmulator(Topology.uniform(world, rate="1gbit", rtt="2ms"), mode="netns") as net:
        rx, tx = ctx.Pipe(duplex=False)
        coproc = [net.spawn(HUB, run_coordinator, args=(tx, net.hub_address))]
        tx.close()
        if not rx.poll(180):
            raise RuntimeError("the coordinator did not start")
        coord = rx.recv()
        coport = int(coord.rpartition(":")[2])
        asked_at: dict[int, int] = {}  # rank -> the last settled round when it asked to join
        o: dict[str, Any] = dict(peer_timeout=pt, sync_every=sync_every, lr=0.002, dir=d, name=f"soak{seed}",
                                 ckpt_every=2, init_timeout=120.0, step_s=step_seconds)
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
        t_first: float | None = None  # when round 0 settled: the run's minutes count from there
        max_round, stop_round = -1, None
        next_fault = float("inf")
        later: list[tuple[float, str, int, int]] = []  # (when, action, a, b)
        joining_at: dict[int, float] = {}  # rank -> when its process asked to join
        healed_at: dict[int, int] = {}  # rank -> the round from which it reports (just healed)
        stopped: set[int] = set()
        fired: set[int] = set()

        def lost_before_first_sync(r: int) -> None:
            ev = healed_at.pop(r, None)  # healed, then killed or dropped before its first sync
            if ev is not None:
                f["rejoin_detail"][ev]["lost_first"] = True

        def fault(act: str, victim: int, now: float) -> None:
            if act == "kill":
                lost_before_first_sync(victim)  # scheduled kills happen inside the peer; random ones from here
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
                if act == "kill-coordinator":
                    coproc[0].kill()
                    coproc[0].join(10)
                    say(f"{now - t0:7.1f} s round {max_round}: kill the coordinator")
                    later.append((now + rng.uniform(1, 3), "start-coordinator", 0, 0))
                elif act == "start-coordinator":
                    crx, ctx_ = ctx.Pipe(duplex=False)
                    coproc[0] = net.spawn(HUB, run_coordinator, args=(ctx_, net.hub_address, coport))
                    ctx_.close()
                    if not crx.poll(180):
                        raise RuntimeError("the coordinator did not restart")
                    crx.recv()
                    f["coordinator_restarts"] += 1
                    say(f"{time.monotonic() - t0:7.1f} s round {max_round}: coordinator restarted")
                elif act == "restore":
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
            long = (t_first is not None and minutes is not None and now - t_first > 60 * minutes) or (
                max_seconds is not None and now - t0 > max_seconds)
            if stop_round is None and (long or (rounds is not None and max_round >= rounds - 3 and back)):
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
                if kind == "joining":
                    if max_round >= 0:  # a first start is not a rejoin
                        asked_at[msg[1]] = max_round
                        joining_at[msg[1]] = msg[2]  # the peer's clock: the launcher may read late
                elif kind == "round" and not msg[6]:
                    reports.setdefault(msg[2], {})[msg[1]] = (msg[3], msg[4], msg[5])
                    ev = healed_at.pop(msg[1], None)
                    if ev is not None:  # its first sync after the heal: the fingerprint to check
                        f["rejoin_detail"][ev]["first_round"] = msg[2]
                    if msg[2] > max_round:
                        max_round, last = msg[2], time.monotonic()
                        if max_round == 0:
                            t_first = last
                            if faults and schedule is None:
                                next_fault = last + rng.expovariate(1 / fault_every)
                            if minutes is not None and coordinator_kills:  # evenly spread over the run
                                for i in range(coordinator_kills):
                                    later.append((last + 60 * minutes * (i + 1) / (coordinator_kills + 1),
                                                  "kill-coordinator", 0, 0))
                elif kind == "dropped":
                    f["drops"] += 1
                    joined.discard(msg[1])
                    lost_before_first_sync(msg[1])
                    say(f"{time.monotonic() - t0:7.1f} s: rank {msg[1]} dropped ({msg[3]}), rejoins")
                elif kind == "joined":
                    f["rejoins"] += 1
                    joined.add(msg[1])
                    at = (msg[2] - 1) // sync_every  # the first round whose sync includes it
                    if msg[1] in asked_at:  # outer steps from asking to join to that sync
                        lag = at - asked_at.pop(msg[1])
                        healed_at[msg[1]] = len(f["rejoin_detail"])
                        f["rejoin_detail"].append(dict(
                            rank=msg[1], restart=bool(msg[3]), lag=lag, round=at, first_round=None, lost_first=False,
                            seconds=msg[4] - joining_at.pop(msg[1], msg[4])))
                    say(f"{time.monotonic() - t0:7.1f} s: rank {msg[1]} rejoined, healed at step {msg[2]} "
                        f"(round {at}){' after a restart' if msg[3] else ''}")
                elif kind == "mismatch":
                    f["mismatches"] += 1
                elif kind == "done":
                    done.add(msg[1])
            if time.monotonic() - last > hang_s:
                f["hangs"] += 1
                say(f"HANG: no round settled for {time.monotonic() - last:.0f} s (last round {max_round})")
                break

        for p in [*procs.values(), *coproc]:
            if p.is_alive():
                p.kill()
            p.join(10)
    for rnd, rows in reports.items():
        if len({fp for fp, _, _ in rows.values()}) > 1:
            f["divergent"] += 1
            say(f"DIVERGENT round {rnd}: {rows}")
    for ev in f["rejoin_detail"]:  # the healed peer's first sync: the survivors' fingerprint?
        rows = reports.get(ev["first_round"], {}) if ev["first_round"] is not None else {}
        mine = rows.get(ev["rank"])
        others = {fp for r, (fp, _, _) in rows.items() if r != ev["rank"]}
        ev["fingerprint_equal"] = mine is not None and others == {mine[0]}
    last_rows = reports.get(stop_round if stop_round is not None else max_round, {})
    say(f"final round {stop_round}: fingerprints by rank {{{', '.join(f'{r}: {v[0]:#x}' for r, v in sorted(last_rows.items()))}}}; "
        f"peers that finished: {sorted(done)}")
    f["final_live"] = sorted(last_rows)
    f["final_equal"] = bool(last_rows) and len({fp for fp, _, _ in last_rows.values()}) == 1
    f["rounds"] = max_round + 1
    f["losses"] = [reports[r][min(reports[r])][1] if r in reports else None for r in range(max_round + 1)]
    f["initial_loss"] = eval_loss(make_model())
    f["seconds"] = time.monotonic() - t0
    f["train_seconds"] = 0.0 if t_first is None else time.monotonic() - t_first
    return f


def _loss_at(fig: dict[str, Any], rnd: int) -> float:
    """The global model's loss after round ``rnd`` (the last reported one at or before it)."""
    known = [x for x in fig["losses"][: rnd + 1] if x is not None]
    return known[-1] if known else fig["initial_loss"]


def summary(fault: dict[str, Any], clean: dict[str, Any], *, coordinator_kills: int,
            say: Any = print) -> bool:
    """Print every figure of issue 16's "Done when", each criterion PASS or FAIL; True if all pass."""
    from collections import Counter

    results: list[tuple[str, bool]] = []

    def check(name: str, ok: bool, text: str) -> None:
        results.append((name, ok))
        say(f"[{'PASS' if ok else 'FAIL'}] {name}: {text}")

    say(f"faults: {fault['kills']} kills (+{fault['restarts']} restarts by the launcher), {fault['stalls']} stalls, "
        f"{fault['cuts']} link cuts; {fault['drops']} peers dropped, {fault['rejoins']} rejoins, "
        f"{fault['crashed']} unexpected exits; {fault['rounds']} rounds in {fault['train_seconds']:.0f} s of "
        f"training ({fault['seconds']:.0f} s with start-up; {fault['train_seconds'] / max(1, fault['rounds']):.2f} s "
        f"per outer step)")
    check("coordinator restarts", fault["coordinator_restarts"] >= min(2, coordinator_kills),
          f"killed and restarted {fault['coordinator_restarts']} times (asked for {coordinator_kills})")
    detail = fault["rejoin_detail"]
    restarts = [e for e in detail if e["restart"]]
    lag = [e["lag"] for e in detail]
    within = sum(1 for e in restarts if e["lag"] <= 2)

    def seconds(events: list[dict[str, Any]]) -> str:
        secs = sorted(e["seconds"] for e in events)
        return (f"median {secs[len(secs) // 2]:.2f}, max {secs[-1]:.2f}" if secs else "none")

    check("restarted peer back within two outer steps",
          within == len(restarts) and bool(restarts) == bool(fault["restarts"]),
          f"outer steps from a restarted process's join request (its interpreter started, torch and "
          f"lowband imported) to the first sync that includes it: "
          f"{dict(sorted(Counter(e['lag'] for e in restarts).items()))} over {len(restarts)} restarted "
          f"processes, within two: {within}; seconds: {seconds(restarts)}. All rejoins, dropped peers "
          f"(stalled, cut off) asking again included: {dict(sorted(Counter(lag).items()))} over {len(lag)}; "
          f"seconds: {seconds(detail)}")
    lost = [e for e in detail if e["lost_first"]]  # no first sync to compare
    fp_ok = [e for e in detail if e.get("fingerprint_equal")]
    check("healed fingerprint", len(fp_ok) == len(detail) - len(lost),
          f"{len(fp_ok)} of {len(detail) - len(lost)} rejoined peers that reached a sync reported, at their "
          f"first sync, the survivors' fingerprint of the global parameters ({len(lost)} more were killed or "
          "dropped by a fault after the heal, before their first sync)"
          + "".join(f"; rank {e['rank']} at round {e['first_round']} differs" for e in detail
                    if not e.get("fingerprint_equal") and not e["lost_first"]))
    check("hangs", fault["hangs"] == 0 and clean["hangs"] == 0,
          f"{fault['hangs']} in the fault run, {clean['hangs']} in the fault-free run")
    check("divergent rounds", fault["divergent"] == 0 and fault["final_equal"],
          f"{fault['divergent']} rounds whose peers disagree on the fingerprint; final sync: live peers "
          f"{fault['final_live']}, equal: {fault['final_equal']}; heal mismatches {fault['mismatches']}")
    n = min(fault["rounds"], clean["rounds"]) - 1  # compared at the same round
    d_fault = fault["initial_loss"] - _loss_at(fault, n)
    d_clean = clean["initial_loss"] - _loss_at(clean, n)
    ratio = d_fault / d_clean if d_clean else float("nan")
    check("loss drop within 5%", abs(1 - ratio) <= 0.05,
          f"after round {n}: fault run {fault['initial_loss']:.4f} -> {fault['initial_loss'] - d_fault:.4f} "
          f"(drop {d_fault:.4f}), fault-free {clean['initial_loss']:.4f} -> {clean['initial_loss'] - d_clean:.4f} "
          f"(drop {d_clean:.4f}); ratio {ratio:.3f}")
    # not converged: the fault-free loss still falls over the last quarter of the compared rounds
    q = _loss_at(clean, (3 * n) // 4)
    end = _loss_at(clean, n)
    falling = (q - end) / q if q else float("nan")
    check("task not converged", falling >= 0.05,
          f"the fault-free loss still fell {100 * falling:.1f}% over the last quarter of those rounds "
          f"(round {(3 * n) // 4}: {q:.4f} -> round {n}: {end:.4f}; 5% or more passes)")
    say(f"fault-free run: {clean['rounds']} rounds in {clean['seconds']:.0f} s, divergent rounds {clean['divergent']}")
    ok = all(r for _, r in results)
    say("PASS" if ok else "FAIL: " + ", ".join(name for name, r in results if not r))
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the fault run, from its first round")
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fault-every", type=float, default=8.0, help="mean seconds between faults")
    ap.add_argument("--peer-timeout", type=float, default=5.0)
    ap.add_argument("--step-ms", type=float, default=300.0,
                    help="emulated compute per inner step (a sleep), so an outer step is H x this plus the "
                         "sync; 0 runs the bare MLP (outer steps of 0.1 to 0.2 s here)")
    ap.add_argument("--coordinator-kills", type=int, default=2, help="coordinator kills (each restarted)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root for the netns link emulator")
        return 2
    print(f"soak: {args.world} peers, {args.minutes} min of seeded faults (seed {args.seed}, one every "
          f"{args.fault_every} s on average), peer_timeout {args.peer_timeout} s, {args.step_ms:g} ms of emulated compute per "
          f"inner step (sync_every 5); load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    say = lambda m: print(m, flush=True)  # noqa: E731
    # wall time: start-up, the minutes, the stop; the fault-free run at most as long again
    fault = run(world=args.world, seed=args.seed, minutes=args.minutes, fault_every=args.fault_every,
                peer_timeout=args.peer_timeout, coordinator_kills=args.coordinator_kills,
                step_seconds=args.step_ms / 1000,
                max_seconds=60 * args.minutes + 600, say=say)
    print(f"fault run: {fault['rounds']} rounds in {fault['seconds']:.0f} s; then a fault-free run of as many "
          f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    clean = run(world=args.world, seed=args.seed, rounds=fault["rounds"], faults=False,
                peer_timeout=args.peer_timeout, step_seconds=args.step_ms / 1000,
                max_seconds=fault["seconds"] + 300, say=say)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0 if summary(fault, clean, coordinator_kills=args.coordinator_kills, say=say) else 1


if __name__ == "__main__":
    sys.exit(main())
