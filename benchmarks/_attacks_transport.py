"""Attacks on the ZeroMQ transport (issue 15 items 2, 3, 4), against a real victim process on
loopback.

The victim is rank 1 of a group of 3 in a child process; ranks 0 and 2 are carriers in this
process. Rank 0 is the legitimate peer: after each attack it sends the victim a message and
must get it back reversed (an echo the victim serves), and must not have lost the victim
(its heartbeats kept flowing). The attacks speak as rank 2: forged routing ids and headers
for items 2 and 3 (no CURVE: anyone who can reach the data socket can), and rank 2's real
carrier flooding the victim's inbox for item 4. The victim's RSS is read from ``/proc``.

``ATTACKS`` is a list of zero-argument functions; each returns
``{"attack": str, "bound": str, "measured": str, "held": bool}`` and ends every process it
started. ``benchmarks/attack.py`` runs them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from lowband.testing import rss_bytes
from lowband.transport._wire import DATA, pack_header
from lowband.transport._zmq import EPOCHS_AHEAD, ZmqCarrier
from lowband.transport._zmq_link import identity
from lowband.transport.coordinator import start_coordinator

ROOT = Path(__file__).resolve().parents[1]
_MB = 1 << 20
CHUNK = 64 << 10
INBOX_CAP = 64 << 20  # the victim's max_inbox_bytes in these attacks

_VICTIM = f"""
import sys
from lowband.transport._zmq import ZmqCarrier
c = ZmqCarrier(1, 3, coordinator=sys.argv[1], group=sys.argv[2], streams=1, peer_timeout=20,
               chunk_size={CHUNK}, max_inbox_bytes={INBOX_CAP}, join_timeout=120)
print(c.io.data_endpoint, flush=True)
k = 1
while True:  # echo rank 0's messages, reversed, until killed
    data = bytes(c.recv(0, (0, k, 0), timeout=600)[0])
    c.send(0, (0, k, 1), [data[::-1]], payload_bytes=len(data))
    k += 1
"""


class Bench:
    """Coordinator process, victim process (rank 1), carriers for ranks 0 and 2 here."""

    def __init__(self) -> None:
        self.co = start_coordinator()
        group = f"attack-{os.getpid()}-{time.monotonic_ns()}"
        self.victim = subprocess.Popen(
            [sys.executable, "-c", _VICTIM, self.co.address, group], stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        self.carriers: dict[int, ZmqCarrier] = {}
        errors: list[BaseException] = []

        def make(r: int) -> None:
            try:
                self.carriers[r] = ZmqCarrier(r, 3, coordinator=self.co.address, group=group, streams=1,
                                              peer_timeout=20, chunk_size=CHUNK, join_timeout=120)
            except BaseException as e:  # noqa: BLE001 - re-raised
                errors.append(e)

        ts = [threading.Thread(target=make, args=(r,)) for r in (0, 2)]
        for t in ts:
            t.start()
        assert self.victim.stdout is not None
        self.endpoint = self.victim.stdout.readline().strip()
        for t in ts:
            t.join(150)
        if errors or len(self.carriers) != 2:
            self.close()
            raise errors[0] if errors else RuntimeError("the attack bench did not assemble")
        self.k = 0
        self.ctx = zmq.Context()
        self.socks: list[zmq.Socket] = []

    def echo(self, n: int = 1 << 16) -> tuple[bool, float]:
        """Rank 0's round trip through the victim: (correct, seconds)."""
        self.k += 1
        data = os.urandom(n)
        t0 = time.monotonic()
        c = self.carriers[0]
        c.send(1, (0, self.k, 0), [data], payload_bytes=n)
        back = bytes(c.recv(1, (0, self.k, 1), timeout=60)[0])
        return back == data[::-1] and not c.io.is_lost(1), time.monotonic() - t0

    def forged(self, incarnation: int) -> zmq.Socket:
        """A raw DEALER to the victim's data socket that calls itself rank 2."""
        s = self.ctx.socket(zmq.DEALER)
        s.linger, s.sndtimeo = 0, 5000
        s.identity = identity(2, 3, incarnation)
        s.connect(self.endpoint)
        self.socks.append(s)
        return s

    def head(self, incarnation: int, *, lengths: tuple[int, ...], seq: int, chunk: int = CHUNK,
             offset: int = 0, key: tuple[int, int, int] = (0, 900, 0)) -> bytes:
        return pack_header(DATA, sender=2, group=self.carriers[0].group_id, incarnation=incarnation, key=key,
                           lengths=lengths, link_seq=seq, chunk_size=chunk, offset=offset,
                           payload_bytes=sum(lengths))

    def rss(self) -> int:
        return rss_bytes(self.victim.pid)

    def close(self) -> None:
        for s in getattr(self, "socks", []):
            s.close(0)
        if hasattr(self, "ctx"):
            self.ctx.term()
        if self.victim.poll() is None:  # first, so that its echo loop never sees rank 0 leave
            self.victim.kill()
        self.victim.wait(10)
        for c in self.carriers.values():
            c.close()
        if self.victim.stdout is not None:
            self.victim.stdout.close()
        self.co.stop()

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _settle(b: Bench, seconds: float = 1.0) -> None:
    """Let the victim's I/O thread take what was sent (bounded)."""
    time.sleep(seconds)


