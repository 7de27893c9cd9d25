"""A peer whose script ends right after its last collective, without group.close()
(tests/transport/test_first_contact.py). Rank 0's upload is capped, so its last sends are
still on their way when its own result is complete and the script ends."""
import sys

import torch

import lowband

rank, store = int(sys.argv[1]), sys.argv[2]
group = lowband.init_group(rank, 2, store=store, init_timeout=60, peer_timeout=60,
                           rate_limit=4e6 if rank == 0 else None)
x = torch.full((1 << 20,), float(rank + 1))  # 4 MB: about a second at 4 MB/s
out = group.all_reduce(x).wait()
print(f"RESULT rank {rank}: {out[0].item():g} {bool((out == 1.5).all())}", flush=True)
if rank == 1:
    group.close()
