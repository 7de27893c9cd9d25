"""The transport frame header and chunk reassembly: round trips, strict parsing, fuzzing."""

from __future__ import annotations

import os
import random
import time
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowband.errors import TransportError
from lowband.transport._wire import (
    ACK,
    DATA,
    HEARTBEAT,
    chunk_spans,
    pack_header,
    parse_ack,
    parse_header,
)
from lowband.transport._zmq_recv import Inbound

LIMITS = dict(world_size=4, group=7, max_message_bytes=1 << 20, max_chunk_size=4096)


def _chunks(frames: list[bytes], chunk: int, *, sender: int = 1, key=(0, 5, 1), first_seq: int = 1):
    lengths = tuple(len(f) for f in frames)
    seq = first_seq
    out = []
    for i, f in enumerate(frames):
        for off, n in chunk_spans(len(f), chunk):
            head = pack_header(DATA, sender=sender, group=7, incarnation=9, key=key, lengths=lengths,
                               frame_idx=i, link_seq=seq, chunk_size=chunk, offset=off, payload_bytes=sum(lengths))
            out.append((head, f[off : off + n]))
            seq += 1
    return out


def test_header_round_trip() -> None:
    head = pack_header(DATA, sender=3, group=7, incarnation=11, key=(2, 99, 4), lengths=(10, 5000),
                       frame_idx=1, link_seq=42, chunk_size=4096, offset=4096, payload_bytes=5000)
    h = parse_header(head, **LIMITS)
    assert (h.kind, h.sender, h.key, h.lengths, h.frame_idx, h.offset, h.link_seq) == (
        DATA, 3, (2, 99, 4), (10, 5000), 1, 4096, 42)
    hb = parse_header(pack_header(HEARTBEAT, sender=0, group=7, incarnation=1), **LIMITS)
    assert hb.kind == HEARTBEAT and hb.lengths == ()


@pytest.mark.parametrize(
    "why, kw",
    [
        ("sender", dict(sender=4)),
        ("group", dict(group=8)),
        ("cap", dict(lengths=(1 << 21,))),
        ("offset", dict(offset=100)),
        ("chunk", dict(chunk_size=8192)),
        ("tiny chunk", dict(chunk_size=1, lengths=(10,))),  # issue 15.2: 1-byte chunks
        ("seq", dict(link_seq=0)),
        ("frame", dict(frame_idx=3)),
    ],
)
def test_header_rejects(why: str, kw: dict) -> None:
    base = dict(sender=1, group=7, incarnation=1, key=(0, 1, 0), lengths=(10000,), frame_idx=0,
                link_seq=1, chunk_size=4096, offset=0, payload_bytes=10)
    base.update(kw)
    with pytest.raises(TransportError):
        parse_header(pack_header(DATA, **base), **LIMITS)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=700))
def test_random_bytes_raise_only_transport_error(data: bytes) -> None:
    try:
        parse_header(data, **LIMITS)
    except TransportError:
        pass


_VALID = _chunks([b"x" * 9000, b"y" * 3], 4096)[1][0]


def test_mutated_headers_raise_only_transport_error() -> None:
    rng = random.Random(2024)  # 2,000 seeded mutations of a valid header: bytes changed, then cut
    valid = _chunks([b"x" * 9000, b"y" * 3], 4096)[1][0]
    parsed = 0
    for _ in range(2000):
        head = bytearray(valid)
        for _ in range(rng.randint(1, 6)):
            head[rng.randrange(len(head))] = rng.randrange(256)
        cut = len(head) if rng.random() < 0.7 else rng.randrange(len(head))
        try:
            h = parse_header(bytes(head[:cut]), **LIMITS)
        except TransportError:
            continue
        parsed += 1
        assert h.message_bytes <= LIMITS["max_message_bytes"]  # whatever parses respects the caps
    assert 0 < parsed < 2000  # some mutations land in free fields, most are caught


def test_ack_body() -> None:
    assert parse_ack(b"".join(i.to_bytes(8, "little") for i in (3, 4))) == (3, 4)
    with pytest.raises(TransportError):
        parse_ack(b"\x00" * 7)


def _feed(ib: Inbound, chunks) -> list:
    done = []
    for head, body in chunks:
        h = parse_header(head, **LIMITS)
        if ib.seen(h.link_seq):
            continue
        got = ib.accept(h, len(head), memoryview(body))
        if got is not None:
            done.append(got)
    return done


def test_reassembly_in_any_order_with_duplicates() -> None:
    rng = random.Random(0)
    frames = [b"h" * 7, rng.randbytes(50_000), b"", rng.randbytes(4096)]
    chunks = _chunks(frames, 4096)
    shuffled = chunks + chunks[:5]  # five re-sent duplicates
    rng.shuffle(shuffled)
    ib = Inbound(1, 9, max_pending_bytes=1 << 20)
    done = _feed(ib, shuffled)
    assert len(done) == 1
    assert [bytes(f) for f in done[0].frames] == frames
    assert done[0].key == (0, 5, 1) and done[0].payload_bytes == sum(map(len, frames))
    assert ib.pending_bytes == 0 and ib.floor == len(chunks)


