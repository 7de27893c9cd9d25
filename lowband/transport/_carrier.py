"""The Carrier: the small interface between the collectives and a wire.

The collectives (``_collectives.py``, ``group.py``) are written once against
this interface; each backend supplies one Carrier:

* ``lowband.transport._local.LocalCarrier``: in-process (threads), for unit tests;
* ``lowband.transport._zmq``: ZeroMQ over internet links (parallel streams,
  heartbeats, reconnects, CURVE), with membership in the coordinator process;
* ``lowband.transport._torch.TorchCarrier``: torch.distributed point-to-point (gloo).

A message is addressed by ``(peer, key)`` where ``key = (epoch, seq, phase)``:
the group's membership epoch, the collective's sequence number (the same on
every peer, since every peer issues collectives in the same order) and the
phase inside that collective. A message is a list of frames (``bytes`` or
``memoryview``); the carrier delivers them unchanged, in the same number and
order, never pickled.

Semantics every Carrier honours (the collectives rely on them):

``send(peer, key, frames, *, payload_bytes)``
    Reliable and non-blocking: queues the frames and returns. The carrier may
    keep references to the frames until they are on the wire; callers do not
    modify them afterwards. Counts ``payload_bytes`` (the payload frames only)
    and the transport bytes it actually hands to the wire in ``stats``. Sending
    to a peer already declared lost may raise ``PeerLost`` or drop silently.
``recv(peer, key, *, timeout=None)``
    Waits for the message ``key`` from ``peer`` (messages may arrive in any
    order; the carrier buffers the others) and counts it in ``stats``: the
    payload bytes the sender declared (the carrier carries that number) and the
    transport bytes that arrived. Raises ``PeerLost(peers=(peer,))``
    once the peer is declared lost (neither heartbeat nor progress for the
    carrier's ``peer_timeout``: a slow transfer that moves is not lost), and
    ``CollectiveTimeout`` when ``timeout`` (seconds) runs out first.
``post(peer, key, frame, into)`` (optional)
    A hint that frame ``frame`` of message ``key`` from ``peer`` should land in
    ``into``, a writable buffer of exactly that frame's length, posted before the
    message is received: the carrier may write the frame there as it arrives
    and deliver ``into`` in its place (no copy on the way). ``into`` must stay
    untouched until that ``recv`` returns. A carrier may ignore the hint, and does
    when the frame's length differs; callers check what they got.
``commit(key, alive)``
    Agreement on a participant set. Each surviving member proposes the ranks it
    still considers alive; the call blocks until every member not declared lost
    has proposed for ``key`` and returns the same sorted tuple to every caller:
    the intersection of the proposals, minus ranks declared lost. Members are
    the ranks of the previous commit (all ranks before the first). A caller
    whose own rank is missing from the result has been dropped from the group.
``forget(epoch)``
    Drop buffered messages whose epoch is below ``epoch``, and any that arrive
    later: they belong to collectives that were abandoned.
``alive()``
    The ranks not declared lost (this rank included).
``close()``
    Releases sockets and threads; idempotent; never blocks on unsent data.

Membership (optional; a carrier without these attributes gives a group that only
shrinks): ``members`` (the ranks of the current membership, joiners included
after the commit that admitted them), ``membership_epoch`` (the epoch the
membership service counts, the same on every member), ``joined_at`` (for a
rank that entered a running group: the commit key that admitted it; None for a
rank present from the start) and ``waiting`` (the ranks that wait to be
admitted, as of the last commit). Joiners are admitted only by a commit called
with ``admit=True`` that keeps every member. A joiner's first collective is
``joined_at[1] + 1`` at epoch ``membership_epoch``.

A backend module offers ``open_carrier(*, rank, world_size, store, security,
peer_timeout, **options) -> Carrier``; :func:`lowband.init_group` calls it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from lowband.transport._stats import CommStats

__all__ = ["Key", "Frame", "Carrier"]

#: (epoch, collective sequence number, phase)
Key = tuple[int, int, int]
#: One frame of a message.
Frame = bytes | memoryview


@runtime_checkable
class Carrier(Protocol):
    """What a wire offers the collectives (see the module docstring for the semantics)."""

    rank: int
    world_size: int
    stats: CommStats

    def send(
        self, peer: int, key: Key, frames: Sequence[Frame], *, payload_bytes: int
    ) -> None: ...

    def recv(self, peer: int, key: Key, *, timeout: float | None = None) -> list[Frame]: ...

    def commit(self, key: Key, alive: Sequence[int], *, admit: bool = False) -> tuple[int, ...]: ...

    def forget(self, epoch: int) -> None: ...

    def alive(self) -> set[int]: ...

    def close(self) -> None: ...
