"""Fetching a snapshot for :class:`~lowband.sync.WeightSubscriber` (the resync half of "Clone").

Chunks are requested ``window`` at a time over the DEALER socket; each reply is
tagged with the sequence number it was read at. Once every chunk is in, the
buffered versions newer than a chunk are replayed onto it; a version that is
needed but missing makes the chunks older than it be fetched again. The result
is checked against the publisher's fingerprint before the model is written.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
import zmq

from lowband.sync._delta import bits, fingerprint
from lowband.sync._staging import Snapshot
from lowband.sync._wire import SNAP_REQ, Header, pack

if TYPE_CHECKING:
    from lowband.sync.subscriber import WeightSubscriber

__all__ = ["SnapshotFetch"]

log = logging.getLogger("lowband.sync.subscriber")


class SnapshotFetch:
    """Snapshot methods of :class:`~lowband.sync.WeightSubscriber` (a mixin over its state)."""

    def _request(self: WeightSubscriber, t: int, c: int) -> None:
        try:  # never blocks: an unsent request counts as lost and is retried after retry_s
            self._dealer.send(pack(Header(SNAP_REQ, tensor=t, chunk=c)), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _wait_first(self: WeightSubscriber) -> None:
        self._snap = None
        self._waiting_first = True

    def _start_snapshot(self: WeightSubscriber) -> None:
        assert self._manifest is not None
        self._rollback()
        self._waiting_first = False
        self.snapshots += 1
        self._snap = Snapshot(self._manifest, window=self.window)
        self._send_requests()

    def _send_requests(self: WeightSubscriber) -> None:
        assert self._snap is not None
        for key in self._snap.next_requests():
            self._request(*key)

    def _advance_snapshot(self: WeightSubscriber) -> int | None:
        snap, m = self._snap, self._manifest
        assert snap is not None and m is not None
        if not snap.received:
            return None
        lo_seq = snap.min_seq()
        missing = [s for s in range(lo_seq + 1, snap.s_max + 1) if not self._complete(s)]
        if missing:  # lost or not yet here: ask again for the chunks that need it
            n = snap.redo_older_than(max(missing))
            log.debug(
                "WeightSubscriber: snapshot needs version(s) %s; refetching %d chunk(s)",
                missing[:4],
                n,
            )
            self._send_requests()
            return None
        target = snap.s_max
        while self._complete(target + 1):
            target += 1
        if self._complete(target):
            version, expected = self._pending[target].version, self._pending[target].finger
        else:
            version, expected = snap.fingers[target]
        if self._origin is not None:  # behind relays: the learner's fingerprint, not theirs
            want = self._origin.finger(self._inc, target)
            if want is None:  # not announced (yet): wait, then fetch a newer snapshot
                if snap.done_at is None:
                    snap.done_at = time.monotonic()
                elif time.monotonic() - snap.done_at > self.retry_s:
                    self._start_snapshot()
                return None
            expected = want
        ops = self._ops(list(range(lo_seq + 1, target + 1)))
        snap.replay(ops, self._codec)
        for i, sums in enumerate(snap.sums()):
            self._sums[i][:] = sums
        got = fingerprint(m.tensors, self._sums)
        if got != expected:  # the model still holds the last good version; fetch again
            self.fingerprint_mismatches += 1
            log.warning(
                "WeightSubscriber: snapshot fingerprint mismatch at version %d; fetching again",
                version,
            )
            if len(self._sources) > 1:
                self._fail_over("its snapshot does not match the fingerprint")
            else:
                self._start_snapshot()
            return None
        self._snap = None
        with torch.no_grad():
            for dst, src in zip(self._targets, snap.staged):
                if dst.dtype == src.dtype:
                    np.copyto(bits(dst), bits(src))
                else:
                    dst.copy_(src)
        return self._commit(target, version, expected, got)
