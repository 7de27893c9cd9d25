"""The coordinator: rendezvous, membership, epochs and the commit of participant sets.

It runs in its own process (``lowband coordinator --bind HOST:PORT`` or
:func:`start_coordinator`), never inside a trainer, so killing any trainer,
rank 0 included, leaves the others able to agree and continue (DESIGN.md,
"Faults and membership"). It only carries small JSON control messages over one
ZeroMQ ROUTER socket; tensors never pass through it.

Requests (a JSON object with ``op`` and a client-chosen ``id``; the reply echoes
``id``; any malformed request gets ``{"ok": false, "error": ...}``):

- ``join``: a peer registers its endpoints, process incarnation, public key and
  configuration. Until ``world_size`` ranks have joined, replies wait; then epoch
  0 starts with every rank. A configuration that differs from the first joiner's
  is refused with ``kind = "mismatch"`` naming the keys and values. A rank that
  joins a running group (a restart or a late joiner) waits until its old
  incarnation is out of the membership (dropped by a commit, left, or, for a
  restart whose old process is gone, taken out at once by this join: commits stop
  waiting for it) and then enters at the next
  commit that asks for admission (``admit: true``, see :meth:`Group.admit
  <lowband.transport.group.Group.admit>`), which starts a new epoch; its reply
  names that commit's key as ``joined_at`` (``None`` for the ranks present from
  the start). A run whose every member is gone (left, or silent past the lease)
  is over: the next joins start a fresh run, as on a new coordinator.
- ``alive``: a member's lease (sent every few seconds by its carrier); a member
  not heard from for ``lease`` seconds counts as gone when a new run asks.
- ``leave``: a member (or a waiting joiner) leaves at ``close()``; commits stop
  waiting for it, and a run whose last member left is over.
- ``recover``: after a coordinator restart, a member re-registers the membership
  it holds (epoch, members, its own endpoints, its last decision); the first
  such claim re-creates the running group, later ones add their endpoints.
- ``status``: which ranks of a group have joined and whether it started (read only;
  a waiting peer names the missing ranks when its ``init_timeout`` ends). With
  ``peer`` and ``incarnation``: whether that process is gone here too (``gone``: its
  connection closed, a new process holds its rank, or it is no longer a member); a
  member whose every connection to that peer closed then counts it lost at once.
- ``commit``: a member proposes the ranks it believes alive for one collective
  ``key = (epoch, seq, phase)``. Members may re-propose a smaller set while they
  wait. Members are the ranks of the previous decision (every rank before the
  first). The decision is the intersection of the proposals, made once every rank
  in that intersection has proposed; it is final and every asker gets the same
  answer. If the set shrank, or joiners were admitted, the membership moves to a
  new epoch (reported as ``epoch``; the collectives keep their own epoch count).
  Joiners are admitted only at a decision that keeps every member (never at one
  that drops some: the survivors run that collective again among the smaller
  set, which would drop the joiner at once), and only when the commit asks
  (``admit``). Every decision lists the ranks that wait and could be admitted
  (``waiting``), so every member learns the same thing at the same collective.
  A rank that is no longer a member gets the current members, without itself.

- ``ping``: an empty reply.

**One process a rank.** The coordinator remembers, for each rank of each group, the
process (incarnation) that holds it and the connection it asked from. A join for a
held rank from another incarnation is refused with ``kind = "duplicate"`` while the
holder's connection lives (the client raises :class:`lowband.errors.RankInUse`, a
``ConfigError``, after a few seconds of retrying, long enough for a killed holder's connection to close); once the
holder is gone (its process ended, ZeroMQ heartbeats found it silent for
``HOLDER_TIMEOUT_S``, or, as a member of a running group, it has sent no lease for ``lease``
seconds) the newcomer takes the rank, as a restarted peer does (it enters at the next
admission commit once the members dropped the old process). Clients use a
random routing id of their own, so a holder that reconnects is recognised again.

**Who may speak for a rank.** Without CURVE, anyone who can reach the coordinator can
join as any free rank, override nothing that is held, and send commits in any rank's
name: bind it to loopback or a private network only. With CURVE each key is bound to the
rank it joined as: a join must advertise the key it authenticated with, a key holds one
rank of a group, and every other request that names a rank (``commit``, ``leave``) must
come from that rank's key; anything else is refused with ``kind = "security"``
(:class:`lowband.errors.SecurityError` on the client). CURVE proves "holds an allowed key",
not which rank that key should have: an allowed key can still take a rank nobody holds.

**Caps** (what happens at each; see ``docs/reliability.md``): at most ``max_groups``
groups (default ``MAX_GROUPS``); a join that would create one more is refused
(``TransportError`` on the client) after groups that nobody holds any more have been
forgotten. A group whose holders have all been gone for ``abandon_after`` seconds is
forgotten (its next request is told the group has not started). Per group: at most
``MAX_PENDING_KEYS`` undecided collectives (one more is refused) and
``MAX_PENDING_PER_RANK`` a rank (its oldest undecided proposal is withdrawn: a live
proposer re-sends it within a quarter second), at most ``MAX_WAITERS`` + 4 a member queued
replies per question (the oldest dropped: each client re-asks), the last
``_KEEP_DECISIONS`` decisions. A join's strings are at most ``MAX_NAME_CHARS`` characters
and its ``config`` at most ``MAX_CONFIG_BYTES`` of JSON.

All state lives in :class:`Membership`, a plain object with no I/O (the liveness of a
connection is a function it is given), so its rules are unit-tested directly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from lowband._endpoint import Endpoint
from lowband.errors import ConfigError, TransportError
from lowband.transport._sockets import open_socket

__all__ = ["Coordinator", "CoordinatorProcess", "Holder", "Membership", "main", "start_coordinator"]

log = logging.getLogger(__name__)

#: Control messages are small; anything larger is refused by libzmq (MAXMSGSIZE).
MAX_REQUEST_BYTES = 1 << 20
_KEEP_DECISIONS = 4096
#: A request nests at most this deep (a join's config holds shapes: lists in a dict in the request).
MAX_REQUEST_DEPTH = 16
#: An echoed string ``id`` is at most this long; any other ``id`` is echoed as ``None``.
MAX_ID_CHARS = 64
#: Groups a coordinator holds at once (a join that would create one more is refused).
MAX_GROUPS = 1024
#: Seconds a group may have no live holder before it is forgotten.
ABANDON_AFTER_S = 300.0
#: Undecided collectives (commit keys) a group may have, and a single rank may have proposed.
MAX_PENDING_KEYS = 1024
MAX_PENDING_PER_RANK = 64
#: Replies queued for one question (a join, a commit key), beyond 4 per member.
MAX_WAITERS = 64
#: A group name, a data or heartbeat endpoint: at most this many characters.
MAX_NAME_CHARS = 256
#: A join's ``config``, as JSON, at most this many bytes.
MAX_CONFIG_BYTES = 64 << 10
#: ZeroMQ heartbeats: a client connection silent this long is closed (its holder is gone).
HOLDER_TIMEOUT_S = 15.0
_HEARTBEAT_IVL_S = 3.0
#: Seconds without a word from every member of a running group before its run is over
#: (a crash), and before a member's rank counts as free for a new process.
LEASE_S = 15.0
#: How often serve() looks for abandoned groups.
_SWEEP_S = 10.0


def _safe_id(rid: Any) -> int | str | None:
    """The request id as it may be echoed: a plain 64-bit int or a short string, never other JSON."""
    if isinstance(rid, int) and not isinstance(rid, bool) and -(1 << 63) <= rid < (1 << 63):
        return rid
    if isinstance(rid, str) and len(rid) <= MAX_ID_CHARS:
        return rid
    return None


def _depth(obj: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_REQUEST_DEPTH:
                return d
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


class RequestError(ValueError):
    """A request the coordinator refuses; ``kind`` tells the client which error to raise."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


