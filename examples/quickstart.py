"""The README's first lines, whole: DiLoCo on a tiny model, one process per peer.

    torchrun --nproc_per_node 2 examples/quickstart.py
"""

import torch

import lowband

torch.manual_seed(0)  # the same start on every peer (DiLoCo also checks and broadcasts rank 0's)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
group = lowband.init_group()  # env:// as torchrun sets it, or store="host:port"
opt = lowband.DiLoCo(torch.optim.AdamW(model.parameters(), lr=3e-3),
                     group=group, sync_every=10, codec="q4")
data = torch.Generator().manual_seed(group.rank)  # each peer trains on its own data
for _ in range(50):
    x = torch.randn(64, 32, generator=data)
    loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"rank {group.rank}: loss {loss.item():.4f}, {opt.stats.syncs} syncs, "
      f"{opt.stats.bytes_sent:,} payload bytes sent")
group.close()
