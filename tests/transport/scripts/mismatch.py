"""A peer whose DiLoCo settings differ: prints the error it gets (tests/transport/test_first_contact.py)."""
import sys

import torch

import lowband

rank, world, store, sync_every = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
group = lowband.init_group(rank, world, store=store, init_timeout=60)
torch.manual_seed(0)
model = torch.nn.Linear(8, 8)
try:
    lowband.DiLoCo(torch.optim.AdamW(model.parameters()), group=group, sync_every=sync_every)
    print("RESULT ok", flush=True)
except Exception as e:  # the test reads which error reached this rank
    print(f"RESULT {type(e).__name__}: {e}", flush=True)
finally:
    group.close()
