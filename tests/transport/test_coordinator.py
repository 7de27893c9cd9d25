"""The coordinator: membership rules (no I/O) and the real process behind a socket."""

from __future__ import annotations

import json

import pytest
import zmq

from lowband.errors import ConfigMismatch
from lowband.transport._coord_client import CoordinatorClient
from lowband.transport.coordinator import Membership, RequestError, start_coordinator


def _join(m: Membership, rank: int, world: int = 3, **config) -> dict | None:
    req = {"group": "g", "rank": rank, "world_size": world, "data": f"tcp://127.0.0.1:{1000 + rank}",
           "hb": "tcp://127.0.0.1:1", "incarnation": 100 + rank, "config": config}
    return m.join(("who", rank), req)


def _commit(m: Membership, rank: int, alive: list[int], key=(0, 1, 9)) -> dict | None:
    return m.commit(("c", rank), {"group": "g", "rank": rank, "key": list(key), "alive": alive})


def test_join_waits_for_everyone_then_starts_epoch_0() -> None:
    m = Membership()
    assert _join(m, 0, codec="q4") is None and _join(m, 2, codec="q4") is None
    assert m.ready() == []
    assert _join(m, 1, codec="q4") is None
    due = m.ready()
    assert sorted(w[1] for w, _ in due) == [0, 1, 2]
    assert all(v["epoch"] == 0 and v["members"] == [0, 1, 2] and v["joined_at"] is None for _, v in due)


def test_join_mismatch_names_the_difference() -> None:
    m = Membership()
    _join(m, 0, codec="q4", sync_every=100)
    with pytest.raises(RequestError, match="sync_every: rank 1 has 50, rank 0 has 100") as e:
        _join(m, 1, codec="q4", sync_every=50)
    assert e.value.kind == "mismatch"
    with pytest.raises(RequestError, match="world_size"):
        _join(m, 1, world=4, codec="q4", sync_every=100)


def test_commit_is_the_intersection_once_its_members_proposed() -> None:
    m = Membership()
    for r in range(3):
        _join(m, r)
    m.ready()
    assert _commit(m, 0, [0, 1, 2]) is None
    assert _commit(m, 1, [0, 1, 2]) is None
    assert m.ready() == []  # rank 2 has not proposed and nobody lost it yet
    assert _commit(m, 0, [0, 1]) is None  # rank 0 now sees rank 2 as lost: {0, 1} proposed, agreed
    due = m.ready()
    assert sorted(w for w, _ in due) == [("c", 0), ("c", 0), ("c", 1)]  # every asking answered
    assert {tuple(v["participants"]) for _, v in due} == {(0, 1)}
    assert all(v["epoch"] == 1 and v["members"] == [0, 1] for _, v in due)
    # asking again gets the same, final answer; the dropped rank gets a set without itself
    assert _commit(m, 1, [0, 1])["participants"] == [0, 1]
    assert 2 not in _commit(m, 2, [0, 1, 2], key=(1, 2, 9))["participants"]


def test_late_joiner_enters_at_the_next_admission() -> None:
    m = Membership()
    for r in range(2):
        _join(m, r, world=2)
    m.ready()
    _commit(m, 0, [0], key=(0, 1, 9))  # rank 1 is gone; rank 0 alone decides
    assert [v["participants"] for _, v in m.ready()] == [[0]]
    req = {"group": "g", "rank": 1, "world_size": 2, "data": "tcp://x:1", "hb": "tcp://x:2",
           "incarnation": 555, "config": {}}
    assert m.join(("again", 1), req) is None
    _commit(m, 0, [0], key=(1, 2, 9))  # an ordinary commit lists the joiner, does not admit it
    (w, v), = m.ready()
    assert v["waiting"] == [1] and v["members"] == [0]
    m.commit(("c", 0), {"group": "g", "rank": 0, "key": [1, 3, 9], "alive": [0], "admit": True})
    views = {w: v for w, v in m.ready()}
    assert views[("again", 1)]["members"] == [0, 1]
    assert views[("again", 1)]["joined_at"] == [1, 3, 9]
    assert views[("again", 1)]["peers"]["1"]["incarnation"] == 555
    assert views[("c", 0)]["participants"] == [0] and views[("c", 0)]["epoch"] == 2


