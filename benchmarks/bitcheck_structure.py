"""Bit-identity check for structural changes (issue 14): hash what lowband computes and sends.

On fixed seeds it runs every codec's encode / decode / decode_into / decode_sum on tensors
of several shapes (1-D, 2-D, small axes, 3-D, a 4-D convolution weight), error feedback
over several steps, 2-peer all-reduces with error feedback (dense, sparse and ``dct``
codecs), DeMo steps (2 peers over the in-process carrier, with and without overlap, a
model with a convolution), DiLoCo / CompressedGradients steps, and the bytes of every wire
framing (payload, transport, sync headers and manifest, rollouts, nested trees, commitments,
the DDP hook's packing; ``--framing-only`` runs just those). Each case prints one
line ``name sha256-prefix [bytes]``; ``--save FILE`` writes them, ``--compare FILE`` says
which differ (exit 1 when any does).

    PYTHONPATH=$PWD python benchmarks/bitcheck_structure.py --save /tmp/before.txt
    ... change ...
    PYTHONPATH=$PWD python benchmarks/bitcheck_structure.py --compare /tmp/before.txt

About a minute on one loaded core.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import threading
from collections.abc import Callable

import torch

import lowband
from lowband.compress import ErrorFeedback, Payload, parse
from lowband.testing import ThreadGroup

SPECS = [
    "fp32", "fp16", "bf16", "q8", "q4", "q2", "q1", "sign", "q8:block=64", "q4+lz4",
    "q8:rounding=stochastic",
    "topk:k=64,tile=4096+q2", "topk:density=0.01+q8", "topk:k=8,tile=256+sign",
    "dct:chunk=64+topk:k=8,tile=4096+sign", "dct:chunk=16+topk:k=4,tile=256+q4",
    "dct:chunk=8+q8", "dct:chunk=32+fp16+lz4",
]
SHAPES = [(1000,), (20000,), (128, 96), (7, 300), (3, 40, 50), (32, 16, 3, 3), ()]


class Hasher:
    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.nbytes = 0

    def tensor(self, t: torch.Tensor) -> None:
        t = t.detach().cpu().contiguous()
        self.h.update(str((tuple(t.shape), t.dtype)).encode())
        self.h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    def frames(self, frames: list) -> None:
        for f in frames:
            b = bytes(f)
            self.nbytes += len(b)
            self.h.update(len(b).to_bytes(8, "little"))
            self.h.update(b)

    def payload(self, p: Payload) -> None:
        self.frames(p.to_frames())

    def value(self, v: object) -> None:
        self.h.update(repr(v).encode())

    def line(self, name: str) -> str:
        return f"{name} {self.h.hexdigest()[:24]} {self.nbytes}"


def _data(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * (1 + torch.rand(shape, generator=g))


def codec_cases() -> list[str]:
    out = []
    for spec in SPECS:
        codec = parse(spec)
        for shape in SHAPES:
            h = Hasher()
            x = _data(shape, 1)
            p = codec.encode(x, seed=7)
            h.payload(p)
            q = Payload.from_frames(p.to_frames())
            h.tensor(codec.decode(q))
            acc = torch.ones(x.numel())
            codec.decode_into(q, acc)
            h.tensor(acc)
            others = [codec.encode(_data(shape, 10 + i), seed=3 + i) for i in range(3)]
            s = torch.zeros(x.numel())
            codec.decode_sum([p, *others], s)
            h.tensor(s)
            if not (codec.value.__class__.__name__ == "BlockQuant" and codec.value.bits == 1
                    and codec.value.__class__.__name__ != "Sign"):
                ef = ErrorFeedback(codec, decay=0.95)
                for step in range(4):
                    h.payload(ef.encode(_data(shape, 100 + step), key="k"))
                h.tensor(ef.residuals["k"])
            out.append(h.line(f"codec {spec} {shape}"))
    return out


def _run2(fn: Callable, *args: object) -> list:
    with ThreadGroup(2) as tg:
        return tg.run(fn, *args, timeout=300)


def allreduce_cases() -> list[str]:
    out = []
    for spec in ["q8", "q4", "topk:k=64,tile=4096+q8", "dct:chunk=16+topk:k=8,tile=256+q8", "dct:chunk=8+q8"]:
        for op in ["mean", "sum"]:
            def body(group, spec=spec, op=op):
                h = Hasher()
                ef = ErrorFeedback(spec, decay=0.9)
                for step in range(3):
                    x = _data((5000,), 1000 * group.rank + step)
                    h.tensor(group.all_reduce(x, spec, op=op, error_feedback=ef, key="b").wait())
                h.tensor(ef.residuals["b"])
                st = group.stats
                h.value((st.bytes_sent, st.bytes_received))
                return h.line(f"allreduce {spec} {op} rank{group.rank}")
            out.extend(_run2(body))
    return out


_SEED_LOCK = threading.Lock()  # ranks are threads sharing torch's global generator


def _model(seed: int) -> torch.nn.Module:
    with _SEED_LOCK:
        torch.manual_seed(seed)
        return _layers()


def _layers() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 8, 3, padding=1), torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 70), torch.nn.Tanh(), torch.nn.Linear(70, 5),
    )


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randn(16, 5, generator=g)


def _train(group, make_opt, steps: int = 4) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = _model(0)
    opt = make_opt(model, group)
    for step in range(steps):
        x, y = _batch(group.rank, step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt


def _hash_run(group, name: str, make_opt, steps: int = 4) -> str:
    model, opt = _train(group, make_opt, steps)
    if hasattr(opt, "flush"):
        opt.flush()
    h = Hasher()
    for p in model.parameters():
        h.tensor(p)
    st = opt.stats
    h.value((st.bytes_sent, st.bytes_received, st.messages, st.syncs))
    h.nbytes = st.bytes_sent
    return h.line(f"{name} rank{group.rank}")


def optimizer_cases() -> list[str]:
    torch.manual_seed(0)
    out = []
    demo = {
        "demo": dict(lr=1e-3, topk=8, chunk=16),
        "demo-overlap": dict(lr=1e-3, topk=8, chunk=16, overlap=True),
        "demo-q4": dict(lr=1e-3, topk=4, chunk=8, codec="q4", sign=False, weight_decay=0.01),
        "demo-dense": dict(lr=1e-3, topk=64, chunk=4),
    }
    for name, kw in demo.items():
        out.extend(_run2(lambda g, name=name, kw=kw: _hash_run(
            g, name, lambda m, grp: lowband.DeMo(m.parameters(), group=grp, **kw))))
    for codec in [None, "q4", "topk:density=0.05+q8", "dct:chunk=16+topk:k=8,tile=256+q8"]:
        out.extend(_run2(lambda g, codec=codec: _hash_run(
            g, f"diloco {codec}", lambda m, grp: lowband.DiLoCo(
                torch.optim.AdamW(m.parameters(), lr=1e-3), group=grp, sync_every=2,
                codec=codec, error_feedback=codec is not None), steps=4)))
        out.extend(_run2(lambda g, codec=codec: _hash_run(
            g, f"compressed {codec}", lambda m, grp: lowband.CompressedGradients(
                torch.optim.SGD(m.parameters(), lr=1e-2), group=grp, codec=codec or "fp32"))))
    out.extend(_run2(lambda g: _hash_run(
        g, "diloco fragments", lambda m, grp: lowband.DiLoCo(
            torch.optim.SGD(m.parameters(), lr=1e-2), group=grp, sync_every=4, fragments=2,
            overlap=1, codec="q8"), steps=8)))
    return out


def framing_cases() -> list[str]:
    """The bytes of every wire framing (issue 14 item 6) on fixed inputs: a framing refactor
    must leave each of these exactly as it was."""
    from lowband.optim.ddp_hook import _pack as ddp_pack
    from lowband.sync import _wire as sw
    from lowband.sync._tree import dumps
    from lowband.sync.commit import Commitment
    from lowband.sync.rollouts import _HELLO, _PUSH, _SHARE
    from lowband.sync.rollouts import _pack as ro_pack
    from lowband.transport import _wire as tw

    out = []

    def case(name: str, frames: list) -> None:
        h = Hasher()
        h.frames(frames)
        out.append(h.line(f"framing {name}"))

    g = torch.Generator().manual_seed(7)
    x = torch.randn(3000, generator=g)
    for spec in ("fp32", "q4", "topk:k=64,tile=1024+q8", "dct:chunk=16+fp16+lz4"):
        case(f"payload {spec}", parse(spec).encode(x).to_frames())
    case("payload 4d bf16", parse("bf16").encode(torch.randn(2, 3, 4, 5, generator=g)).to_frames())
    case("transport data", [tw.pack_header(tw.DATA, sender=3, group=0xDEADBEEF, incarnation=123456789,
                                           key=(2, 77, 5), lengths=(100, 0, 70000), frame_idx=2,
                                           link_seq=9, chunk_size=65536, offset=65536, payload_bytes=70100)])
    case("transport ack", [tw.pack_header(tw.ACK, sender=1, group=5, incarnation=2, key=(1, 2, 3)),
                           tw.ack_body([1, 5, 1 << 40])])
    case("transport heartbeat", [tw.pack_header(tw.HEARTBEAT, sender=0, group=1, incarnation=1 << 63)])
    for kind in (sw.HELLO, sw.MANIFEST, sw.CHUNK, sw.COMMIT, sw.SNAP_REQ, sw.SNAP_REP, sw.HEARTBEAT):
        hd = sw.Header(kind, enc=2, flags=1, tensor=4, chunk=5, seq=6, version=7, a=8, b=9, c=10,
                       finger=(1 << 64) - 3, inc=12345)
        case(f"sync header {kind}", [sw.pack(hd)])
    man = sw.Manifest("q8", 4096, (5001, 5002), (
        sw.TensorSpec("w", torch.float32, (10, 20)), sw.TensorSpec("b\u00e9", torch.bfloat16, (7,)),
        sw.TensorSpec("s", torch.float16, ())))
    case("sync manifest", [man.to_bytes()])
    tree = {"ids": torch.arange(12, dtype=torch.int64).reshape(3, 4), "mask": torch.ones(5, dtype=torch.bool),
            "logp": torch.randn(4, 3, generator=g), "h": torch.randn(6, generator=g).to(torch.bfloat16),
            "meta": [1, -2.5, "t\u00e9xt", b"raw", None, True, False, (3, (4,))], "empty": torch.zeros(0)}
    body = dumps(tree)
    case("tree", body)
    for kind in (_PUSH, _SHARE):
        case(f"rollout {kind}", ro_pack(kind, "worker-\u00e9", 41, (1 << 64) - 1, body))
    case("rollout hello", ro_pack(_HELLO, "w", 0, 0, []))
    cm = Commitment(16, 4, torch.randint(0, 1 << 15, (9, 4), generator=g),
                    torch.randn(9, 4, generator=g).to(torch.bfloat16))
    case("commitment", [cm.to_bytes()])
    case("ddp pack", [ddp_pack(parse("q8").encode(x).to_frames()).numpy().tobytes()])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--save")
    ap.add_argument("--compare")
    ap.add_argument("--framing-only", action="store_true", help="only the wire framings (seconds)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lines = framing_cases()
    if not args.framing_only:
        lines += codec_cases() + allreduce_cases() + optimizer_cases()
    if args.save:
        with open(args.save, "w") as f:
            f.write("\n".join(lines) + "\n")
    if not args.compare:
        print("\n".join(lines))
        return 0
    with open(args.compare) as f:
        before = dict(line.rsplit(" ", 2)[0:1] + [line.rsplit(" ", 2)[1:]] for line in f.read().splitlines())
    bad = 0
    for line in lines:
        name, digest, nbytes = line.rsplit(" ", 2)
        old = before.get(name)
        if old is None:
            print(f"NEW   {line}")
        elif old != [digest, nbytes]:
            bad += 1
            print(f"DIFF  {name}: {old[0]} {old[1]} bytes -> {digest} {nbytes} bytes")
    print(f"{len(lines)} cases, {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