def _check_join_sizes(req: dict[str, Any]) -> None:
    for name in ("group", "data", "hb", "pubkey"):
        v = req.get(name)
        if isinstance(v, str) and len(v) > MAX_NAME_CHARS:
            raise RequestError(f"field {name!r} over {MAX_NAME_CHARS} characters")
    try:
        n = len(json.dumps(req.get("config")))
    except (ValueError, TypeError, RecursionError) as e:
        raise RequestError(f"field 'config' cannot be encoded: {e}") from None
    if n > MAX_CONFIG_BYTES:
        raise RequestError(f"field 'config' over {MAX_CONFIG_BYTES} bytes of JSON")


def _field(req: dict[str, Any], name: str, typ: type | tuple[type, ...]) -> Any:
    v = req.get(name)
    if not isinstance(v, typ) or isinstance(v, bool) and typ is int:
        raise RequestError(f"field {name!r} missing or not {typ}")
    return v


@dataclass
class Holder:
    """The process that holds a rank: its incarnation, the connection it speaks from, and
    (with CURVE) the key it authenticated with."""

    incarnation: int
    conn: Any
    key: str | None


def _conn(who: Any) -> Any:
    """The connection part of a waiter: the coordinator's waiters are (routing id, request id)."""
    return who[0] if isinstance(who, tuple) and who else who


def _holds(g: Group, rank: int, h: Holder) -> bool:
    """Whether ``h`` still has ``rank`` in ``g``: a member, or waiting to become one."""
    for table in (g.joiners, g.members_info if not g.started or rank in g.members else {}):
        info = table.get(rank)
        if info is not None and info.get("incarnation") == h.incarnation:
            return True
    return False


def _cap_waiters(waiters: list[Any], members: int) -> None:
    """Drop the oldest queued replies beyond the cap (their clients ask again)."""
    excess = len(waiters) - (MAX_WAITERS + 4 * members)
    if excess > 0:
        del waiters[:excess]


@dataclass
class Group:
    world_size: int
    config: dict[str, Any]
    config_rank: int
    members_info: dict[int, dict[str, Any]] = field(default_factory=dict)
    started: bool = False
    epoch: int = 0
    members: tuple[int, ...] = ()
    joiners: dict[int, dict[str, Any]] = field(default_factory=dict)
    proposals: dict[tuple[int, int, int], dict[int, frozenset[int]]] = field(default_factory=dict)
    decisions: dict[tuple[int, int, int], dict[str, Any]] = field(default_factory=dict)
    joined_at: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    seen: dict[int, float] = field(default_factory=dict)  # member -> last request (lease)
    admit: set[tuple[int, int, int]] = field(default_factory=set)  # keys that asked for admission
    recovered: bool = False  # rebuilt from members' claims after a coordinator restart
    recovered_at: float = 0.0  # when (a member not re-registered by then + the grace: gone)
    seeded: set[tuple[int, int, int]] = field(default_factory=set)  # decisions taken from claims


