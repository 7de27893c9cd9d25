"""Framing: the one way lowband writes and checks the fixed headers of its wire formats.

Every lowband message is a list of frames whose first frame starts with a fixed
little-endian header: a magic, a one-byte version (four in the checkpoint file's),
then fixed-width fields. The payload (``LBND``), the ZeroMQ transport (``LBT``), weight
sync (``LBSY``), rollouts (``LBRO``) and the checkpoint file's prefix (``LBCKPT``) all
describe theirs as a :class:`Layout`, and read variable parts (length tables, manifests,
nested structures) through a bounded :class:`Reader`.
The checks live here once, in one order (size, magic, version, counts, lengths, caps),
and raise the error type the caller names (a :mod:`lowband.errors` class, or a
function that builds one). The bytes are those each format always had: this module
only packs and checks them.

A leaf module, like :mod:`lowband.errors`: compress, transport, optim and sync all
use it, and it imports nothing of lowband but the errors.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from typing import Any

from lowband.errors import CodecError

__all__ = [
    "Layout",
    "Reader",
    "Writer",
    "check_lengths",
    "join_frames",
    "pack_u64s",
    "recv_line",
    "split_frames",
    "unpack_u64s",
]

#: An error class or a function ``str -> exception`` (a prefix, say).
ErrorFactory = Callable[[str], Exception]

_U64 = struct.Struct("<Q")


@lru_cache(maxsize=256)
def _struct(fmt: str) -> struct.Struct:
    return struct.Struct(fmt)


class Layout:
    """A fixed header: ``magic``, a u8 ``version``, then ``fields`` (struct codes, little-endian).

    ``version_code="I"``: a u32 version (the checkpoint file's prefix).

    ``what`` names the message in errors (``"sync message"``); ``version_name`` names the
    version field (``"wire version"``, ``"protocol"``); ``error`` builds the exception.
    """

    __slots__ = ("what", "magic", "version", "version_name", "error", "struct", "size", "pack")

    def __init__(
        self,
        what: str,
        magic: bytes,
        version: int,
        fields: str,
        *,
        version_name: str = "version",
        version_code: str = "B",
        error: ErrorFactory = CodecError,
    ) -> None:
        if not magic or version_code not in ("B", "I") or not 0 <= version < 1 << (8 * _struct(version_code).size):
            raise ValueError(f"layout {what}: a magic and a u8 or u32 version are needed")
        self.what = what
        self.magic = magic
        self.version = version
        self.version_name = version_name
        self.error = error
        self.struct = struct.Struct(f"<{len(magic)}s{version_code}{fields}")
        self.size = self.struct.size
        #: ``pack(*fields)``: the header bytes, magic, version, then ``fields`` in order (a
        #: partial of the struct's own pack: no Python frame on the send path)
        self.pack: Callable[..., bytes] = partial(self.struct.pack, magic, version)

    def unpack(self, buf: Any, *, exact: bool = False) -> tuple:
        """The fields after magic and version; ``error`` when ``buf`` is short (or, with
        ``exact``, not exactly the header), has another magic or another version."""
        n = buf.nbytes if type(buf) is memoryview else len(buf)
        if n < self.size or (exact and n != self.size):
            raise self.error(f"{self.what} header of {n} bytes, {self.size} expected")
        vals = self.struct.unpack_from(buf, 0)
        if vals[0] != self.magic:
            raise self.error(f"bad magic {bytes(vals[0])!r}: not a lowband {self.what}")
        if vals[1] != self.version:
            raise self.error(
                f"{self.what} {self.version_name} {vals[1]}, this lowband speaks {self.version}"
            )
        return vals[2:]

    def fail(self, why: str) -> Exception:
        """``error`` for a flaw found by the caller's own checks of this message."""
        return self.error(why)


def pack_u64s(values: Sequence[int]) -> bytes:
    """``values`` as consecutive little-endian u64 (a length or checksum table)."""
    return _struct(f"<{len(values)}Q").pack(*values)


def unpack_u64s(
    buf: Any, offset: int, count: int, *, what: str = "table", error: ErrorFactory = CodecError
) -> tuple[int, ...]:
    """``count`` u64 from ``buf`` at ``offset``; ``error`` if they run past its end."""
    if offset < 0 or count < 0:
        raise error(f"truncated {what}: {count} u64 at {offset}")
    try:
        return struct.unpack_from(f"<{count}Q", buf, offset)
    except struct.error:
        raise error(f"truncated {what}: {count} u64 at {offset} in {memoryview(buf).nbytes} bytes") from None


def check_lengths(
    lengths: Sequence[int],
    *,
    what: str,
    max_frames: int,
    max_bytes: int,
    min_frames: int = 0,
    error: ErrorFactory = CodecError,
) -> int:
    """The total of a frame-length table; ``error`` unless it holds ``min_frames..max_frames``
    lengths, none negative, and the total is at most ``max_bytes``."""
    if not min_frames <= len(lengths) <= max_frames:
        raise error(f"{what} of {len(lengths)} frames (allowed {min_frames}..{max_frames})")
    total = sum(lengths)
    if total > max_bytes:
        raise error(f"{what} of {total} bytes exceeds the cap of {max_bytes}")
    if lengths and min(lengths) < 0:
        raise error(f"{what} with a negative frame length")
    return total


def join_frames(frames: Sequence[Any]) -> bytes:
    """Frames as one buffer: count (i64), each length (i64), then the bytes (see split_frames)."""
    parts = [bytes(memoryview(f)) for f in frames]
    return _struct(f"<{len(parts) + 1}q").pack(len(parts), *(len(p) for p in parts)) + b"".join(parts)


def split_frames(
    raw: bytes, *, what: str, max_frames: int, min_frames: int = 1, error: ErrorFactory = CodecError
) -> list[bytes]:
    """The frames :func:`join_frames` wrote; ``error`` on a count outside
    ``min_frames..max_frames``, a negative length or lengths that do not add up."""
    if len(raw) < 8:
        raise error(f"truncated {what}")
    (n,) = _struct("<q").unpack_from(raw, 0)
    if not min_frames <= n <= max_frames or len(raw) < 8 * (n + 1):
        raise error(f"{what} announces {n} frames")
    lengths = _struct(f"<{n}q").unpack_from(raw, 8)
    pos = 8 * (n + 1)
    if min(lengths, default=0) < 0 or pos + sum(lengths) != len(raw):
        raise error(f"{what} has inconsistent frame lengths")
    frames = []
    for ln in lengths:
        frames.append(raw[pos : pos + ln])
        pos += ln
    return frames


def recv_line(sock: Any, *, limit: int = 1 << 20, error: ErrorFactory = CodecError) -> bytes:
    """Bytes read from stream socket ``sock`` up to and including the first newline (what
    came before the end of the stream if it ends first); ``error`` once ``limit`` bytes
    have come without one. The framing of the link emulator's one-line control requests."""
    data = b""
    while not data.endswith(b"\n"):
        if len(data) > limit:
            raise error(f"control line longer than {limit} bytes")
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


class Writer:
    """Builds the variable part of a message: fixed fields and length-prefixed byte strings,
    the counterpart of :class:`Reader`."""

    __slots__ = ("out",)

    def __init__(self, start: bytes = b"") -> None:
        self.out = bytearray(start)

    def put(self, fmt: str, *values: Any) -> None:
        """``values`` packed with struct format ``fmt`` (``<`` included)."""
        self.out += _struct(fmt).pack(*values)

    def sized(self, fmt: str, data: bytes, *lead: Any) -> None:
        """``lead`` values, then ``len(data)``, both with ``fmt``, then ``data`` itself."""
        self.out += _struct(fmt).pack(*lead, len(data))
        self.out += data

    def bytes(self) -> bytes:
        return bytes(self.out)


class Reader:
    """A bounded cursor over untrusted bytes: every read checks it stays inside ``buf``."""

    __slots__ = ("buf", "off", "what", "error")

    def __init__(self, buf: Any, what: str, *, error: ErrorFactory = CodecError, offset: int = 0) -> None:
        self.buf = memoryview(buf).cast("B")
        self.off = offset
        self.what = what
        self.error = error

    @property
    def remaining(self) -> int:
        return self.buf.nbytes - self.off

    def take(self, fmt: str) -> tuple:
        """Values of struct format ``fmt`` (little-endian, ``<`` included) at the cursor."""
        s = _struct(fmt)
        if self.off + s.size > self.buf.nbytes:
            raise self.error(f"truncated {self.what}")
        vals = s.unpack_from(self.buf, self.off)
        self.off += s.size
        return vals

    def bytes(self, n: int, *, what: str = "") -> memoryview:
        """The next ``n`` bytes (a view)."""
        if n < 0 or self.off + n > self.buf.nbytes:
            raise self.error(f"truncated {what + ' in ' if what else ''}{self.what}")
        self.off += n
        return self.buf[self.off - n : self.off]

    def text(self, n: int, encoding: str = "utf-8", *, what: str = "string") -> str:
        """The next ``n`` bytes decoded; ``error`` when they are not ``encoding``."""
        raw = self.bytes(n, what=what)
        try:
            return bytes(raw).decode(encoding)
        except UnicodeDecodeError:
            raise self.error(f"{self.what} {what} is not {encoding.upper()}") from None

    def done(self) -> None:
        """``error`` when bytes are left after the last field."""
        if self.off != self.buf.nbytes:
            raise self.error(f"trailing bytes after the {self.what}")
