"""The docs/islands.md recipe as a script: run by torchrun inside each island
(tests/optim/test_islands.py::test_torchrun_islands_with_a_shared_coordinator)."""

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import lowband

dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 31), torch.nn.Tanh(), torch.nn.Linear(31, 5))
if dist.get_world_size() > 1:
    model = fully_shard(model)
group = lowband.init_group(island=dist.group.WORLD)
opt = lowband.DiLoCo(torch.optim.AdamW(model.parameters()), group=group, sync_every=3, codec="q4")
for _ in range(6):
    model(torch.randn(8, 8)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
full = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]
digest = float(sum(float(t.double().sum()) for t in full))
print(f"island {group.island_id} rank {dist.get_rank()} syncs {opt.stats.syncs} flows {opt.stats.flows} "
      f"digest {digest!r}", flush=True)
dist.barrier()
group.close()
dist.destroy_process_group()