def test_contradicting_chunks_are_rejected() -> None:
    ib = Inbound(1, 9, max_pending_bytes=1 << 20)
    a = _chunks([b"a" * 9000], 4096)
    b = _chunks([b"a" * 9001], 4096, first_seq=10)
    _feed(ib, a[:1])
    with pytest.raises(TransportError, match="contradicts"):
        _feed(ib, b[1:2])
    ib2 = Inbound(1, 9, max_pending_bytes=1 << 20)
    _feed(ib2, a[:1])
    again = _chunks([b"a" * 9000], 4096, first_seq=50)[:1]  # same offset, new sequence number
    with pytest.raises(TransportError, match="twice"):
        _feed(ib2, again)
    head, body = a[0]
    with pytest.raises(TransportError, match="body"):
        Inbound(1, 9, max_pending_bytes=1 << 20).accept(parse_header(head, **LIMITS), len(head), memoryview(body[:-1]))


def test_pending_memory_is_capped() -> None:
    ib = Inbound(1, 9, max_pending_bytes=100_000)
    one = _chunks([b"z" * 60_000], 4096, key=(0, 1, 0))
    two = _chunks([b"z" * 60_000], 4096, key=(0, 2, 0), first_seq=100)
    with pytest.raises(TransportError, match="cap"):
        _feed(ib, one[:-1] + two[:-1])  # two unfinished messages of 56 KiB each
    assert ib.pending_bytes <= 100_000


def test_a_huge_claim_costs_only_the_bytes_that_arrived() -> None:
    """Issue 15.2/15.3: a header claiming a 16 GiB message held (and allocated) the whole claim
    at its first chunk and listed every chunk span up front; now only arrived bytes are held."""
    limits = dict(LIMITS, max_message_bytes=1 << 34)
    ib = Inbound(1, 9, max_pending_bytes=1 << 35)
    tracemalloc.start()
    try:
        for k in range(3):
            head = pack_header(DATA, sender=1, group=7, incarnation=9, key=(0, 1, 0), lengths=(1 << 34,),
                               link_seq=1 + k, chunk_size=4096, offset=4096 * 1000 * k, payload_bytes=1 << 34)
            assert ib.accept(parse_header(head, **limits), len(head), memoryview(b"c" * 4096)) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ib.pending_bytes == 3 * 4096
    assert peak < 1 << 20  # the old code built 4M spans and a 16 GiB buffer here


def test_bytes_not_sent_are_not_counted_against_the_cap() -> None:
    """Issue 15.3: the cap is on arrived bytes, so many small first chunks of large claimed
    messages do not exhaust it, and the chunk that would pass it is refused before it is kept."""
    ib = Inbound(1, 9, max_pending_bytes=10 * 4096)
    for k in range(10):
        _feed(ib, _chunks([b"w" * 500_000], 4096, key=(0, k, 0), first_seq=1000 * k + 1)[:1])
    assert ib.pending_bytes == 10 * 4096
    with pytest.raises(TransportError, match="cap"):
        _feed(ib, _chunks([b"w" * 500_000], 4096, key=(0, 99, 0), first_seq=99_001)[:1])
    assert ib.pending_bytes == 10 * 4096


def test_forget_drops_old_epochs() -> None:
    ib = Inbound(1, 9, max_pending_bytes=1 << 20)
    _feed(ib, _chunks([b"q" * 9000], 4096, key=(0, 1, 0))[:1])
    assert ib.pending_bytes > 0
    ib.forget(1)
    assert ib.pending_bytes == 0
    assert _feed(ib, _chunks([b"q" * 10], 4096, key=(0, 2, 0), first_seq=20)) == []
    assert ACK != DATA


# -- the inbox of a real carrier (issue 15.4) ---------------------------------------------


@pytest.fixture(scope="module")
def coordinator():
    from lowband.transport.coordinator import start_coordinator

    with start_coordinator() as co:
        yield co.address