class Membership:
    """The coordinator's rules, free of sockets. Methods return a reply dict, or
    ``None`` when the reply must wait; :meth:`ready` lists replies that became due."""

    def __init__(
        self,
        *,
        is_live: Callable[[Any], bool] = lambda conn: False,
        clock: Callable[[], float] = time.monotonic,
        lease: float = LEASE_S,
        max_groups: int = MAX_GROUPS,
        abandon_after: float = ABANDON_AFTER_S,
    ) -> None:
        self.lease = lease
        self.clock = clock
        self.groups: dict[str, Group] = {}
        # runs that ended here: a late member may not revive them (oldest forgotten past the cap)
        self._ended: dict[str, None] = {}
        self._due: list[tuple[Any, dict[str, Any]]] = []
        self._due_error: list[tuple[Any, str]] = []
        self._waiting_join: dict[str, list[tuple[Any, int]]] = {}
        self._waiting_commit: dict[tuple[str, tuple[int, int, int]], list[Any]] = {}
        # who holds each rank (see "One process a rank" above); is_live(conn) says whether a
        # connection is still there (the Coordinator asks its socket; the default knows of
        # none, so on its own a Membership admits every new incarnation, as it did before)
        self.holders: dict[tuple[str, int], Holder] = {}
        self._is_live = is_live
        self.max_groups, self.abandon_after = max_groups, abandon_after
        self._last_live: dict[str, float] = {}
        self._last_sweep = -float("inf")

    def ready(self) -> list[tuple[Any, dict[str, Any]]]:
        out, self._due = self._due, []
        return out

    def ready_errors(self) -> list[tuple[Any, str]]:
        """Waiting requests that will never get their answer (``kind = "stale"``)."""
        out, self._due_error = self._due_error, []
        return out

    def _view(self, g: Group) -> dict[str, Any]:
        return {
            "epoch": g.epoch,
            "lease": self.lease,  # members renew well within it
            "members": list(g.members),
            # after a coordinator restart, only members that re-registered have endpoints here
            "peers": {str(r): g.members_info[r] for r in g.members if r in g.members_info},
        }

    # -- join ------------------------------------------------------------------------
    def _member(self, req: dict[str, Any]) -> tuple[str, int, int, dict[str, Any], dict[str, Any]]:
        """The fields a join and a recover share, checked: group, rank, world size, the
        peer's endpoints and keys, its config."""
        name = _field(req, "group", str)
        rank, world = _field(req, "rank", int), _field(req, "world_size", int)
        if not 1 <= world <= 65535 or not 0 <= rank < world:
            raise RequestError(f"rank {rank} outside a group of {world}")
        return name, rank, world, self._peer_info(req), _field(req, "config", dict)

    def _peer_info(self, req: dict[str, Any]) -> dict[str, Any]:
        _check_join_sizes(req)
        info = {
            "data": _field(req, "data", str),
            "hb": _field(req, "hb", str),
            "incarnation": _field(req, "incarnation", int),
            "pubkey": req.get("pubkey"),
        }
        if info["pubkey"] is not None and not isinstance(info["pubkey"], str):
            raise RequestError("field 'pubkey' not a string")
        for f in ("data", "hb"):  # the members dial these: a malformed one is refused here
            if not info[f].startswith("tcp://"):
                raise RequestError(f"field {f!r} must be a tcp:// endpoint")
            try:
                Endpoint.parse(info[f], f"field {f!r}")
            except ConfigError as e:
                raise RequestError(str(e)) from None
        return info

    def _check_config(self, g: Group, rank: int, world: int, config: dict[str, Any]) -> None:
        if world != g.world_size:
            raise RequestError(
                f"rank {rank} says world_size={world}, the group has {g.world_size}", "mismatch"
            )
        diff = sorted(k for k in set(config) | set(g.config) if config.get(k) != g.config.get(k))
        if diff:
            parts = [
                f"{k}: rank {rank} has {config.get(k)!r}, rank {g.config_rank} has {g.config.get(k)!r}"
                for k in diff
            ]
            raise RequestError(
                "configuration differs across peers; " + "; ".join(parts), "mismatch"
            )

    def _over(self, g: Group) -> bool:
        """A running group whose every member is gone: left, or silent past the lease."""
        now = self.clock()
        return all(now - g.seen.get(r, -1e18) > self.lease for r in g.members)

    def _new_group(self, name: str, world: int, config: dict[str, Any], rank: int) -> Group:
        self._make_room()
        g = self.groups[name] = Group(world, config, rank)
        self._last_live[name] = self.clock()
        self._ended.pop(name, None)
        return g

    def join(self, who: Any, req: dict[str, Any], key: str | None = None) -> dict[str, Any] | None:
        name, rank, world, info, config = self._member(req)
        g = self.groups.get(name)
        if g is not None and g.started and self._over(g):
            # the last run ended (closed, or crashed and its lease ran out): a fresh one
            log.info("group %r: every member of the last run is gone; a new run starts", name)
            self._end(name, g)
            g = self.groups.get(name)
        if g is None:
            g = self._new_group(name, world, config, rank)
        try:
            self._check_config(g, rank, world, config)
        except RequestError as e:
            if g.started:  # say why an earlier run may still be in the way
                ago = self.clock() - max(g.seen.values(), default=self.clock())
                e.args = (
                    f"{e}; the running group's members {list(g.members)} were last heard {ago:.0f}s "
                    f"ago (a crashed run ends when its members leave or after the {self.lease:g}s lease)",
                )
            raise
        self._claim(name, g, rank, info, _conn(who), key)
        if not g.started:
            old = g.members_info.get(rank)
            if old is not None and old["incarnation"] != info["incarnation"]:
                # a restarted process before the start: the new one replaces the old
                self._drop_waiting(name, rank)
            g.members_info[rank] = info
            waiting = self._waiting_join.setdefault(name, [])
            waiting.append((who, rank))
            _cap_waiters(waiting, g.world_size)
            if len(g.members_info) == g.world_size:
                g.started, g.members = True, tuple(range(g.world_size))
                now = self.clock()
                g.seen = {r: now for r in g.members}
                log.info("group %r started: epoch 0, %d members", name, g.world_size)
                for w, _ in self._waiting_join.pop(name, []):
                    self._due.append((w, {**self._view(g), "joined_at": None}))
            return None
        if rank in g.members and g.members_info.get(rank, {}).get("incarnation") == info["incarnation"]:
            at = g.joined_at.get(rank)  # a retried join
            return {**self._view(g), "joined_at": None if at is None else list(at)}
        old = g.joiners.get(rank)
        if old is not None and old["incarnation"] != info["incarnation"]:
            self._drop_waiting(name, rank)  # an earlier restart that never got in
        g.joiners[rank] = info
        waiting = self._waiting_join.setdefault(name, [])
        waiting.append((who, rank))
        _cap_waiters(waiting, g.world_size)
        log.info("group %r: rank %d waits to be admitted", name, rank)
        if rank in g.members and rank in g.members_info:
            # a restart: _claim found the old process gone (its connection closed, or its lease
            # ran out), so it leaves the membership now; commits stop waiting for it, and the
            # new process is admitted at the next admission commit, not after a timeout
            log.info("group %r: rank %d restarted; its old process leaves the members", name, rank)
            self._remove_member(name, g, rank)
        return None

    def _drop_waiting(self, name: str, rank: int) -> None:
        keep = [(w, r) for w, r in self._waiting_join.get(name, []) if r != rank]
        gone = [(w, r) for w, r in self._waiting_join.get(name, []) if r == rank]
        if keep:
            self._waiting_join[name] = keep
        else:
            self._waiting_join.pop(name, None)
        for w, _ in gone:  # the process that asked is gone or replaced: tell it, if it listens
            self._due_error.append((w, "a newer process with this rank joined"))

    def _end(self, name: str, g: Group) -> None:
        """Forget a run that is over; joiners waiting on it start the next run."""
        waiting = [(w, r) for w, r in self._waiting_join.pop(name, []) if r in g.joiners]
        joiners = dict(g.joiners)
        del self.groups[name]
        self._mark_ended(name)
        for key in [k for k in self._waiting_commit if k[0] == name]:
            for w in self._waiting_commit.pop(key):
                self._due_error.append((w, "the run ended"))
        # the old members' ranks are free now (a joiner's holder stays: it waits in the new run)
        for k in [k for k in self.holders if k[0] == name and k[1] not in joiners]:
            del self.holders[k]
        if joiners:
            first = min(joiners)
            ng = self.groups[name] = Group(g.world_size, g.config, first)
            ng.members_info = joiners
            self._waiting_join[name] = waiting
            if len(joiners) == g.world_size:
                ng.started, ng.members = True, tuple(range(g.world_size))
                now = self.clock()
                ng.seen = {r: now for r in ng.members}
                for w, _ in self._waiting_join.pop(name, []):
                    self._due.append((w, {**self._view(ng), "joined_at": None}))
        else:
            self._last_live.pop(name, None)

    def _mark_ended(self, name: str) -> None:
        self._ended.pop(name, None)
        self._ended[name] = None
        while len(self._ended) > self.max_groups:  # bounded: the oldest are forgotten
            self._ended.pop(next(iter(self._ended)))

    # -- holders, caps, abandoned groups ----------------------------------------------
    def _gone(self, g: Group, rank: int, h: Holder) -> bool:
        """Whether the holder of ``rank`` is gone: its connection is closed (or ZeroMQ
        heartbeats found it silent), or, as a member of a running group, its lease ran out."""
        if not self._is_live(h.conn):
            return True
        member = (g.started and rank in g.members
                  and g.members_info.get(rank, {}).get("incarnation") == h.incarnation)
        return member and self.clock() - g.seen.get(rank, -1e18) > self.lease

    def _claim(
        self, name: str, g: Group, rank: int, info: dict[str, Any], conn: Any, key: str | None
    ) -> None:
        """Record the joiner as the holder of ``rank``, or refuse it (see the module docstring).
        A holder holds while its process is there (its connection live, its lease, as a member,
        not run out) and its rank is a member (or waits to be): a rank the group dropped is free
        for a restarted process."""
        inc = info["incarnation"]
        if key is not None:  # CURVE: the key it authenticated with is the key it advertises
            if info["pubkey"] != key:
                raise RequestError(
                    f"rank {rank} advertises a public key that is not the CURVE key it "
                    "connected with", "security")
            for (gname, r), other in self.holders.items():
                if (gname == name and r != rank and other.key == key and _holds(g, r, other)
                        and not self._gone(g, r, other)):
                    raise RequestError(
                        f"this CURVE key already holds rank {r} of group {name!r}: with CURVE "
                        "each rank needs its own key pair (lowband keys generate)", "security")
        h = self.holders.get((name, rank))
        if (h is not None and h.incarnation != inc and _holds(g, rank, h)
                and not self._gone(g, rank, h)):
            raise RequestError(
                f"rank {rank} of group {name!r} is held by another live process (incarnation "
                f"{h.incarnation}): two processes were started as the same rank. A restarted "
                "peer is admitted once its old process has ended", "duplicate")
        if h is not None and h.incarnation != inc:  # the old holder is gone: so are its waits
            self._drop_waiting(name, rank)
        self.holders[(name, rank)] = Holder(inc, conn, key)

    def authorize(self, req: dict[str, Any], conn: Any, key: str | None) -> None:
        """For a request that names a group and a rank (commit, alive, leave): with CURVE,
        only that rank's holder's key may send it. A request with the holder's incarnation
        refreshes the holder's connection. A lease (``alive``) for a rank nobody holds (this
        coordinator restarted) is answered (it learns to ``recover``) but changes nothing."""
        name, rank = req.get("group"), req.get("rank")
        if not isinstance(name, str) or not isinstance(rank, int) or isinstance(rank, bool):
            return  # the op's own checks refuse it
        h = self.holders.get((name, rank))
        if h is None and req.get("op") == "alive":
            return
        if key is not None and (h is None or h.key != key):
            raise RequestError(
                f"this CURVE key does not hold rank {rank} of group {name!r}: a key speaks "
                "only for the rank it joined as", "security")
        if h is not None and req.get("incarnation") == h.incarnation:
            h.conn = conn

    def _make_room(self) -> None:
        """Before a new group: forget abandoned ones at the cap; refuse when still full."""
        if len(self.groups) < self.max_groups:
            return
        if self.clock() - self._last_sweep >= 1.0:  # a sweep probes every group: once a second
            self.sweep()
        if len(self.groups) >= self.max_groups:
            raise RequestError(
                f"the coordinator holds {len(self.groups)} groups (its cap, --max-groups); "
                "a group is forgotten once its processes have been gone for "
                f"{self.abandon_after:g}s")

    def sweep(self) -> list[str]:
        """Forget every group none of whose holders has had a live connection for
        ``abandon_after`` seconds; returns their names. Also drops what is left of
        groups that ended (holders, waits)."""
        now = self._last_sweep = self.clock()
        by_group: dict[str, list[Holder]] = {}
        for (name, _), h in self.holders.items():
            by_group.setdefault(name, []).append(h)
        gone = []
        for name in list(self.groups):
            if any(self._is_live(h.conn) for h in by_group.get(name, ())):
                self._last_live[name] = now
            elif now - self._last_live.get(name, now) >= self.abandon_after:
                gone.append(name)
        for name in gone:
            self.forget_group(name)
        for name in set(by_group) | set(self._last_live) | set(self._waiting_join):
            if name not in self.groups:
                self.forget_group(name, quiet=True)
        return gone

    def forget_group(self, name: str, *, quiet: bool = False) -> None:
        """Drop every piece of state of group ``name`` (an ended run included)."""
        self.groups.pop(name, None)
        self._ended.pop(name, None)
        self._last_live.pop(name, None)
        for w, _ in self._waiting_join.pop(name, []):
            self._due_error.append((w, "the group was forgotten"))
        for k in [k for k in self._waiting_commit if k[0] == name]:
            for w in self._waiting_commit.pop(k):
                self._due_error.append((w, "the group was forgotten"))
        for hk in [hk for hk in self.holders if hk[0] == name]:
            del self.holders[hk]
        if not quiet:
            log.info("group %r forgotten: none of its processes is connected", name)

    def _admit_proposal(self, name: str, g: Group, rank: int, key: tuple[int, int, int]) -> None:
        """Caps on undecided collectives, checked before ``rank`` proposes for a new ``key``."""
        if key in g.proposals and rank in g.proposals[key]:
            return
        if key not in g.proposals and len(g.proposals) >= MAX_PENDING_KEYS:
            raise RequestError(f"group {name!r} has {MAX_PENDING_KEYS} undecided collectives (the cap)")
        mine = [k for k, p in g.proposals.items() if rank in p]
        if len(mine) >= MAX_PENDING_PER_RANK:  # withdraw this rank's oldest proposal
            old = mine[0]
            del g.proposals[old][rank]
            if not g.proposals[old]:
                del g.proposals[old]
                g.admit.discard(old)
                self._waiting_commit.pop((name, old), None)

    def status(self, req: dict[str, Any]) -> dict[str, Any]:
        """Which ranks a group has (for a peer's timeout message): nothing is changed."""
        g = self.groups.get(_field(req, "group", str))
        if g is None:
            return {"world_size": None, "joined": [], "started": False}
        joined = g.members if g.started else sorted(g.members_info)
        out = {"world_size": g.world_size, "joined": list(joined), "started": g.started,
               "waiting": sorted(g.joiners),
               # what a restarted island needs to know its group's shape (transport/islands.py)
               "config": g.config if g.started else None}
        peer, inc = req.get("peer"), req.get("incarnation")
        if g.started and isinstance(peer, int) and isinstance(inc, int) and 0 <= peer < g.world_size:
            out["gone"], out["why"] = self._process_gone(_field(req, "group", str), g, peer, inc)
        return out

    def _process_gone(self, name: str, g: Group, rank: int, inc: int) -> tuple[bool, str]:
        """Whether process ``inc`` of ``rank`` is gone as far as this coordinator knows: a
        member that asks about a peer whose connections all closed learns it is lost now."""
        h = self.holders.get((name, rank))
        if h is not None and h.incarnation != inc and _holds(g, rank, h):
            return True, "a new process holds its rank"
        if rank not in g.members:
            return True, "it is no longer a member"
        if h is not None and h.incarnation == inc and not self._is_live(h.conn):
            return True, "its connection to the coordinator closed"
        return False, ""

    def alive(self, req: dict[str, Any]) -> dict[str, Any]:
        """A member's lease: it is still there."""
        g = self.groups.get(_field(req, "group", str))
        rank, inc = _field(req, "rank", int), _field(req, "incarnation", int)
        if g is None or not g.started:
            return {"member": False, "known": g is not None}
        if rank in g.members and rank not in g.members_info:  # recovered; it has not re-registered
            return {"member": False, "known": False}
        member = rank in g.members and g.members_info[rank]["incarnation"] == inc
        if member:
            g.seen[rank] = self.clock()
        return {"member": member, "known": True, "lease": self.lease}

    def leave(self, req: dict[str, Any]) -> dict[str, Any]:
        """A member (or a waiting joiner) closes: commits stop waiting for it."""
        name = _field(req, "group", str)
        rank, inc = _field(req, "rank", int), _field(req, "incarnation", int)
        g = self.groups.get(name)
        if g is None:
            return {}
        if not g.started:
            if rank in g.members_info and g.members_info[rank]["incarnation"] == inc:
                del g.members_info[rank]
                self._waiting_join[name] = [x for x in self._waiting_join.get(name, []) if x[1] != rank]
                if not g.members_info:
                    del self.groups[name]
                    self._mark_ended(name)
                    self._last_live.pop(name, None)
                    self._waiting_join.pop(name, None)
                    for hk in [hk for hk in self.holders if hk[0] == name]:
                        del self.holders[hk]
            return {}
        if rank in g.joiners and g.joiners[rank]["incarnation"] == inc:
            del g.joiners[rank]
            self._waiting_join[name] = [x for x in self._waiting_join.get(name, []) if x[1] != rank]
        if rank in g.members and g.members_info.get(rank, {}).get("incarnation") == inc:
            log.info("group %r: rank %d left", name, rank)
            self._remove_member(name, g, rank)
        return {}

    def _remove_member(self, name: str, g: Group, rank: int) -> None:
        """``rank``'s process is out of the running group (it left, or a restart replaced it)."""
        g.members = tuple(r for r in g.members if r != rank)
        g.seen.pop(rank, None)
        g.epoch += 1
        log.info("group %r: epoch %d, members %s", name, g.epoch, g.members)
        if not g.members:
            self._end(name, g)
            return
        for key in list(g.proposals):  # a commit that waited for it may be due now
            self._settle(name, g, key)

    def recover(self, who: Any, req: dict[str, Any], key: str | None = None) -> dict[str, Any] | None:
        """A member re-registers after a coordinator restart (this process knows nothing)."""
        name, rank, world, info, config = self._member(req)
        epoch = _field(req, "epoch", int)
        members = _field(req, "members", list)
        if rank not in members or not all(
            isinstance(r, int) and not isinstance(r, bool) and 0 <= r < world for r in members
        ):
            raise RequestError("field 'members' must list ranks of the group, the sender included")
        if name in self._ended:
            raise RequestError(f"the run of group {name!r} ended; rank {rank} must join anew", "stale")
        g = self.groups.get(name)
        if g is None or not g.started:
            # the first claim after a restart; joins that came before it wait as joiners
            early = {} if g is None else dict(g.members_info)
            if g is None:
                self._make_room()
                self._last_live[name] = self.clock()
            g = self.groups[name] = Group(world, config, rank)
            g.started, g.epoch, g.members = True, epoch, tuple(sorted(set(members)))
            g.joiners, g.recovered, g.recovered_at = early, True, self.clock()
            log.info("group %r recovered from rank %d: epoch %d, members %s", name, rank, epoch, g.members)
        elif g.recovered and epoch > g.epoch and not g.decisions.keys() - g.seeded:
            # a newer view than the claim the group was rebuilt from (that one came from a
            # member that had missed a change): take it, before any new decision was made
            g.epoch, g.members = epoch, tuple(sorted(set(members)))
            for r in [r for r in g.members_info if r not in g.members]:
                g.joiners.setdefault(r, g.members_info.pop(r))
                g.seen.pop(r, None)
        self._check_config(g, rank, world, config)
        if rank not in g.members:
            raise RequestError(f"rank {rank} is not a member of the recovered group", "stale")
        old = g.members_info.get(rank)
        if old is not None and old["incarnation"] != info["incarnation"]:
            raise RequestError(f"rank {rank} is held by another process", "stale")
        self._claim(name, g, rank, info, _conn(who), key)
        g.members_info[rank] = info
        g.seen[rank] = self.clock()
        last = req.get("last")  # this peer's last decision: a slower peer may still ask for it
        if isinstance(last, dict):
            key_l, parts = last.get("key"), last.get("participants")
            if (
                isinstance(key_l, list) and len(key_l) == 3 and isinstance(parts, list)
                and all(isinstance(x, int) and not isinstance(x, bool) for x in key_l + parts)
            ):
                at = (key_l[0], key_l[1], key_l[2])
                if at not in g.decisions:
                    g.decisions[at] = {"participants": sorted(parts), **self._view(g), "waiting": []}
                    g.seeded.add(at)
        for k in list(g.proposals):  # a commit that waited for this member's claim may be due
            self._settle(name, g, k)
        return self._view(g)

    # -- commit ----------------------------------------------------------------------
    def commit(self, who: Any, req: dict[str, Any]) -> dict[str, Any] | None:
        name = _field(req, "group", str)
        g = self.groups.get(name)
        if g is None or not g.started:
            raise RequestError(f"group {name!r} has not started", "unknown")
        rank = _field(req, "rank", int)
        key_l = _field(req, "key", list)
        alive_l = _field(req, "alive", list)
        if len(key_l) != 3 or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in key_l
        ):
            raise RequestError("field 'key' must be three integers")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in alive_l):
            raise RequestError("field 'alive' must list integers")
        key = (key_l[0], key_l[1], key_l[2])
        if key in g.decisions:
            return g.decisions[key]
        if rank not in g.members:  # dropped earlier: the answer is a set without it
            return {"participants": list(g.members), **self._view(g), "waiting": []}
        if rank not in g.members_info or (
            isinstance(req.get("incarnation"), int)
            and req["incarnation"] != g.members_info[rank]["incarnation"]
        ):
            raise RequestError(f"rank {rank} is not registered here: recover first", "unknown")
        g.seen[rank] = self.clock()
        alive = frozenset(alive_l) & frozenset(g.members)
        if rank not in alive:
            raise RequestError("a proposal must include the proposer")
        self._admit_proposal(name, g, rank, key)
        if req.get("admit") is True:
            g.admit.add(key)
        props = g.proposals.setdefault(key, {})
        old = props.get(rank)
        props[rank] = alive if old is None else (old & alive)  # proposals only shrink
        waiters = self._waiting_commit.setdefault((name, key), [])
        waiters.append(who)
        _cap_waiters(waiters, len(g.members))
        self._settle(name, g, key)
        return None

    def _settle(self, name: str, g: Group, key: tuple[int, int, int]) -> None:
        """Decide ``key`` if every rank in the intersection of its proposals has proposed."""
        props = g.proposals.get(key)
        if not props:
            return
        agreed = frozenset.intersection(*props.values()) & frozenset(g.members)
        if agreed <= props.keys() and agreed:
            if agreed != frozenset(g.members) and self._recovering(g):
                return  # it would drop members that may still re-register (with a newer view)
            self._decide(name, g, key, tuple(sorted(agreed)))

    def _recovering(self, g: Group) -> bool:
        """A group rebuilt after a restart whose members have not all re-registered, within
        the grace they need to (two lease renewals and a second). The first claim may come from
        a member that missed a change (one the others dropped while it stalled): a decision
        that drops the others now would split the group, so it waits for their newer claims."""
        # (a rank a new process waits for counts: its old process is gone)
        if not g.recovered or all(r in g.members_info or r in g.joiners for r in g.members):
            return False
        renew = min(3.0, max(0.2, self.lease / 5))
        return self.clock() - g.recovered_at < 2 * renew + 1.0

    def _decide(
        self, name: str, g: Group, key: tuple[int, int, int], parts: tuple[int, ...]
    ) -> None:
        g.proposals.pop(key, None)
        admit = key in g.admit
        g.admit.discard(key)
        # a joiner enters only at a decision that keeps every member (the collective is then
        # complete: no retry among fewer ranks can undo the admission), once the process that
        # held its rank before is out of the membership
        shrank = parts != g.members
        joined: dict[int, dict[str, Any]] = {}
        # nor at a collective begun before the membership last changed outside a commit (a
        # member left, or a restart replaced it): it counted the rank that went, so the
        # survivors run it again among fewer, which would drop the joiner at once
        if admit and not shrank and key[0] >= g.epoch:
            joined = {r: i for r, i in g.joiners.items() if r not in parts}
        if shrank or joined:
            g.epoch += 1
            for r, info in joined.items():
                g.members_info[r] = info
                g.joiners.pop(r)
                g.joined_at[r] = key
                g.seen[r] = self.clock()
            g.members = tuple(sorted(set(parts) | set(joined)))
            log.info(
                "group %r: epoch %d with members %s (participants of %s: %s)",
                name,
                g.epoch,
                g.members,
                key,
                parts,
            )
            view = self._view(g)
            keep = []
            for w, r in self._waiting_join.pop(name, []):
                if r in joined:
                    self._due.append((w, {**view, "joined_at": list(key)}))
                else:
                    keep.append((w, r))
            if keep:
                self._waiting_join[name] = keep
        waiting = sorted(r for r in g.joiners if r not in g.members)
        decision = {"participants": list(parts), **self._view(g), "waiting": waiting}
        g.decisions[key] = decision
        while len(g.decisions) > _KEEP_DECISIONS:
            g.seeded.discard(next(iter(g.decisions)))
            g.decisions.pop(next(iter(g.decisions)))
        for w in self._waiting_commit.pop((name, key), []):
            self._due.append((w, decision))