def _req(rank: int, inc: int, world: int = 2, **extra) -> dict:
    return {"group": "g", "rank": rank, "world_size": world, "data": f"tcp://x:{rank + 1000}", "hb": "tcp://x:9",
            "incarnation": inc, "config": {}, **extra}


def test_restart_replaces_its_gone_process_at_once_and_enters_at_the_next_admission() -> None:
    """Issue 16: a restart whose old process is gone (its connection closed: the default
    Membership knows no live connection) takes it out of the members at its join, so commits
    stop waiting for it; it is not admitted at a collective begun before (the survivors run
    that one again among fewer, which would drop it), but at the next admission commit."""
    m = Membership()
    for r in range(3):
        m.join(("j", r), _req(r, 100 + r, world=3))
    m.ready()
    for r in (0, 1):  # a collective in flight when rank 2 died: it waits for rank 2's proposal
        m.commit(("c", r), {"group": "g", "rank": r, "key": [0, 1, 9], "alive": [0, 1, 2], "admit": True})
    assert m.ready() == []
    assert m.join(("new", 2), _req(2, 999, world=3)) is None  # rank 2 restarted
    due = m.ready()  # the old process left: the collective is decided without it, nobody admitted
    assert len(due) == 2 and all(v["participants"] == [0, 1] and v["members"] == [0, 1]
                                 and v["waiting"] == [2] and v["epoch"] == 1 for _, v in due)
    # the old process, had it asked, gets a set without itself
    late = m.commit(("c", 2), {"group": "g", "rank": 2, "key": [0, 1, 9], "alive": [0, 1, 2],
                              "incarnation": 102})
    assert late is not None and late["participants"] == [0, 1]
    for r in (0, 1):  # the survivors' retry keeps every member: the new process enters
        m.commit(("c", r), {"group": "g", "rank": r, "key": [1, 1, 9], "alive": [0, 1], "admit": True})
    views = dict(m.ready())
    assert views[("new", 2)]["joined_at"] == [1, 1, 9] and views[("new", 2)]["members"] == [0, 1, 2]
    assert views[("new", 2)]["peers"]["2"]["incarnation"] == 999
    assert m.status({"group": "g", "peer": 2, "incarnation": 102})["gone"] is True
    assert m.status({"group": "g", "peer": 2, "incarnation": 999})["gone"] is True  # not live here


def test_status_says_whether_a_peers_process_is_gone() -> None:
    live = {"a0", "a1"}
    m = Membership(is_live=lambda conn: conn in live)
    for r in range(2):
        m.join((f"a{r}", r), _req(r, 10 + r))
    m.ready()
    assert m.status({"group": "g", "peer": 1, "incarnation": 11})["gone"] is False
    assert "gone" not in m.status({"group": "g"})
    live.discard("a1")  # rank 1's process ended: its connection closed
    st = m.status({"group": "g", "peer": 1, "incarnation": 11})
    assert st["gone"] is True and "connection" in st["why"]


def test_a_run_ends_when_its_members_leave_or_their_lease_runs_out() -> None:
    """Issue 13, item 6: a new run after close() and after a crash."""
    now = [0.0]
    m = Membership(lease=10.0, clock=lambda: now[0])
    for r in range(2):
        m.join(("a", r), _req(r, r + 1))
    assert len(m.ready()) == 2
    for r in range(2):
        m.leave({"group": "g", "rank": r, "incarnation": r + 1})
    assert "g" not in m.groups  # closed: the next joins start afresh
    for r in range(2):
        m.join(("b", r), _req(r, r + 10))
    assert [v["joined_at"] for _, v in m.ready()] == [None, None]
    # a crash whose connections closed (this Membership knows no live one): the restarted
    # processes replace the gone ones at their joins, and the last replacement starts a new run
    now[0] = 5.0
    m.join(("c", 0), _req(0, 20))
    assert m.ready() == []  # rank 1's old process is still a member: rank 0 waits to be admitted
    m.join(("c", 1), _req(1, 21))
    due = dict(m.ready())
    assert due[("c", 0)]["epoch"] == 0 and due[("c", 0)]["joined_at"] is None
    assert due[("c", 1)]["peers"]["1"]["incarnation"] == 21


