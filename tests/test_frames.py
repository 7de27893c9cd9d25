"""The one framing helper (issue 14, item 6): ``lowband._frames``.

Hostile inputs (truncated, oversize, another magic or version, lengths that lie) raise the
error type each format names, and every format built on it parses what it packs.
"""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowband._frames import (
    Layout,
    Reader,
    Writer,
    check_lengths,
    join_frames,
    pack_u64s,
    split_frames,
    unpack_u64s,
)
from lowband.errors import CodecError, LowbandError, TransportError

L = Layout("test message", b"LBXX", 3, "BIQ")


def test_layout_round_trip_and_exact_bytes() -> None:
    head = L.pack(7, 1 << 31, (1 << 64) - 1)
    assert head == struct.pack("<4sBBIQ", b"LBXX", 3, 7, 1 << 31, (1 << 64) - 1)
    assert L.size == len(head) == 18
    assert L.unpack(head) == (7, 1 << 31, (1 << 64) - 1)
    assert L.unpack(memoryview(head + b"tail")) == (7, 1 << 31, (1 << 64) - 1)


@pytest.mark.parametrize(
    ("buf", "match"),
    [
        (b"", "0 bytes, 18 expected"),
        (L.pack(1, 2, 3)[:-1], "17 bytes"),
        (b"LBYY" + L.pack(1, 2, 3)[4:], "bad magic b'LBYY': not a lowband test message"),
        (L.pack(1, 2, 3)[:4] + b"\x04" + L.pack(1, 2, 3)[5:], "test message version 4, this lowband speaks 3"),
    ],
)
def test_layout_refuses_short_foreign_and_other_versions(buf: bytes, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        L.unpack(buf)


def test_layout_exact_refuses_trailing_bytes_and_the_error_type_is_the_callers() -> None:
    with pytest.raises(CodecError, match="19 bytes"):
        L.unpack(L.pack(1, 2, 3) + b"x", exact=True)
    t = Layout("frame", b"LBT", 1, "B", error=lambda why: TransportError(f"malformed: {why}"))
    with pytest.raises(TransportError, match="malformed: bad magic"):
        t.unpack(b"XYZ\x01\x00")
    with pytest.raises(ValueError):
        Layout("bad", b"", 1, "B")
    with pytest.raises(ValueError):
        Layout("bad", b"X", 256, "B")


def test_u64_tables_are_bounded() -> None:
    raw = pack_u64s([1, 2, 1 << 63])
    assert unpack_u64s(raw, 0, 3) == (1, 2, 1 << 63)
    assert unpack_u64s(raw, 8, 2) == (2, 1 << 63)
    assert unpack_u64s(b"", 0, 0) == ()
    for off, n in ((0, 4), (8, 3), (-8, 1), (0, -1)):
        with pytest.raises(CodecError, match="truncated"):
            unpack_u64s(raw, off, n)


def test_check_lengths() -> None:
    assert check_lengths([1, 2, 3], what="m", max_frames=3, max_bytes=6) == 6
    with pytest.raises(CodecError, match="4 frames"):
        check_lengths([0] * 4, what="m", max_frames=3, max_bytes=6)
    with pytest.raises(CodecError, match="0 frames"):
        check_lengths([], what="m", min_frames=1, max_frames=3, max_bytes=6)
    with pytest.raises(CodecError, match="negative"):
        check_lengths([5, -1], what="m", max_frames=3, max_bytes=6)
    with pytest.raises(CodecError, match="exceeds the cap of 6"):
        check_lengths([4, 3], what="m", max_frames=3, max_bytes=6)


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=8))
@settings(max_examples=200, deadline=None)
def test_frame_lists_round_trip_and_every_cut_is_refused(frames: list[bytes]) -> None:
    raw = join_frames(frames)
    assert split_frames(raw, what="frames", max_frames=8) == frames
    for cut in range(len(raw)):
        with pytest.raises(CodecError):
            split_frames(raw[:cut], what="frames", max_frames=8)
    with pytest.raises(CodecError):
        split_frames(raw + b"\0", what="frames", max_frames=8)


