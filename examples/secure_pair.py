"""Two peers over CURVE: every byte encrypted and every peer authenticated by its key.

The README's "Secure groups" block runs it; by hand:

    lowband keys generate --dir keys --name coordinator   # and --name rank0, --name rank1
    lowband coordinator --bind 127.0.0.1:29555 --curve-secret keys/coordinator.key_secret --allow keys/ &
    python examples/secure_pair.py --rank 0 --keys keys & python examples/secure_pair.py --rank 1 --keys keys
"""

import argparse

import torch

import lowband

p = argparse.ArgumentParser()
p.add_argument("--rank", type=int, required=True)
p.add_argument("--world-size", type=int, default=2)
p.add_argument("--keys", default="keys", help="directory of the key files")
p.add_argument("--store", default="127.0.0.1:29555", help="the coordinator's HOST:PORT")
args = p.parse_args()

security = lowband.transport.Curve.from_files(
    f"{args.keys}/rank{args.rank}.key_secret",      # this peer's key pair
    allowed=[args.keys],                            # public keys of the peers it accepts
    coordinator=f"{args.keys}/coordinator.key",     # the coordinator's public key
)
group = lowband.init_group(rank=args.rank, world_size=args.world_size, store=args.store,
                           security=security, init_timeout=60)
mean = group.all_reduce(torch.full((4,), float(args.rank)), op="mean").wait()
print(f"rank {args.rank}: mean over CURVE {mean.tolist()}")
group.close()