def _pair(address: str, **kw):
    import threading

    from lowband.transport._zmq import ZmqCarrier

    out: list = [None, None]
    name = f"inbox-{os.getpid()}-{random.randrange(1 << 30)}"

    def make(r: int) -> None:
        out[r] = ZmqCarrier(r, 2, coordinator=address, group=name, join_timeout=60, streams=1,
                            chunk_size=64 << 10, peer_timeout=30, **kw)

    ts = [threading.Thread(target=make, args=(r,)) for r in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(90)
    if None in out:
        for c in out:
            if c is not None:
                c.close()
        raise RuntimeError("a carrier did not start")
    return out


def _wait(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


def test_inbox_is_capped_per_peer(coordinator: str) -> None:
    """Messages nobody waits for were kept forever; now a peer's inbox holds at most
    max_inbox_messages / max_inbox_bytes, and the sender is cut off at the cap."""
    a, b = _pair(coordinator, max_inbox_bytes=1 << 20, max_inbox_messages=8)
    try:
        blob = b"m" * (200 << 10)
        for seq in range(1, 11):  # 2 MB of unawaited messages
            a.send(1, (0, seq, 0), [blob], payload_bytes=len(blob))
        assert _wait(lambda: b.io.rejected >= 1)
        use = b._inbox_use[0]
        assert use[0] <= 8 and use[1] <= 1 << 20
        assert sum(len(f) for k, (fs, _, _) in b._inbox.items() for f in fs) == use[1]
        for seq in range(1, use[0] + 1):  # what was taken is intact and frees its room
            assert bytes(b.recv(0, (0, seq, 0), timeout=10)[0]) == blob
        assert b._inbox_use[0] == [0, 0]
    finally:
        a.close()
        b.close()


def test_far_future_epochs_are_refused_and_ahead_is_kept(coordinator: str) -> None:
    a, b = _pair(coordinator)
    try:
        a.send(1, (3, 1, 0), [b"soon"], payload_bytes=4)  # a few epochs ahead: legitimate
        assert bytes(b.recv(0, (3, 1, 0), timeout=10)[0]) == b"soon"
        a.send(1, (10**6, 1, 0), [b"later"], payload_bytes=5)
        assert _wait(lambda: b.io.rejected >= 1)
        assert not b._inbox
    finally:
        a.close()
        b.close()


def test_posted_frame_lands_in_place_and_is_never_held() -> None:
    """Issue 17.1: a posted frame's chunks are copied straight into the posted buffer, in any
    order and with duplicates, hold nothing against the cap, and the buffer is the frame."""
    import numpy as np

    rng = random.Random(1)
    frames = [b"\x00", rng.randbytes(50_000)]
    chunks = _chunks(frames, 4096)
    shuffled = chunks + chunks[2:4]
    rng.shuffle(shuffled)
    into = np.zeros(50_000, dtype=np.uint8)
    ib = Inbound(1, 9, max_pending_bytes=8192)  # far below the message: nothing may be held
    ib.post((0, 5, 1), 1, into)
    done = _feed(ib, shuffled)
    assert len(done) == 1 and bytes(done[0].frames[0]) == b"\x00"
    landed = np.frombuffer(done[0].frames[1], dtype=np.uint8)
    assert landed.ctypes.data == into.ctypes.data and bytes(into) == frames[1]
    assert ib.pending_bytes == 0


def test_a_post_after_the_first_chunks_moves_them_and_a_wrong_size_is_ignored() -> None:
    import numpy as np

    frames = [b"\x00", os.urandom(20_000)]
    chunks = _chunks(frames, 4096)
    ib = Inbound(1, 9, max_pending_bytes=1 << 20)
    _feed(ib, chunks[:3])
    held = ib.pending_bytes
    assert held > 0
    into = np.zeros(20_000, dtype=np.uint8)
    ib.post((0, 5, 1), 1, into)
    assert ib.pending_bytes < held  # frame 1's chunks moved into the posted buffer
    done = _feed(ib, chunks[3:])
    assert bytes(into) == frames[1] and ib.pending_bytes == 0
    assert np.frombuffer(done[0].frames[1], dtype=np.uint8).ctypes.data == into.ctypes.data
    # a posting of the wrong size is ignored: the frame arrives as received
    ib2 = Inbound(1, 9, max_pending_bytes=1 << 20)
    wrong = np.zeros(19_999, dtype=np.uint8)
    ib2.post((0, 5, 1), 1, wrong)
    done = _feed(ib2, _chunks(frames, 4096, first_seq=100))
    assert bytes(done[0].frames[1]) == frames[1] and not wrong.any()


def test_withdrawn_posting_stops_writing_into_the_buffer() -> None:
    """An abandoned collective withdraws its postings: a message half landed is dropped and
    its later chunks never touch the caller's buffer again."""
    import numpy as np

    frames = [b"\x00", os.urandom(20_000)]
    chunks = _chunks(frames, 4096)
    ib = Inbound(1, 9, max_pending_bytes=1 << 20)
    into = np.zeros(20_000, dtype=np.uint8)
    ib.post((0, 5, 1), 1, into)
    _feed(ib, chunks[:3])
    ib.unpost((0, 5, 1))
    into[:] = 7
    assert _feed(ib, chunks[3:]) == []
    assert (into == 7).all() and ib.pending_bytes == 0 and ib.floor == len(chunks)
