"""Attacks on the coordinator (issue 15 items 1, 8, 10, 11), against a real coordinator process
on loopback.

``ATTACKS`` is a list of zero-argument functions; each returns
``{"attack": str, "bound": str, "measured": str, "held": bool}`` and ends every process it
started. ``benchmarks/attack.py`` runs them. After each attack legitimate peers form a group
through the same coordinator and complete a commit (and, where carriers are used, a message).
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from lowband.errors import ConfigMismatch, RankInUse, SecurityError
from lowband.testing import flood_requests, rss_bytes, zmq_carriers
from lowband.transport._coord_client import CoordinatorClient
from lowband.transport._zmq import ZmqCarrier
from lowband.transport.coordinator import MAX_GROUPS, start_coordinator
from lowband.transport.security import Curve, generate_keys

_MB = 1 << 20


def _join(rank: int, inc: int, group: str, world: int = 2, pubkey: str | None = None, **extra: Any) -> dict:
    return {"op": "join", "group": group, "rank": rank, "world_size": world, "data": f"tcp://h:{rank}",
            "hb": "tcp://h:1", "incarnation": inc, "pubkey": pubkey, "config": {}, **extra}


def _legit_round(address: str, group: str) -> bool:
    """Two carriers join ``group``, exchange a message and commit it: True when all went right."""
    cs = zmq_carriers(address, 2, group=group, streams=1, peer_timeout=10, join_timeout=60)
    try:
        cs[0].send(1, (0, 1, 0), [b"legit"], payload_bytes=5)
        ok = bytes(cs[1].recv(0, (0, 1, 0), timeout=30)[0]) == b"legit"
        out: list[tuple[int, ...]] = []
        t = threading.Thread(target=lambda: out.append(cs[1].commit((0, 1, 0), [0, 1])))
        t.start()
        parts = cs[0].commit((0, 1, 0), [0, 1])
        t.join(60)
        return ok and parts == (0, 1) and out == [(0, 1)]
    finally:
        for c in cs:
            c.close()


def deep_nested_id() -> dict:
    with start_coordinator() as co:
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(f"tcp://{co.address}")
        t0 = time.monotonic()
        s.send(b'{"op": "ping", "id": ' + b"[" * 990 + b"]" * 990 + b"}")
        answered = s.poll(10_000) and json.loads(s.recv())["ok"] is False
        took = time.monotonic() - t0
        s.close(0)
        ctx.term()
        alive = co.proc.poll() is None
        legit = _legit_round(co.address, "after-deep")
    return {
        "attack": "ping whose id nests 990 deep (item 1)",
        "bound": "error reply, coordinator keeps serving; legit group commits after",
        "measured": f"answered in {took * 1000:.0f} ms, alive={alive}, legit={legit}",
        "held": bool(answered) and alive and legit,
    }


def same_rank_twice() -> dict:
    with start_coordinator() as co:
        cs = zmq_carriers(co.address, 2, group="dup", streams=1, peer_timeout=10, join_timeout=60)
        try:
            t0 = time.monotonic()
            try:
                ZmqCarrier(1, 2, coordinator=co.address, group="dup", streams=1, join_timeout=60).close()
                refused = False
            except RankInUse:
                refused = True
            took = time.monotonic() - t0
            # the group the duplicate tried to enter still works
            cs[0].send(1, (0, 1, 0), [b"x"], payload_bytes=1)
            legit = bytes(cs[1].recv(0, (0, 1, 0), timeout=30)[0]) == b"x"
        finally:
            for c in cs:
                c.close()
    return {
        "attack": "a second process started as a held rank (item 8)",
        "bound": "RankInUse (ConfigError) within 5 s of patience + 2 s; the group unaffected",
        "measured": f"refused={refused} after {took:.1f} s, legit={legit}",
        "held": refused and took < 7.0 and legit,
    }


def chunk_size_mismatch() -> dict:
    with start_coordinator() as co:
        errors: list[BaseException] = []

        def rank0() -> None:
            try:
                ZmqCarrier(0, 2, coordinator=co.address, group="chunks", streams=1, chunk_size=64 << 10,
                           join_timeout=5).close()
            except BaseException as e:  # noqa: BLE001 - it times out: rank 1 never joined
                errors.append(e)

        t = threading.Thread(target=rank0)
        t.start()
        time.sleep(1.0)
        t0 = time.monotonic()
        try:
            ZmqCarrier(1, 2, coordinator=co.address, group="chunks", streams=1, chunk_size=128 << 10,
                       join_timeout=60).close()
            got = "joined"
        except ConfigMismatch as e:
            got = "ConfigMismatch" if "chunk_size" in str(e) else f"ConfigMismatch without chunk_size: {e}"
        except Exception as e:  # noqa: BLE001 - reported
            got = type(e).__name__
        took = time.monotonic() - t0
        t.join(30)
    return {
        "attack": "peers with different chunk_size (item 8)",
        "bound": "ConfigMismatch naming chunk_size within 2 s (join_timeout 60 s)",
        "measured": f"{got} after {took:.2f} s",
        "held": got == "ConfigMismatch" and took < 2.0,
    }


def joins_to_new_groups() -> dict:
    with start_coordinator(args=["--abandon-after", "1"]) as co:
        flood_requests(co.address, [{"op": "ping", "id": 1, "pad": "x" * 400}] * 10_000, expect=10_000)
        before = rss_bytes(co.proc.pid)
        reqs = ({**_join(0, 1, f"flood{i}", world=1), "id": i + 1, "config": {"codec": "q4", "pad": "x" * 200}}
                for i in range(30_000))
        refused = flood_requests(co.address, reqs, expect=30_000)
        grown = (rss_bytes(co.proc.pid) - before) / _MB
        time.sleep(1.5)  # the flood's connection is gone: its groups are abandoned
        legit = _legit_round(co.address, "after-groups")
    return {
        "attack": "30k joins to new groups (item 10)",
        "bound": f"<= {MAX_GROUPS} groups (the rest refused), RSS +< 24 MB; legit group after",
        "measured": f"{refused} refused, RSS +{grown:.1f} MB (main before the fix: +48 MB), legit={legit}",
        "held": refused == 30_000 - MAX_GROUPS and grown < 24 and legit,
    }


def pending_proposals() -> dict:
    with start_coordinator() as co:
        ctx = zmq.Context()
        c = [CoordinatorClient(ctx, co.address) for _ in range(2)]
        try:
            t = threading.Thread(target=c[1].ask, args=(_join(1, 2, "p"),), kwargs={"timeout": 10})
            t.start()
            c[0].ask(_join(0, 1, "p"), timeout=10)
            t.join(20)

            def flood(first: int) -> None:
                flood_requests(co.address, ({"op": "commit", "id": i + 1, "group": "p", "rank": 0, "key": [0, i, 0],
                                             "alive": [0, 1], "pad": "x" * 300} for i in range(first, first + 10_000)))

            flood(0)  # warms libzmq's and the allocator's buffers
            before = rss_bytes(co.proc.pid)
            for first in (10_000, 20_000, 30_000):  # 30k more: unbounded, this grew 23 MB
                flood(first)
            grown = (rss_bytes(co.proc.pid) - before) / _MB
            out: list[Any] = []
            commit = {"op": "commit", "group": "p", "key": [0, 10**6, 0], "alive": [0, 1]}
            t = threading.Thread(target=lambda: out.append(c[1].ask({**commit, "rank": 1}, timeout=20)))
            t.start()
            rep = c[0].ask({**commit, "rank": 0}, timeout=20)
            t.join(30)
            legit = rep is not None and rep["participants"] == [0, 1] and out[0]["participants"] == [0, 1]
        finally:
            for x in c:
                x.close()
            ctx.term()
    return {
        "attack": "40k undecided proposals from a member (item 10)",
        "bound": "64 undecided a rank: RSS +< 8 MB over 30k more (after 10k); the group still decides",
        "measured": f"RSS +{grown:.1f} MB (main before the fix: +23 MB), legit={legit}",
        "held": grown < 8 and legit,
    }


def curve_impersonation() -> dict:
    with tempfile.TemporaryDirectory() as d:
        keys = Path(d)
        for name in ("coord", "rank0", "rank1", "eve"):
            generate_keys(keys, name)
        sec = {n: Curve.from_files(keys / f"{n}.key_secret", allowed=[keys], coordinator=keys / "coord.key")
               for n in ("rank0", "rank1", "eve")}
        pub = {n: s.public_key.decode() for n, s in sec.items()}
        args = ["--curve-secret", str(keys / "coord.key_secret"), "--allow", str(keys)]
        with start_coordinator(args=args) as co:
            ctx = zmq.Context()
            cl = {n: CoordinatorClient(ctx, co.address, security=s) for n, s in sec.items()}
            tries = refused = 0
            try:
                cl["rank0"].ask(_join(0, 1, "g", pubkey=pub["rank0"]), timeout=0.3)
                t = threading.Thread(target=cl["rank1"].ask, args=(_join(1, 2, "g", pubkey=pub["rank1"]),),
                                     kwargs={"timeout": 10})
                t.start()
                t.join(20)
                forged = [
                    ("eve", _join(0, 8, "g", pubkey=pub["eve"])),  # override rank 0's endpoints
                    ("eve", _join(1, 8, "g", pubkey=pub["rank1"])),  # advertise another's key
                    ("rank1", _join(0, 9, "g", pubkey=pub["rank1"])),  # a second rank for one key
                    ("rank1", {"op": "commit", "group": "g", "rank": 0, "key": [0, 1, 0], "alive": [0]}),
                    ("eve", {"op": "commit", "group": "g", "rank": 1, "key": [0, 1, 0], "alive": [1]}),
                    ("eve", {"op": "leave", "group": "g", "rank": 0, "incarnation": 1}),
                ]
                for who, req in forged:
                    tries += 1
                    try:
                        cl[who].ask(req, timeout=10)
                    except (SecurityError, RankInUse):
                        refused += 1
                out: list[Any] = []
                commit = {"op": "commit", "group": "g", "key": [0, 1, 0], "alive": [0, 1]}
                t = threading.Thread(target=lambda: out.append(cl["rank1"].ask({**commit, "rank": 1}, timeout=20)))
                t.start()
                rep = cl["rank0"].ask({**commit, "rank": 0}, timeout=20)
                t.join(30)
                legit = (rep is not None and rep["participants"] == [0, 1] and out[0]["participants"] == [0, 1]
                         and rep["peers"]["0"]["data"] == "tcp://h:0")
            finally:
                for x in cl.values():
                    x.close()
                ctx.term()
    return {
        "attack": "CURVE: an allowed key speaks for another rank (item 11)",
        "bound": "every forged join/commit/leave refused; real ranks commit, endpoints intact",
        "measured": f"{refused}/{tries} refused, legit={legit}",
        "held": refused == tries and legit,
    }


ATTACKS = [deep_nested_id, same_rank_twice, chunk_size_mismatch, joins_to_new_groups, pending_proposals,
           curve_impersonation]

if __name__ == "__main__":
    for attack in ATTACKS:
        print(attack())
