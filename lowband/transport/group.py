"""``Group``: the collectives a trainer calls, run on a background thread per group.

Each call (``all_reduce``, ``all_gather``, ``broadcast``) takes a sequence number
on the caller's thread, snapshots its input and returns a :class:`Work` at once;
one worker thread runs the collectives in order over the group's Carrier, so
communication overlaps the caller's compute. ``Work.wait()`` gives the result.

Faults (DESIGN.md, "Faults and membership"):

* ``on_failure="raise"``: a lost participant makes the collective raise
  ``PeerLost`` naming it (on every survivor that needed it).
* ``on_failure="drop"``: every collective ends with a commit of its participant
  set through the Carrier (the coordinator for ZeroMQ). If the committed set
  differs from the one used, the group moves to a new epoch and the collective
  runs again among the committed ranks alone (each survivor still holds its
  snapshot), so every survivor returns the same bits and ``Work.participants``
  names who took part. A rank missing from the committed set raises ``PeerLost``.

Joining a running group (``on_failure="drop"``): a process that starts while the
group runs (a restart, or a late rank) waits in ``init_group`` until the members
call :meth:`Group.admit` at a boundary of their choosing (the optimizers do it
after a sync, when the last commit listed ranks in ``waiting``). The admission
is a commit of its own, so it never lands in the middle of another collective:
the joiner's first collective is the one after it, and the members know it.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from lowband.errors import (
    CodecError,
    CollectiveTimeout,
    ConfigError,
    ConfigMismatch,
    PeerLost,
    TransportError,
)
from lowband.transport import _collectives as C
from lowband.transport._carrier import Carrier
from lowband.transport._robust import robust_rule
from lowband.transport._stats import CommStats

if TYPE_CHECKING:
    from lowband.compress import Codec, ErrorFeedback, Payload

__all__ = ["Group", "Work"]

log = logging.getLogger(__name__)
T = TypeVar("T")
#: Phase number of the commit that ends a collective (apart from data phases).
COMMIT_PHASE = 1 << 16
ON_FAILURE = ("raise", "drop")


class Work(Generic[T]):
    """Handle of a collective in flight: ``wait()`` returns its result or raises its error.

    ``stats`` counts this collective alone (its messages, run time and the time waited
    on it; see :mod:`lowband.transport._stats`), complete once it is done.
    """

    def __init__(self, stats: CommStats, rank: int = -1) -> None:
        self._stats = stats
        self.stats = CommStats()
        self._rank = rank
        self._done = threading.Event()
        self._result: T | None = None
        self._error: BaseException | None = None
        #: Ranks whose inputs the result was computed from (set when done).
        self.participants: tuple[int, ...] = ()
        self._callbacks: list[Callable[[Work[T]], None]] = []
        self._cb_lock = threading.Lock()
        #: Ranks waiting to join, as of this collective's commit (the same on every member).
        self.waiting: tuple[int, ...] = ()

    def done(self) -> bool:
        return self._done.is_set()

    def add_done_callback(self, fn: Callable[[Work[T]], None]) -> None:
        """Call ``fn(work)`` once the collective has finished (at once if it has), on the
        group's worker thread: keep it short, and do not wait on other collectives in it."""
        with self._cb_lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def future(self) -> torch.futures.Future[T]:
        """A ``torch.futures.Future`` that the transport completes with the result (or the
        error): what a DDP communication hook returns so that DDP overlaps buckets."""
        fut: torch.futures.Future[T] = torch.futures.Future()

        def complete(w: Work[T]) -> None:
            if w._error is not None:
                fut.set_exception(w._error)  # type: ignore[arg-type]  # torch stubs type it as T
            else:
                fut.set_result(w._result)  # type: ignore[arg-type]

        self.add_done_callback(complete)
        return fut

    def wait(self, timeout: float | None = None) -> T:
        t0 = time.perf_counter()
        finished = self._done.wait(timeout)
        waited = time.perf_counter() - t0
        self._stats.count_time(waited=waited)
        self.stats.count_time(waited=waited)
        if not finished:
            raise CollectiveTimeout(f"collective not finished after {timeout}s (it keeps running)")
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    def _finish(
        self, result: T | None, error: BaseException | None, participants: tuple[int, ...],
        waiting: tuple[int, ...] = (),
    ) -> None:
        self._result, self._error, self.participants = result, error, participants
        self.waiting = waiting
        with self._cb_lock:
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # a callback's bug must not stop the group's worker
                log.exception("rank %d: a collective's done callback failed", self._rank)