class Coordinator:
    """The coordinator's socket loop around a :class:`Membership`."""

    def __init__(
        self,
        bind: str = "127.0.0.1:0",
        *,
        security: Any = None,
        lease: float = LEASE_S,
        max_groups: int = MAX_GROUPS,
        abandon_after: float = ABANDON_AFTER_S,
    ) -> None:
        from lowband.transport.security import warn_if_exposed

        ep = Endpoint.parse(bind, "coordinator bind address", any_port=True)
        warn_if_exposed(ep.host, security, "the coordinator")
        self.ctx = zmq.Context()
        self._auth = security.start_authenticator(self.ctx) if security is not None else None
        # linger 0: never block shutdown on replies to dead peers; libzmq drops a peer that
        # sends more than maxmsgsize; with router_mandatory a reply to a vanished client raises
        # instead of vanishing; a client that reconnects with its routing id takes it over
        # (router_handover); ZeroMQ heartbeats close a connection whose process stopped
        # answering, so its ranks' holders count as gone
        self.sock = open_socket(
            self.ctx, zmq.ROUTER, ep, maxmsgsize=MAX_REQUEST_BYTES, router_mandatory=1,
            sndhwm=10000, rcvhwm=10000, router_handover=1,
            heartbeat_ivl=int(_HEARTBEAT_IVL_S * 1000), heartbeat_timeout=int(HOLDER_TIMEOUT_S * 1000),
        )
        if security is not None:
            security.server(self.sock)
        endpoint = ep.url("*" if ep.port == 0 else None)
        try:
            self.sock.bind(endpoint)
        except zmq.ZMQError as e:
            raise TransportError(f"coordinator cannot bind {endpoint!r}: {e}") from e
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.address = self.endpoint.removeprefix("tcp://")
        self.state = Membership(is_live=self._is_live, lease=lease, max_groups=max_groups,
                                abandon_after=abandon_after)

    def _is_live(self, conn: Any) -> bool:
        """Whether a client connection is still there: ROUTER_MANDATORY refuses a message to a
        routing id without one (EHOSTUNREACH). The probe is a reply to no request (``id`` null),
        which clients ignore."""
        if not isinstance(conn, bytes):
            return False
        try:
            self.sock.send_multipart([conn, b'{"id": null, "ok": true}'], zmq.NOBLOCK)
        except zmq.Again:  # connected, its queue full
            return True
        except zmq.ZMQError:
            return False
        return True

    def _reply(self, who: bytes, rid: Any, body: dict[str, Any]) -> None:
        try:
            data = json.dumps({"id": _safe_id(rid), **body}).encode()
        except (ValueError, TypeError, RecursionError) as e:  # never expected: bodies are ours
            log.error("coordinator: cannot encode a reply (%s)", e)
            data = json.dumps({"id": _safe_id(rid), "ok": False, "kind": "error",
                               "error": "internal error"}).encode()
        try:
            self.sock.send_multipart([who, data])
        except zmq.ZMQError as e:  # the client left; it retries if it still cares
            log.debug("coordinator: reply dropped (%s)", e)

    def handle(self, who: bytes, raw: bytes, key: str | None = None) -> None:
        """Answer one request. Nothing a client sends raises out of here. ``key``: the
        client's CURVE public key (z85), ``None`` without CURVE."""
        rid: Any = None
        try:
            if len(raw) > MAX_REQUEST_BYTES:
                raise RequestError(f"request over {MAX_REQUEST_BYTES} bytes")
            req = json.loads(raw)
            if not isinstance(req, dict):
                raise RequestError("request is not a JSON object")
            rid = _safe_id(req.get("id"))
            if _depth(req) > MAX_REQUEST_DEPTH:
                raise RequestError(f"request nested deeper than {MAX_REQUEST_DEPTH}")
            op = req.get("op")
            if op not in ("join", "recover", "ping", "status"):  # those two claim a rank
                self.state.authorize(req, who, key)
            if op == "join":
                out = self.state.join((who, rid), req, key)
            elif op == "commit":
                out = self.state.commit((who, rid), req)
            elif op == "alive":
                out = self.state.alive(req)
            elif op == "leave":
                out = self.state.leave(req)
            elif op == "recover":
                out = self.state.recover((who, rid), req, key)
            elif op == "ping":
                out = {}
            elif op == "status":
                out = self.state.status(req)
            else:
                raise RequestError(f"unknown op {op!r}")
            if out is not None:
                self._reply(who, rid, {"ok": True, **out})
        except RequestError as e:
            self._reply(who, rid, {"ok": False, "kind": e.kind, "error": str(e)})
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: deep JSON
            self._reply(who, rid, {"ok": False, "kind": "error", "error": f"bad request: {e}"})
        except Exception:  # last resort: a bug in the rules must not end the coordinator
            log.exception("coordinator: request failed")
            self._reply(who, rid, {"ok": False, "kind": "error", "error": "internal error"})
        for (w, r), body in self.state.ready():
            self._reply(w, r, {"ok": True, **body})
        for (w, r), why in self.state.ready_errors():
            self._reply(w, r, {"ok": False, "kind": "stale", "error": why})

    def serve(self, *, stop_after: float | None = None, exit_with: int | None = None) -> None:
        """Answer requests until ``stop_after`` seconds have passed or process ``exit_with``
        (the launcher that started this coordinator, e.g. torchrun's agent) has ended."""
        deadline = None if stop_after is None else time.monotonic() + stop_after
        next_check = 0.0
        next_sweep = time.monotonic() + _SWEEP_S
        try:
            while deadline is None or time.monotonic() < deadline:
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + _SWEEP_S
                    try:
                        self.state.sweep()
                    except Exception:  # a bug here must not end the coordinator either
                        log.exception("coordinator: sweep failed")
                    for (w, r), why in self.state.ready_errors():  # waits of forgotten groups
                        self._reply(w, r, {"ok": False, "kind": "stale", "error": why})
                if exit_with is not None and time.monotonic() >= next_check:
                    next_check = time.monotonic() + 1.0
                    if not _alive(exit_with):
                        log.info("coordinator: process %d ended, so does this coordinator", exit_with)
                        return
                if not self.sock.poll(200):
                    continue
                msg = self.sock.recv_multipart(copy=False)
                if len(msg) != 2:
                    log.warning("coordinator: dropped a request of %d frames", len(msg))
                    continue
                key = None
                if self._auth is not None:  # the ZAP handler set User-Id to the client's z85 key
                    try:
                        key = msg[1].get("User-Id")
                    except zmq.ZMQError:
                        log.warning("coordinator: dropped a request without a CURVE user id")
                        continue
                try:
                    self.handle(msg[0].bytes, msg[1].bytes, key)
                except Exception:  # handle() catches everything; this guards the loop itself
                    log.exception("coordinator: a request escaped its handler")
        finally:
            self.close()

    def close(self) -> None:
        self.sock.close(0)
        if self._auth is not None:
            self._auth.stop()
        self.ctx.term()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