def test_a_crashed_run_whose_connections_look_live_ends_with_its_lease() -> None:
    """A host that hangs keeps its connections: its ranks are held until the lease runs out."""
    now = [0.0]
    m = Membership(lease=10.0, clock=lambda: now[0], is_live=lambda conn: conn == "b")
    for r in range(2):
        m.join(("b", r), _req(r, r + 10))
    assert len(m.ready()) == 2
    now[0] = 5.0
    for r in range(2):
        with pytest.raises(RequestError) as e:
            m.join(("c", r), _req(r, 20 + r))
        assert e.value.kind == "duplicate"
    now[0] = 16.0  # every old member silent past the lease: a new run
    m.join(("c", 0), _req(0, 20))
    m.join(("c", 1), _req(1, 21))
    due = dict(m.ready())
    assert due[("c", 0)]["epoch"] == 0 and due[("c", 0)]["joined_at"] is None


def test_a_restarted_coordinator_recovers_membership_from_the_members() -> None:
    m = Membership()
    rec = {**_req(0, 1, world=3), "epoch": 4, "members": [0, 2], "last": {"key": [3, 7, 9], "participants": [0, 2]}}
    view = m.recover("x", rec)
    assert view["members"] == [0, 2] and view["epoch"] == 4
    # a slower member still asking for the last decision gets the same answer
    assert m.commit("y", {"group": "g", "rank": 2, "key": [3, 7, 9], "alive": [0, 2]})["participants"] == [0, 2]
    with pytest.raises(RequestError) as e:  # a member that has not re-registered is told to
        m.commit("y", {"group": "g", "rank": 2, "key": [4, 8, 9], "alive": [0, 2]})
    assert e.value.kind == "unknown"
    m.recover("z", {**_req(2, 3, world=3), "epoch": 4, "members": [0, 2]})
    m.commit("a", {"group": "g", "rank": 0, "key": [4, 8, 9], "alive": [0, 2]})
    m.commit("b", {"group": "g", "rank": 2, "key": [4, 8, 9], "alive": [0, 2]})
    assert [v["participants"] for _, v in m.ready()] == [[0, 2], [0, 2]]


def test_a_stale_first_claim_after_a_coordinator_restart_cannot_split_the_group() -> None:
    """Soak, 2026-12-02: rank 0 stalled, the others dropped it (epoch 1), the coordinator
    restarted, and rank 0 (which believed everyone else lost) re-registered first with its
    old view and decided a collective alone. A decision that drops members who have not
    re-registered waits for their claims (or the grace), and the newer claim replaces the view."""
    now = [0.0]
    m = Membership(clock=lambda: now[0])  # lease 15 s: a grace of 7 s
    stale = {**_req(0, 100, world=4), "epoch": 0, "members": [0, 1, 2, 3]}
    m.recover(("a", 0), stale)
    alone = {"group": "g", "rank": 0, "incarnation": 100, "key": [0, 9, 9], "alive": [0]}
    assert m.commit(("c", 0), alone) is None  # would drop 1, 2, 3: it waits
    now[0] = 0.5
    view = m.recover(("a", 1), {**_req(1, 101, world=4), "epoch": 1, "members": [1, 2, 3]})
    assert view["members"] == [1, 2, 3] and view["epoch"] == 1
    for r in (2, 3):
        m.recover(("a", r), {**_req(r, 100 + r, world=4), "epoch": 1, "members": [1, 2, 3]})
    assert m.ready() == []  # rank 0's lone collective was never decided
    late = m.commit(("c", 0), alone)
    assert late is not None and 0 not in late["participants"]  # rank 0 learns it was dropped
    for r in (1, 2, 3):
        m.commit(("d", r), {"group": "g", "rank": r, "incarnation": 100 + r, "key": [1, 5, 9], "alive": [1, 2, 3]})
    assert [v["participants"] for _, v in m.ready()] == [[1, 2, 3]] * 3


