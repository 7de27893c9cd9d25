"""Bit-identity check: hashes of codec, collective and optimizer outputs on fixed seeds.

    python benchmarks/bitcheck.py --out before.json          # on the old code
    python benchmarks/bitcheck.py --out after.json --compare before.json

Hashes (sha256 of the raw bytes) of:

* every codec: the frames of ``encode`` (header included, so a checksum change shows up
  as ``frames`` only), ``decode``, ``decode_into`` (accumulate), error-feedback encodes
  and the residual they leave;
* a 2-peer group over real ZeroMQ on loopback (coordinator in its own process):
  ``all_reduce`` fp32/q8/q4/topk (mean, sum, with error feedback), ``all_gather``;
* a few steps of ``DiLoCo`` (q4, error feedback) and ``CompressedGradients`` (top-k + q8)
  over that group: the parameters after each step.

``--compare`` prints every name whose hash differs; the exit status is 1 if any does.
Payload ``frames`` hashes are reported apart: they change when the wire checksum does,
while the values (every other hash) must not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPECS = [
    "fp32", "fp16", "bf16", "q8", "q4", "q2", "q1", "sign", "q8:block=64", "q4:rounding=stochastic",
    "topk:k=64,tile=4096+q2", "topk:density=0.01", "topk:k=16,tile=1024+fp16", "q8+lz4",
    "topk:density=0.05+q4+lz4", "dct:chunk=64+topk:k=8,tile=4096+sign", "dct:chunk=32+q8",
]


def _h(x: Any) -> str:
    import torch

    if isinstance(x, torch.Tensor):
        x = x.detach().contiguous().cpu()
        return hashlib.sha256(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"").hexdigest()
    if isinstance(x, (list, tuple)):
        h = hashlib.sha256()
        for f in x:
            h.update(bytes(memoryview(f)))
        return h.hexdigest()
    return hashlib.sha256(bytes(x)).hexdigest()


def codecs() -> dict[str, str]:
    import torch

    from lowband.compress import ErrorFeedback, Payload, parse

    out: dict[str, str] = {}
    g = torch.Generator().manual_seed(1234)
    xs = {
        "flat": torch.randn(70_001, generator=g),
        "mat": torch.randn(96, 130, generator=g),
        "half": torch.randn(5000, generator=g).to(torch.bfloat16),
    }
    for spec in SPECS:
        codec = parse(spec)
        for name, x in xs.items():
            if codec.dct is not None and name == "half":
                continue
            p = codec.encode(x, seed=7)
            frames = p.to_frames()
            out[f"codec/{spec}/{name}/frames"] = _h(frames)
            q = Payload.from_frames(frames)
            out[f"codec/{spec}/{name}/decode"] = _h(codec.decode(q))
            acc = torch.linspace(-1, 1, x.numel())
            codec.decode_into(q, acc)
            out[f"codec/{spec}/{name}/decode_into"] = _h(acc)
        if str(codec.value).startswith("q1"):
            continue
        ef = ErrorFeedback(codec, decay=0.9)
        x = xs["mat"]
        vals = []
        for step in range(3):
            p = ef.encode(x * (step + 1), key="k")
            vals.append(codec.decode(p))
        out[f"ef/{spec}/decoded"] = _h(torch.stack(vals))
        out[f"ef/{spec}/residual"] = _h(ef.residuals["k"])
    return out


def _peer(rank: int, world: int, coord: str, q: Any) -> None:
    import torch

    import lowband
    from lowband.compress import ErrorFeedback, parse

    res: dict[str, str] = {}
    g = lowband.init_group(rank, world, store=coord, backend="zmq", peer_timeout=60, group_name="bitcheck")
    try:
        gen = torch.Generator().manual_seed(100 + rank)
        big = torch.randn(3 * 4096 * 7 + 123, generator=gen)
        for spec in [None, "q8", "q4", "topk:density=0.01+q8", "fp16"]:
            for op in ("mean", "sum"):
                r = g.all_reduce(big, codec=spec, op=op).wait()
                res[f"zmq/all_reduce/{spec}/{op}"] = _h(r)
        for spec in ["q8", "topk:k=32,tile=4096+q4"]:
            ef = ErrorFeedback(parse(spec))
            outs = [g.all_reduce(big * (s + 1), codec=spec, error_feedback=ef, key="b").wait() for s in range(3)]
            res[f"zmq/all_reduce_ef/{spec}"] = _h(torch.stack(outs))
            res[f"zmq/all_reduce_ef/{spec}/residual/{rank}"] = _h(ef.residuals["b"])
        r = g.all_reduce(big, op="median").wait()
        res["zmq/all_reduce/median"] = _h(r)
        p = parse("q4").encode(big)
        got = g.all_gather(p).wait()
        res["zmq/all_gather/q4"] = _h([bytes(memoryview(f)) for pl in got for f in pl.buffers])
        # optimizers
        torch.manual_seed(5)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 8))
        opt = lowband.DiLoCo(torch.optim.AdamW(model.parameters(), lr=1e-2), group=g, sync_every=2,
                             codec="q4", error_feedback=True)
        data = torch.Generator().manual_seed(50 + rank)
        for step in range(6):
            x = torch.randn(16, 64, generator=data)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            res[f"diloco/step{step}/{rank}"] = _h(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        torch.manual_seed(6)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 8))
        opt2 = lowband.CompressedGradients(torch.optim.SGD(model.parameters(), lr=0.1), group=g,
                                           codec="topk:density=0.05+q8")
        for step in range(4):
            x = torch.randn(16, 64, generator=data)
            loss = model(x).pow(2).mean()
            opt2.zero_grad()
            loss.backward()
            opt2.step()
            res[f"compressed/step{step}/{rank}"] = _h(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        q.put((rank, res, None))
    except BaseException as e:  # report, do not hang the parent
        q.put((rank, res, repr(e)))
    finally:
        g.close()


def collectives() -> dict[str, str]:
    from lowband.transport.coordinator import start_coordinator

    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    out: dict[str, str] = {}
    with start_coordinator() as co:
        procs = [ctx.Process(target=_peer, args=(r, 2, co.address, q)) for r in range(2)]
        for p in procs:
            p.start()
        try:
            rows = [q.get(timeout=600) for _ in procs]
        finally:
            for p in procs:
                p.join(60)
                if p.is_alive():
                    p.kill()
    for rank, res, err in sorted(rows, key=lambda r: r[0]):
        if err:
            raise RuntimeError(f"rank {rank}: {err}")
        for k, v in res.items():
            if k in out and out[k] != v:
                out[k + "/MISMATCH_ACROSS_RANKS"] = v
            out.setdefault(k, v)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare")
    ap.add_argument("--no-zmq", action="store_true", help="codecs only")
    args = ap.parse_args(argv)
    res = codecs()
    if not args.no_zmq:
        res.update(collectives())
    Path(args.out).write_text(json.dumps(res, indent=1, sort_keys=True))
    print(f"{len(res)} hashes written to {args.out}")
    bad = [k for k in res if "MISMATCH" in k]
    if args.compare:
        old = json.loads(Path(args.compare).read_text())
        diff = sorted(k for k in set(old) | set(res) if old.get(k) != res.get(k))
        values = [k for k in diff if not k.endswith("/frames")]
        print(f"compared with {args.compare}: {len(diff)} differ ({len(diff) - len(values)} of them payload frames)")
        for k in diff:
            print(f"  DIFF {k}")
        bad += values
    for k in bad:
        print(f"  BAD {k}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
