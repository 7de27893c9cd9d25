"""A peer on a link emulator host, with no host= option: all-reduce and print who it saw."""
import sys

import torch

import lowband

rank, world, store = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
group = lowband.init_group(rank, world, store=store, init_timeout=60)
out = group.all_reduce(torch.full((1000,), float(rank + 1)), op="sum").wait()
print(f"RESULT {out[0].item()} {group.carrier.io.data_endpoint}", flush=True)
group.close()