def test_after_a_restart_a_member_that_never_re_registers_is_dropped_after_the_grace() -> None:
    now = [0.0]
    m = Membership(clock=lambda: now[0])
    for r in (0, 1):
        m.recover(("a", r), {**_req(r, 10 + r, world=3), "epoch": 2, "members": [0, 1, 2]})
    for r in (0, 1):
        m.commit(("c", r), {"group": "g", "rank": r, "incarnation": 10 + r, "key": [2, 1, 9], "alive": [0, 1]})
    assert m.ready() == []  # rank 2 may still re-register
    now[0] = 8.0  # past the grace: rank 2 is gone
    m.commit(("c", 0), {"group": "g", "rank": 0, "incarnation": 10, "key": [2, 1, 9], "alive": [0, 1]})
    assert [v["participants"] for _, v in m.ready()] == [[0, 1]] * 3


def test_bad_requests_are_refused() -> None:
    m = Membership()
    with pytest.raises(RequestError):
        m.join("x", {"group": "g", "rank": "zero"})
    with pytest.raises(RequestError):
        m.commit("x", {"group": "nope", "rank": 0, "key": [0, 0, 0], "alive": [0]})


def test_coordinator_process_answers_and_survives_garbage() -> None:
    ctx = zmq.Context()
    with start_coordinator() as co:
        raw = ctx.socket(zmq.DEALER)
        raw.linger = 0
        raw.connect(f"tcp://{co.address}")
        for junk in (b"\xff\x00garbage", b"[1,2]", json.dumps({"op": "nope", "id": 3}).encode()):
            raw.send(junk)
            assert raw.poll(10_000)
            assert json.loads(raw.recv())["ok"] is False
        raw.close(0)
        client = CoordinatorClient(ctx, co.address)
        assert client.ask({"op": "ping"}, timeout=10) is not None
        base = {"op": "join", "group": "t", "world_size": 2, "data": "tcp://a:1", "hb": "tcp://a:2",
                "incarnation": 1}
        assert client.ask({**base, "rank": 0, "config": {"codec": "q4"}}, timeout=0.2) is None
        with pytest.raises(ConfigMismatch, match="codec"):
            client.ask({**base, "rank": 1, "config": {"codec": "q8"}}, timeout=10)
        client.close()
    ctx.term()


def test_deeply_nested_id_gets_an_error_and_the_process_keeps_serving() -> None:
    """Issue 15 item 1: a ~2 KB ping whose id nests ~990 deep ended serve()."""
    ctx = zmq.Context()
    with start_coordinator() as co:
        raw = ctx.socket(zmq.DEALER)
        raw.linger = 0
        raw.connect(f"tcp://{co.address}")
        deep = b'{"op": "ping", "id": ' + b"[" * 990 + b"]" * 990 + b"}"
        for junk in (deep, json.dumps({"op": "ping", "id": [[[1]]]}).encode(),
                     json.dumps({"op": "ping", "id": "x" * 10_000}).encode()):
            raw.send(junk)
            assert raw.poll(10_000)
            rep = json.loads(raw.recv())
            assert rep["id"] is None and isinstance(rep["ok"], bool)
        raw.send(json.dumps({"op": "ping", "id": 7}).encode())
        assert raw.poll(10_000)
        assert json.loads(raw.recv()) == {"id": 7, "ok": True}
        assert co.proc.poll() is None
        raw.close(0)
    ctx.term()