class Group:
    """A set of ranks that run collectives together over one :class:`Carrier`.

    Build one with :func:`lowband.init_group` (or ``lowband.testing.ThreadGroup``).
    ``timeout`` bounds each receive: a peer silent that long is treated as lost even if
    its heartbeats still arrive (None: rely on the carrier's ``peer_timeout`` alone);
    ``max_payload_bytes`` caps what a peer may make this rank accept in one message.
    """

    def __init__(
        self,
        carrier: Carrier,
        *,
        on_failure: str = "raise",
        timeout: float | None = None,
        max_payload_bytes: int = 1 << 34,
    ) -> None:
        if on_failure not in ON_FAILURE:
            raise ConfigError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
        self.carrier = carrier
        self.on_failure = on_failure
        self.timeout = timeout
        self.max_payload_bytes = max_payload_bytes
        self.epoch = 0
        self.participants: tuple[int, ...] = tuple(range(carrier.world_size))
        self._seq = 0
        #: The commit key that admitted this rank into a running group (None: there from the start).
        self.joined_at = getattr(carrier, "joined_at", None)
        if self.joined_at is not None:
            self.epoch = int(carrier.membership_epoch)  # type: ignore[attr-defined]
            self._seq = int(self.joined_at[1])
            self.participants = tuple(carrier.members)  # type: ignore[attr-defined]
        self._lock = threading.Lock()
        #: receive space the fp32 all-reduce reuses (fresh pages cost more than the copy)
        self._scratch = C.Scratch()
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def rank(self) -> int:
        return self.carrier.rank

    @property
    def world_size(self) -> int:
        return self.carrier.world_size

    @property
    def stats(self) -> CommStats:
        return self.carrier.stats

    def __repr__(self) -> str:
        return f"Group(rank={self.rank}, world_size={self.world_size}, epoch={self.epoch}, participants={self.participants})"

    # -- collectives ----------------------------------------------------------------------

    def all_reduce(
        self,
        tensor: torch.Tensor,
        codec: Codec | str | None = None,
        *,
        op: str = "mean",
        error_feedback: ErrorFeedback | None = None,
        key: str = "",
        out: torch.Tensor | None = None,
    ) -> Work[torch.Tensor]:
        """Reduce ``tensor`` over the group; ``wait()`` gives an fp32 tensor of its shape.

        ``op``: ``"mean"`` (over the participants), ``"sum"``, or a robust rule
        (``"trimmed_mean"``, ``"median"``, ``"norm_clip"``; dense codecs only).
        ``codec=None`` sends fp32. With ``error_feedback``, what the codec did
        not send is kept under ``key`` and added next time (its codec must be
        ``codec``). The input is snapshotted now and never modified. ``out``: a
        contiguous fp32 CPU tensor of as many values, which receives the snapshot
        now and the result when done (``wait()`` returns it, reshaped); without it
        the result is a new tensor.
        """
        codec_obj = _resolve_codec(codec, error_feedback)
        rule = robust_rule(op)
        if rule is not None and codec_obj is not None and codec_obj.sparse:
            raise ConfigError(f"op={op!r} needs a dense codec; {codec_obj} sends a subset of positions")
        if not tensor.is_floating_point():
            raise ConfigError(f"all_reduce needs a floating point tensor, got {tensor.dtype}")
        shape, device = tensor.shape, tensor.device
        if out is None:
            flat = tensor.detach().reshape(-1).to(device="cpu", dtype=torch.float32, copy=True)
        else:
            if out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous() or out.numel() != tensor.numel():
                raise ConfigError(f"out must be a contiguous fp32 CPU tensor of {tensor.numel()} values")
            if out.data_ptr() == tensor.data_ptr() and tensor.dtype == torch.float32:
                flat = out.view(-1)  # reduce in place: the snapshot is already there
            else:
                flat = out.view(-1)
                flat.copy_(tensor.detach().reshape(-1))

        before: list[torch.Tensor] = []  # the residual as it was before the first attempt

        def body(rnd: C.Round) -> torch.Tensor:
            residual = None if error_feedback is None else error_feedback.residual(key, flat)
            if residual is not None and self.on_failure == "drop":
                # a retry (after a drop) must start from the same residual, or the failed
                # attempt's leftover would add this input a second time
                if before:
                    residual.copy_(before[0])
                else:
                    before.append(residual.clone())
            result = C.all_reduce(
                rnd,
                flat,
                codec=codec_obj,
                mean=op == "mean",
                residual=residual,
                decay=1.0 if error_feedback is None else error_feedback.decay,
                robust=rule,
                send_norm=op == "norm_clip",
                # a retry (drop mode) needs the input again; otherwise the snapshot becomes the result
                inplace=self.on_failure == "raise",
                scratch=self._scratch,
            )
            if result.data_ptr() != flat.data_ptr() and out is not None:
                flat.copy_(result)
                result = flat
            return result.view(shape) if out is not None else result.view(shape).to(device)

        return self._submit(body, phases=(0, 1))

    def all_gather(self, payload: Payload) -> Work[list[Payload | None]]:
        """Every rank's payload, indexed by rank (None for a rank that did not take part)."""

        def body(rnd: C.Round) -> list[Payload | None]:
            got = C.all_gather(rnd, payload)
            return [got.get(r) if r in rnd.participants else None for r in range(self.world_size)]

        return self._submit(body, phases=(0,))

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Work[torch.Tensor]:
        """Fill ``tensor`` in place on every rank with ``src``'s values; ``wait()`` returns it."""
        if not 0 <= src < self.world_size:
            raise ConfigError(f"src {src} outside [0, {self.world_size})")
        snapshot = tensor.detach().clone() if self.rank == src else tensor

        def body(rnd: C.Round) -> torch.Tensor:
            if src not in rnd.participants:
                raise PeerLost(f"broadcast source {src} is not in the group", peers=(src,))
            if self.rank == src:
                C.broadcast(rnd, snapshot, src)
                return tensor
            return C.broadcast(rnd, tensor, src)

        return self._submit(body, phases=(0,))

    @property
    def waiting(self) -> tuple[int, ...]:
        """Ranks waiting to join, as of the last commit (``on_failure="drop"`` only)."""
        return tuple(getattr(self.carrier, "waiting", ()))

    def admit(self) -> Work[tuple[int, ...]]:
        """Collective: let in the ranks waiting to join; ``wait()`` gives the ranks admitted.

        Every member must call it at the same point (between two collectives it chooses, for
        an optimizer after a sync). The joiners' first collective is the next one. Only with
        ``on_failure="drop"`` (in raise mode a group never changes; the result is ``()``).
        """
        return self._submit(lambda rnd: (), phases=(), admit=True)

    def exchange(self, blob: bytes) -> Work[dict[int, bytes]]:
        """Every participant's small blob (at most 1 MiB), by rank."""
        if len(blob) > 1 << 20:
            raise ConfigError(f"exchange takes blobs of at most 1 MiB, got {len(blob)} bytes")
        return self._submit(lambda rnd: C.exchange_blobs(rnd, blob), phases=(0,))

    def share(self, blob: bytes | None, *, to: tuple[int, ...]) -> Work[tuple[int, bytes | None]]:
        """The lowest participant outside ``to`` sends its ``blob`` to the participants in
        ``to``; ``wait()`` gives ``(sender, bytes)`` there and ``(sender, None)`` elsewhere.
        Every rank outside ``to`` passes its blob, so any of them can be the sender (if the
        first one is lost, the retry takes the next)."""
        newcomers = tuple(to)
        if self.rank not in newcomers and blob is None:
            raise ConfigError("a rank outside `to` must pass the blob it would send")
        data = b"" if blob is None else bytes(blob)

        def body(rnd: C.Round) -> tuple[int, bytes | None]:
            dst = [r for r in rnd.participants if r in newcomers]
            src = [r for r in rnd.participants if r not in newcomers]
            if not src:
                raise PeerLost("no participant is left to send the state", peers=newcomers)
            sender = src[0]
            if self.rank == sender:
                for peer in dst:
                    rnd.send(peer, 0, [data], payload_bytes=len(data))
                rnd.check_lost()
                return sender, None
            if self.rank in dst:
                _, frames = rnd.recv(sender, 0)
                return sender, b"".join(bytes(f) for f in frames)
            return sender, None

        return self._submit(body, phases=(0,))

    def barrier(self, timeout: float | None = None) -> None:
        """Return once every participant has reached this barrier."""
        self._submit(lambda rnd: C.exchange_blobs(rnd, b""), phases=(0,)).wait(timeout)

    def verify(
        self,
        config: Mapping[str, Any],
        *,
        timeout: float | None = None,
        stats: CommStats | None = None,
    ) -> None:
        """Check that every peer passes the same ``config``; ConfigMismatch names the difference.

        Collective: every rank must call it at the same point. ``init_group`` checks
        versions this way; optimizers check their settings and parameter shapes. With
        ``stats``, the exchange's counts are added to it.
        """
        try:
            blob = json.dumps(config, sort_keys=True, default=str).encode()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config cannot be serialised for the handshake: {e}") from None

        def body(rnd: C.Round) -> dict[int, bytes]:
            return C.exchange_blobs(rnd, blob)

        work = self._submit(body, phases=(0,))
        try:
            blobs = work.wait(timeout)
        finally:
            if stats is not None and work.done():
                stats.add(work.stats)
        mine = json.loads(blob)
        for r in sorted(blobs):
            if r == self.rank:
                continue
            try:
                theirs = json.loads(blobs[r])
            except ValueError:
                raise ConfigMismatch(f"rank {r} sent an unreadable handshake") from None
            diff = _differences(mine, theirs)
            if diff:
                raise ConfigMismatch(f"rank {self.rank} and rank {r} disagree: " + "; ".join(diff))

    def close(self) -> None:
        """Stop the worker (after the collectives already queued) and close the carrier."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=60)
        self.carrier.close()

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- machinery ------------------------------------------------------------------------

    def _submit(
        self, body: Callable[[C.Round], T], *, phases: tuple[int, ...], admit: bool = False
    ) -> Work[T]:
        if self._closed:
            raise TransportError("the group is closed")
        work: Work[T] = Work(self.stats, self.rank)
        with self._lock:
            self._seq += 1
            self._jobs.put((self._seq, body, phases, work, admit))
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker, name=f"lowband-group-{self.rank}", daemon=True)
                self._thread.start()
        return work

    def _worker(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            seq, body, phases, work, admit = job
            t0 = time.perf_counter()
            try:
                with self.stats.tracking(work.stats):
                    result, participants = self._run(seq, body, phases, admit)
                error = None
            except BaseException as e:  # handed to the caller through wait()
                log.debug("rank %d: collective %d failed: %r", self.rank, seq, e)
                result, participants, error = None, self.participants, e
            took = time.perf_counter() - t0
            self.stats.count_time(in_comm=took)
            work.stats.count_time(in_comm=took)
            work._finish(result, error, participants, self.waiting if error is None else ())

    def _run(
        self, seq: int, body: Callable[[C.Round], T], phases: tuple[int, ...], admit: bool = False
    ) -> tuple[T, tuple[int, ...]]:
        while True:
            rnd = C.Round(
                self.carrier,
                self.epoch,
                seq,
                self.participants,
                phases=phases,
                timeout=self.timeout,
                max_bytes=self.max_payload_bytes,
            )
            result: T | None = None
            ok = False
            suspects: set[int] = set()
            lost_error: PeerLost | None = None
            try:
                result = body(rnd)
                ok = True
            except PeerLost as e:
                lost_error = e
                suspects = set(e.peers) | rnd.lost
                rnd.abort(sorted(suspects))
                if self.on_failure == "raise":
                    raise
            except C.Aborted as e:
                rnd.abort(e.lost)
                if self.on_failure == "raise":
                    raise PeerLost(f"peer {e.peer} gave up: it lost {list(e.lost)}", peers=e.lost) from None
            except CodecError as e:
                # malformed bytes: release the others; in drop mode, drop the peer that sent them
                bad = getattr(e, "peer", None)
                rnd.abort([] if bad is None else [bad])
                if self.on_failure == "raise" or bad is None:
                    raise
                log.warning("rank %d: collective %d: %s", self.rank, seq, e)
                suspects = {bad}
            if self.on_failure == "raise":
                return result, rnd.participants  # type: ignore[return-value]
            alive = (set(rnd.participants) & self.carrier.alive()) - suspects - rnd.lost
            key = (self.epoch, seq, COMMIT_PHASE)
            if admit:
                committed = tuple(self.carrier.commit(key, sorted(alive), admit=True))
            else:
                committed = tuple(self.carrier.commit(key, sorted(alive)))
            if self.rank not in committed:
                raise PeerLost(f"rank {self.rank} was dropped from the group at epoch {self.epoch}", peers=(self.rank,))
            changed = committed != rnd.participants
            members = tuple(getattr(self.carrier, "members", committed))
            epoch = getattr(self.carrier, "membership_epoch", None)
            if epoch is None:  # a carrier without membership: count epochs here
                epoch = self.epoch
            if changed:  # a retry never reuses the keys of the attempt it replaces
                epoch = max(int(epoch), self.epoch + 1)
            if ok and not changed:
                self._enter(int(epoch), members)
                if admit:  # the ranks let in: members now that were not participants
                    result = tuple(r for r in members if r not in committed)  # type: ignore[assignment]
                return result, committed  # type: ignore[return-value]
            if not changed:
                if lost_error is not None:  # it needs a rank that is already out (a broadcast's source)
                    raise lost_error
                raise TransportError(f"collective {seq} failed but the participant set did not change")
            lost = sorted(set(rnd.participants) - set(committed))
            log.warning("rank %d: dropping ranks %s, collective %d runs again at epoch %d", self.rank, lost, seq, epoch)
            self._enter(int(epoch), committed)

    def _enter(self, epoch: int, participants: tuple[int, ...]) -> None:
        if participants != self.participants:
            log.info("rank %d: epoch %d, participants %s", self.rank, epoch, participants)
        if epoch != self.epoch:
            self.carrier.forget(epoch)
        self.epoch, self.participants = epoch, participants


def _resolve_codec(codec: Codec | str | None, ef: ErrorFeedback | None) -> Codec | None:
    if isinstance(codec, str):
        from lowband.compress import parse

        codec = parse(codec)
    if ef is not None:
        if codec is None:
            codec = ef.codec
        elif codec.spec != ef.codec.spec:
            raise ConfigError(f"error_feedback is for codec {ef.codec}, the all_reduce uses {codec}")
    return codec


def _differences(mine: Any, theirs: Any, path: str = "") -> list[str]:
    if isinstance(mine, dict) and isinstance(theirs, dict):
        out: list[str] = []
        for k in sorted(set(mine) | set(theirs)):
            p = f"{path}.{k}" if path else str(k)
            if k not in theirs:
                out.append(f"{p}: only this rank has it ({mine[k]!r})")
            elif k not in mine:
                out.append(f"{p}: only the other rank has it ({theirs[k]!r})")
            else:
                out += _differences(mine[k], theirs[k], p)
        return out
    if mine != theirs:
        return [f"{path or 'value'}: {mine!r} here, {theirs!r} there"]
    return []