class CoordinatorProcess:
    """A coordinator running in a child process; ``stop()`` (or ``with``) ends it."""

    def __init__(self, proc: subprocess.Popen[str], address: str) -> None:
        self.proc, self.address = proc, address

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> CoordinatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_coordinator(
    bind: str = "127.0.0.1:0",
    *,
    args: list[str] | None = None,
    timeout: float = 60.0,
    detach: bool = False,
) -> CoordinatorProcess:
    """Start ``lowband coordinator`` in a child process and return once it listens.

    ``detach``: in a session of its own, so it outlives this process and a Ctrl-C or kill
    of this process's group (pass ``--exit-with PID`` in ``args`` to bound its life); its
    log goes to a file in the temporary directory (named in this process's log), so it
    holds none of this process's output pipes open."""
    cmd = [sys.executable, "-m", "lowband.transport.coordinator", "--bind", bind, *(args or [])]
    stderr: Any = None
    if detach:
        import tempfile

        fd, path = tempfile.mkstemp(prefix="lowband-coordinator-", suffix=".log")
        stderr = fd
        log.info("coordinator log: %s", path)
    try:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=detach,
        )
    finally:
        if stderr is not None:
            os.close(stderr)
    import selectors

    sel = selectors.DefaultSelector()
    assert proc.stdout is not None
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(0.2):
            line = proc.stdout.readline()
            if line.startswith("listening on "):
                return CoordinatorProcess(proc, line.split()[-1].removeprefix("tcp://"))
            if not line:
                break
    proc.kill()
    proc.wait(5)
    raise TransportError(f"coordinator did not start (exit code {proc.poll()})")