def test_frame_lists_refuse_lying_counts_and_lengths() -> None:
    with pytest.raises(CodecError, match="announces 9 frames"):
        split_frames(join_frames([b""] * 9), what="frames", max_frames=8)
    with pytest.raises(CodecError, match="announces 0 frames"):
        split_frames(join_frames([]), what="frames", max_frames=8)
    lying = struct.pack("<qqq", 2, -1, 5) + b"abcd"
    with pytest.raises(CodecError, match="inconsistent"):
        split_frames(lying, what="frames", max_frames=8)
    huge = struct.pack("<qq", 1, 1 << 62) + b"x"
    with pytest.raises(CodecError, match="inconsistent"):
        split_frames(huge, what="frames", max_frames=8)


def test_writer_and_reader_agree_and_the_reader_stays_inside_its_bytes() -> None:
    w = Writer(b"\x09")
    w.put("<HQ", 5, 1 << 40)
    w.sized("<I", "h\u00e9".encode())
    w.sized("<BI", b"raw", 6)
    raw = w.bytes()
    r = Reader(raw, "thing", offset=1)
    assert r.take("<HQ") == (5, 1 << 40)
    assert r.text(r.take("<I")[0]) == "h\u00e9"
    assert r.take("<BI") == (6, 3)
    assert bytes(r.bytes(3)) == b"raw"
    assert r.remaining == 0
    r.done()
    with pytest.raises(CodecError, match="truncated thing"):
        r.take("<B")
    with pytest.raises(CodecError, match="truncated name in thing"):
        Reader(b"ab", "thing").bytes(3, what="name")
    with pytest.raises(CodecError, match="thing label is not UTF-8"):
        Reader(b"\xff\xfe", "thing").text(2, what="label")
    with pytest.raises(CodecError, match="is not ASCII"):
        Reader("\u00e9".encode(), "thing").text(2, "ascii")
    with pytest.raises(CodecError, match="trailing bytes after the thing"):
        Reader(b"ab", "thing").done()


def test_every_error_is_a_lowband_error_and_a_builtin() -> None:
    with pytest.raises(LowbandError):
        L.unpack(b"")
    with pytest.raises(ValueError):
        L.unpack(b"")


# -- the formats built on it ----------------------------------------------------------------


def test_each_format_refuses_another_magic_and_version_with_its_error() -> None:
    from lowband.compress import Payload, parse
    from lowband.sync import _wire as sw
    from lowband.sync._tree import dumps
    from lowband.sync.commit import Commitment
    from lowband.sync.rollouts import _PUSH, _pack, _unpack
    from lowband.transport import _wire as tw

    payload = parse("q8").encode(torch.arange(300, dtype=torch.float32)).to_frames()
    cm = Commitment(4, 2, torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.bfloat16))
    cases = [  # (parser, well-formed frames, error type, magic length)
        (Payload.from_frames, payload, CodecError, 4),
        (sw.parse_header, [sw.pack(sw.Header(sw.COMMIT, seq=1))], CodecError, 4),
        (lambda f: _unpack(f, max_bytes=1 << 20), _pack(_PUSH, "w", 1, 2, dumps({"x": 1})), CodecError, 4),
        (lambda f: Commitment.from_bytes(bytes(f[0])), [cm.to_bytes()], CodecError, 4),
        (
            lambda f: tw.parse_header(bytes(f[0]), world_size=2, group=1, max_message_bytes=1 << 20,
                                      max_chunk_size=1 << 20),
            [tw.pack_header(tw.HEARTBEAT, sender=0, group=1, incarnation=1)],
            TransportError,
            3,
        ),
    ]
    for parse_fn, frames, err, m in cases:
        parse_fn(frames)  # well formed: accepted
        head, rest = bytes(frames[0]), list(frames[1:])
        with pytest.raises(err, match="bad magic"):
            parse_fn([b"Z" + head[1:], *rest])
        with pytest.raises(err, match="speaks"):
            parse_fn([head[:m] + bytes([head[m] ^ 0x80]) + head[m + 1 :], *rest])
        for cut in (0, m, m + 1):
            with pytest.raises(err, match="bytes"):
                parse_fn([head[:cut], *rest])


def test_recv_line_reads_one_line_stops_at_the_end_and_is_bounded() -> None:
    import socket

    from lowband._frames import recv_line

    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"route 1 10.0.0.2 ")
        a.sendall(b"5555\n")
        assert recv_line(b) == b"route 1 10.0.0.2 5555\n"
        a.sendall(b"no newline")
        a.shutdown(socket.SHUT_WR)
        assert recv_line(b) == b"no newline"
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"x" * 5000)
        with pytest.raises(TransportError, match="longer than 4096"):
            recv_line(b, limit=4096, error=TransportError)
