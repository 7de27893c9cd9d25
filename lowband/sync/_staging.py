"""Subscriber-side staging: versions being received, and a snapshot being assembled.

Nothing here touches the model: a version is applied only once every message of
it (and of every version before it) is in, and a snapshot is assembled in its own
buffers, so :meth:`WeightSubscriber.update` never leaves the weights half-applied.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from lowband.compress import Codec
from lowband.errors import CodecError
from lowband.sync._delta import Op, apply_op, chunk_sum
from lowband.sync._wire import Header, Manifest

__all__ = ["Pending", "Snapshot", "mark_lost"]


@dataclass
class Pending:
    """The messages of one published version (sequence number) received so far."""

    seq: int
    streams: int
    chunks: dict[int, Op] = field(default_factory=dict)
    commits: set[int] = field(default_factory=set)
    count: int | None = None
    version: int = 0
    finger: int = 0
    bad: bool = False
    #: Ops applied to the model ahead of the commit (in order), and the bytes their undo keeps.
    applied: list[Op] = field(default_factory=list)
    undo_bytes: int = 0

    def add_chunk(self, h: Header, op: Op, limit: int) -> None:
        if h.a >= limit or h.a in self.chunks or (self.count is not None and h.a >= self.count):
            self.bad = (
                True  # a duplicate or impossible message index: this version cannot be trusted
            )
            return
        self.chunks[h.a] = op

    def add_commit(self, h: Header, limit: int) -> None:
        if h.c != self.streams or h.b >= self.streams or h.a > limit:
            raise CodecError(
                f"commit for stream {h.b} of {h.c} with {h.a} messages (streams {self.streams})"
            )
        if self.count is not None and (
            h.a != self.count or h.version != self.version or h.finger != self.finger
        ):
            self.bad = True
        self.count, self.version, self.finger = h.a, h.version, h.finger
        self.commits.add(h.b)
        if any(i >= h.a for i in self.chunks):
            self.bad = True

    @property
    def complete(self) -> bool:
        return (
            not self.bad
            and self.count is not None
            and len(self.commits) == self.streams
            and len(self.chunks) == self.count
        )

    def ordered(self) -> list[Op]:
        return [self.chunks[i] for i in range(len(self.chunks))]


def mark_lost(
    pending: dict[int, Pending], h: Header, seq: int, streams: int, max_pending: int
) -> None:
    """A heartbeat: stream ``h.b`` has sent everything up to ``h.seq``, so any version
    after ``seq`` that still lacks its commit on that stream (or its chunks) is lost."""
    if h.c != streams or h.b >= streams:
        raise CodecError(f"heartbeat for stream {h.b} of {h.c} (streams {streams})")
    for q in range(seq + 1, min(h.seq, seq + max_pending) + 1):
        p = pending.get(q)
        if p is None:
            p = pending[q] = Pending(q, streams)
        if h.b not in p.commits or (len(p.commits) == streams and not p.complete):
            p.bad = True


class Snapshot:
    """A full copy of the weights fetched chunk by chunk, each chunk tagged with its sequence number.

    Chunks may come from different versions (the publisher keeps publishing while
    the snapshot is fetched); the subscriber then replays each buffered version onto
    the chunks older than it.
    """

    def __init__(self, manifest: Manifest, *, window: int) -> None:
        self.manifest = manifest
        self.window = window
        self.staged = [torch.empty(t.numel, dtype=t.dtype) for t in manifest.tensors]
        self.chunk_seq = [
            np.full(manifest.chunks(i), -1, dtype=np.int64) for i in range(len(manifest.tensors))
        ]
        self.todo: deque[tuple[int, int]] = deque(
            (i, c) for i in range(len(manifest.tensors)) for c in range(manifest.chunks(i))
        )
        self.outstanding: dict[tuple[int, int], float] = {}
        self.fingers: dict[int, tuple[int, int]] = {}
        self.s_max = 0
        self.rounds = 0
        #: When every chunk was in but the version's fingerprint was not yet announced.
        self.done_at: float | None = None

    def next_requests(self) -> list[tuple[int, int]]:
        out = []
        now = time.monotonic()
        while self.todo and len(self.outstanding) < self.window:
            key = self.todo.popleft()
            if key in self.outstanding:
                continue
            self.outstanding[key] = now
            out.append(key)
        return out

    def overdue(self, retry_s: float) -> list[tuple[int, int]]:
        now = time.monotonic()
        late = [k for k, t in self.outstanding.items() if now - t > retry_s]
        for k in late:
            self.outstanding[k] = now
        return late

    def fill(self, h: Header, data: memoryview) -> bool:
        """Store a snapshot reply; False if it was not asked for."""
        key = (h.tensor, h.chunk)
        if key not in self.outstanding:
            return False
        lo, hi = self.manifest.chunk_range(h.tensor, h.chunk)
        dst = self.staged[h.tensor][lo:hi]
        if data.nbytes != dst.numel() * dst.element_size():
            raise CodecError(
                f"snapshot chunk of {data.nbytes} bytes, {dst.numel() * dst.element_size()} expected"
            )
        del self.outstanding[key]
        np.copyto(dst.view(torch.uint8).numpy(), np.frombuffer(data, dtype=np.uint8))
        self.chunk_seq[h.tensor][h.chunk] = h.seq
        self.fingers[h.seq] = (h.version, h.finger)
        self.s_max = max(self.s_max, h.seq)
        return True

    @property
    def received(self) -> bool:
        return not self.todo and not self.outstanding

    def min_seq(self) -> int:
        return int(min(s.min() for s in self.chunk_seq))

    def redo_older_than(self, seq: int) -> int:
        """Ask again for every chunk older than ``seq``; how many."""
        redo = [
            (i, c) for i, s in enumerate(self.chunk_seq) for c in np.flatnonzero(s < seq).tolist()
        ]
        self.todo.extend(redo)
        self.rounds += 1
        return len(redo)

    def replay(self, ops: list[tuple[int, Op]], codec: Codec | None) -> None:
        """Apply each buffered version's chunks onto the snapshot chunks older than it."""
        for s, op in ops:
            if self.chunk_seq[op.tensor][op.chunk] < s:
                a, b = self.manifest.chunk_range(op.tensor, op.chunk)
                apply_op(
                    op, self.staged[op.tensor][a:b], self.manifest.tensors[op.tensor].dtype, codec
                )

    def sums(self) -> list[np.ndarray]:
        """XXH3-64 of every staged chunk."""
        out = []
        for i, t in enumerate(self.staged):
            ranges = (self.manifest.chunk_range(i, c) for c in range(self.manifest.chunks(i)))
            out.append(np.array([chunk_sum(t[a:b]) for a, b in ranges], dtype=np.uint64))
        return out
