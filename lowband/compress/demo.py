"""``lowband codecs``: encode and decode one tensor with a few codecs, print error and size."""

from __future__ import annotations

import argparse

import torch

from lowband.compress._codec import parse
from lowband.compress._payload import Payload
from lowband.errors import ConfigError

__all__ = ["main"]

DEFAULT = ["fp16", "q8", "q4", "q2", "sign", "topk:k=64,tile=4096+q2", "dct:chunk=64+topk:k=8,tile=4096+sign"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lowband codecs", description=__doc__)
    ap.add_argument("--codec", action="append", help="codec spec, repeatable (default: a representative set)")
    ap.add_argument("--n", type=int, default=1 << 20, help="elements of the random normal tensor (default 1M)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.n <= 0:
        raise SystemExit("lowband codecs: --n must be positive")
    x = torch.randn(args.n, generator=torch.Generator().manual_seed(args.seed))
    print(f"tensor: {args.n} fp32 values ~ N(0, 1), {4 * args.n} bytes dense")
    print(f"{'codec':<42}{'wire bytes':>12}{'bytes/elem':>12}{'ratio':>9}{'max |err|':>11}{'rel L2 err':>12}")
    for spec in args.codec or DEFAULT:
        try:
            codec = parse(spec)
        except ConfigError as e:
            raise SystemExit(f"lowband codecs: {e}") from None
        payload = codec.encode(x)
        y = codec.decode(Payload.from_frames(payload.to_frames()))
        err = (x - y).abs().max().item()
        rel = ((x - y).norm() / x.norm()).item()
        print(f"{str(codec):<42}{payload.nbytes:>12}{payload.nbytes / args.n:>12.4f}{4 * args.n / payload.nbytes:>8.1f}x{err:>11.4f}{rel:>12.4f}")
    return 0