def main(argv: list[str]) -> int:
    """``lowband coordinator --bind HOST:PORT [--curve-secret F --allow F...] [--torch-store-port P]``."""
    ap = argparse.ArgumentParser(
        prog="lowband coordinator", description="lowband rendezvous and membership service"
    )
    ap.add_argument(
        "--bind", default="127.0.0.1:29500", help="HOST:PORT to listen on (port 0: any)"
    )
    ap.add_argument("--curve-secret", help="this coordinator's .key_secret file (turns CURVE on)")
    ap.add_argument(
        "--allow", action="append", default=[], help="allowed peer public key file or directory"
    )
    ap.add_argument("--torch-store-port", type=int, help="also host a torch TCPStore on this port")
    ap.add_argument("--max-groups", type=int, default=MAX_GROUPS,
                    help=f"groups held at once (default {MAX_GROUPS}); one more is refused")
    ap.add_argument("--abandon-after", type=float, default=ABANDON_AFTER_S,
                    help="forget a group once its processes have been gone this many seconds")
    ap.add_argument(
        "--lease", type=float, default=LEASE_S,
        help="seconds without a word from every member before a crashed run is over, and from "
        f"one member before its rank is free for a new process (default {LEASE_S:g})",
    )
    ap.add_argument("--stop-after", type=float, help="exit after this many seconds (tests)")
    ap.add_argument(
        "--exit-with", type=int, metavar="PID", help="exit when process PID ends (its launcher)"
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    security = None
    if args.curve_secret:
        from lowband.transport.security import Curve

        security = Curve.from_files(args.curve_secret, allowed=args.allow)
    store = None
    if args.torch_store_port is not None:
        from lowband.transport._torch import serve_store

        # bound to --bind's host alone (torch's own server would listen on every interface)
        host = Endpoint.parse(args.bind, "--bind", any_port=True).host
        store, _ = serve_store(host, args.torch_store_port)
    coord = Coordinator(args.bind, security=security, lease=args.lease,
                        max_groups=args.max_groups, abandon_after=args.abandon_after)
    print(f"listening on {coord.endpoint}", flush=True)
    try:
        coord.serve(stop_after=args.stop_after, exit_with=args.exit_with)
    except KeyboardInterrupt:
        pass
    del store
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