def huge_claim_tiny_chunks() -> dict:
    with Bench() as b:
        b.echo()
        before = b.rss()
        for i in range(200):  # 105-byte-class frames claiming 2**34 bytes in 1-byte chunks
            s = b.forged(1000 + i)
            s.send_multipart([b.head(1000 + i, lengths=(1 << 34,), seq=1, chunk=1), b"x"], zmq.NOBLOCK)
        _settle(b)
        grown = (b.rss() - before) / _MB
        ok, took = b.echo()
    return {
        "attack": "200 frames claiming 2**34 B in 1-byte chunks (item 2)",
        "bound": "refused at the header (chunk >= 4 KiB); victim RSS +< 16 MB; echo ok, victim not lost",
        "measured": f"RSS +{grown:.1f} MB (was 4.6 GB), echo ok={ok} in {took:.2f} s",
        "held": grown < 16 and ok,
    }


def claim_more_than_sent() -> dict:
    with Bench() as b:
        b.echo()
        before = b.rss()
        total = 0
        for i in range(8):  # 8 senders x 1 MiB sent, each claiming a 2 GiB message
            inc = 2000 + i
            s = b.forged(inc)
            for j in range(16):
                s.send_multipart([b.head(inc, lengths=(1 << 31,), seq=j + 1, offset=j * CHUNK, key=(0, 900 + i, 0)),
                                  b"\0" * CHUNK])
                total += CHUNK
        _settle(b, 2.0)
        grown = (b.rss() - before) / _MB
        ok, took = b.echo()
    return {
        "attack": "8 x 1 MiB sent, each claiming a 2 GiB message (item 3)",
        "bound": f"allocation only for arrived bytes: victim RSS +< {total // _MB} MB sent + 32 MB; echo ok",
        "measured": f"RSS +{grown:.1f} MB (was +2 GiB per sender), echo ok={ok} in {took:.2f} s",
        "held": grown < total / _MB + 32 and ok,
    }


def inbox_flood() -> dict:
    with Bench() as b:
        b.echo()
        before = b.rss()
        c2 = b.carriers[2]
        sent = 0
        for i in range(400):  # complete 1 MiB messages for keys nobody waits for
            try:
                c2.send(1, (0, 5000 + i, 0), [b"\0" * _MB], payload_bytes=_MB)
                sent += 1
            except Exception:  # noqa: BLE001 - the victim cut rank 2 off: it may be lost to us
                break
        far = 0
        try:  # and messages for far-future epochs
            c2.send(1, (EPOCHS_AHEAD + 100, 1, 0), [b"\0" * 1024], payload_bytes=1024)
            far = 1
        except Exception:  # noqa: BLE001
            pass
        _settle(b, 4.0)
        grown = (b.rss() - before) / _MB
        ok, took = b.echo()
    bound = INBOX_CAP / _MB + 64
    return {
        "attack": f"400 x 1 MiB for keys nobody waits for (+{far} far-future epoch) from a member (item 4)",
        "bound": f"inbox cap {INBOX_CAP // _MB} MiB a peer (sender cut off): victim RSS +< {bound:.0f} MB; echo ok",
        "measured": f"{sent} queued by the sender, RSS +{grown:.1f} MB (was +400 MB), echo ok={ok} in {took:.2f} s",
        "held": grown < bound and ok,
    }


ATTACKS: list[Any] = [huge_claim_tiny_chunks, claim_more_than_sent, inbox_flood]

if __name__ == "__main__":
    for attack in ATTACKS:
        print(attack())
