"""How long each set-up failure takes to reach every rank as its named error (issue 13).

Real processes (one per rank), a real coordinator, real sockets. Each case is run once; each
rank reports the error class it got and the seconds from the start of the step that fails to
that error, beside the bound the docs state for it (docs/troubleshooting.md):

| case | what happens | error | clock starts | bound |
| --- | --- | --- | --- | --- |
| wrong-port | the store address has no listener | CollectiveTimeout ("nothing answered") | init_group | init_timeout |
| missing-rank | rank 2 of 3 never starts | CollectiveTimeout ("ranks [2] of 3") | init_group | init_timeout |
| unknown-key | rank 1's CURVE key is not on the allow-list | SecurityError on rank 1; CollectiveTimeout (rank 1 missing) on rank 0 | init_group | a few seconds / init_timeout |
| config-mismatch | DiLoCo sync_every 10 on rank 0, 20 on rank 1 | ConfigMismatch on both | DiLoCo() | a few seconds |
| killed-peer | rank 1 SIGKILLs itself between collectives (on_failure="raise") | PeerLost on rank 0 | the kill | a few seconds |
| killed-peer-drop | the same with on_failure="drop": rank 0 carries on without rank 1 | none: the all-reduce completes without it | the kill | peer_timeout |

"held": seconds <= bound + GRACE (process and interpreter jitter on a loaded machine).

    python benchmarks/first_contact.py                 # all cases, about 1 minute
    python benchmarks/first_contact.py --case killed-peer --init-timeout 5 --peer-timeout 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GRACE = 2.0  # seconds of slack on every bound
FEW = 5.0  # "a few seconds": the bound for errors that have no timeout behind them
CASES = ("wrong-port", "missing-rank", "unknown-key", "config-mismatch", "killed-peer", "killed-peer-drop")


# --- one rank, in its own process --------------------------------------------------------


def _report(**fields: object) -> None:
    print("RESULT " + json.dumps(fields), flush=True)


def worker(case: str, rank: int, world: int, store: str, opts: dict) -> None:
    import torch

    import lowband

    kw: dict = {"init_timeout": opts["init_timeout"], "peer_timeout": opts["peer_timeout"]}
    if case == "unknown-key":
        from lowband.transport.security import Curve

        keys = Path(opts["keys"])
        folder = "ok" if rank == 0 else "stranger"
        kw["security"] = Curve.from_files(keys / folder / f"rank{rank}.key_secret", allowed=[keys / "ok"],
                                          coordinator=keys / "ok" / "coordinator.key")
    if case == "killed-peer-drop":
        kw["on_failure"] = "drop"
    t0 = time.time()
    try:
        group = lowband.init_group(rank, world, store=store, **kw)
    except Exception as e:
        _report(rank=rank, error=type(e).__name__, seconds=time.time() - t0, message=str(e))
        return
    try:
        if case == "config-mismatch":
            torch.manual_seed(0)
            model = torch.nn.Linear(8, 8)
            inner = torch.optim.AdamW(model.parameters())  # torch's first optimizer imports dynamo: seconds
            t0 = time.time()
            try:
                lowband.DiLoCo(inner, group=group,
                               sync_every=10 if rank == 0 else 20)
                _report(rank=rank, error=None, seconds=time.time() - t0, message="no error")
            except Exception as e:
                _report(rank=rank, error=type(e).__name__, seconds=time.time() - t0, message=str(e))
            return
        if case.startswith("killed-peer"):
            x = torch.ones(1024)
            for _ in range(3):
                group.all_reduce(x).wait()
            if rank == 1:
                print(f"KILL {time.time()!r}", flush=True)
                os.kill(os.getpid(), 9)
            time.sleep(0.2)  # the kill lands between collectives
            try:
                out = group.all_reduce(x).wait()
                _report(rank=rank, error=None, seconds=None, done=time.time(), message=f"completed: {out[0].item():g}")
            except Exception as e:
                _report(rank=rank, error=type(e).__name__, seconds=None, done=time.time(), message=str(e))
            return
        _report(rank=rank, error=None, seconds=time.time() - t0, message="the group assembled")
    finally:
        group.close()


# --- the driver ------------------------------------------------------------------------


def _spawn(case: str, rank: int, world: int, store: str, opts: dict) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, __file__, "--worker", case, str(rank), str(world), store, json.dumps(opts)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )


def _collect(procs: dict[int, subprocess.Popen], timeout: float) -> dict[int, str]:
    outs: dict[int, str] = {}
    try:
        deadline = time.monotonic() + timeout
        for r, p in procs.items():
            outs[r] = p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
    return outs


def _result(out: str) -> dict | None:
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_case(case: str, opts: dict, tmp: Path) -> list[dict]:
    from lowband.transport import start_coordinator

    it, pt = opts["init_timeout"], opts["peer_timeout"]
    limit = it + pt + 120
    expect: dict[int, tuple[str | None, float]]
    if case == "wrong-port":
        store, co = f"127.0.0.1:{_free_port()}", None
        ranks, world = [0, 1], 2
        expect = {0: ("CollectiveTimeout", it), 1: ("CollectiveTimeout", it)}
    else:
        args: list[str] = []
        if case == "unknown-key":
            from lowband.transport.security import generate_keys

            keys = tmp / "keys"
            generate_keys(keys / "ok", "coordinator")
            generate_keys(keys / "ok", "rank0")
            generate_keys(keys / "stranger", "rank1")
            opts = {**opts, "keys": str(keys)}
            args = ["--curve-secret", str(keys / "ok" / "coordinator.key_secret"), "--allow", str(keys / "ok")]
        co = start_coordinator(args=args)
        store = co.address
        if case == "missing-rank":
            ranks, world = [0, 1], 3
            expect = {0: ("CollectiveTimeout", it), 1: ("CollectiveTimeout", it)}
        elif case == "unknown-key":
            ranks, world = [0, 1], 2
            expect = {0: ("CollectiveTimeout", it), 1: ("SecurityError", FEW)}
        elif case == "config-mismatch":
            ranks, world = [0, 1], 2
            expect = {0: ("ConfigMismatch", FEW), 1: ("ConfigMismatch", FEW)}
        elif case == "killed-peer":
            ranks, world = [0, 1], 2
            expect = {0: ("PeerLost", FEW)}
        else:
            ranks, world = [0, 1], 2
            expect = {0: (None, pt)}
    try:
        outs = _collect({r: _spawn(case, r, world, store, opts) for r in ranks}, limit)
    finally:
        if co is not None:
            co.stop()
    rows = []
    kill_at = None
    for line in outs.get(1, "").splitlines():
        if line.startswith("KILL "):
            kill_at = float(line[5:])
    for r, (want, bound) in expect.items():
        res = _result(outs.get(r, ""))
        if res is None:
            rows.append({"case": case, "rank": r, "error": "(no result)", "seconds": None, "bound": bound,
                         "held": False, "message": outs.get(r, "")[-500:]})
            continue
        secs = res["seconds"]
        if secs is None and kill_at is not None:
            secs = res["done"] - kill_at
        held = secs is not None and res["error"] == want and secs <= bound + GRACE
        rows.append({"case": case, "rank": r, "error": res["error"] or "none (completed)", "seconds": secs,
                     "bound": bound, "want": want or "none", "held": held, "message": res["message"]})
    return rows


def _bound_name(case: str, rank: int, bound: float, opts: dict) -> str:
    if bound == opts["init_timeout"] and case in ("wrong-port", "missing-rank", "unknown-key"):
        return f"init_timeout={bound:g}s"
    if case == "killed-peer-drop":
        return f"peer_timeout={bound:g}s"
    return f"a few s ({bound:g}s)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", choices=CASES, help="run only these (repeatable)")
    ap.add_argument("--init-timeout", type=float, default=8.0)
    ap.add_argument("--peer-timeout", type=float, default=15.0)
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        case, rank, world, store, opts = a.worker
        worker(case, int(rank), int(world), store, json.loads(opts))
        return 0
    opts = {"init_timeout": a.init_timeout, "peer_timeout": a.peer_timeout}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lowband-first-contact-") as tmp:
        for case in a.case or CASES:
            rows += run_case(case, opts, Path(tmp) / case)
    print(f"{'case':18} {'rank':>4}  {'error':18} {'seconds':>8}  {'bound':22} held")
    for row in rows:
        secs = "-" if row["seconds"] is None else f"{row['seconds']:.2f}"
        print(f"{row['case']:18} {row['rank']:>4}  {row['error']:18} {secs:>8}  "
              f"{_bound_name(row['case'], row['rank'], row['bound'], opts):22} {'yes' if row['held'] else 'NO'}")
    for row in rows:
        if not row["held"]:
            print(f"\n{row['case']} rank {row['rank']}: wanted {row.get('want')}, got: {row['message']}")
    print(f"\nheld: seconds <= bound + {GRACE:g}s; seconds from the start of the failing step "
          "(init_group; DiLoCo() for config-mismatch; rank 1's SIGKILL for killed-peer*)")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["held"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
