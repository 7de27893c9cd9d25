"""Runs one python doc block in a worker of the project's launcher (``lowband.testing``).

``GIVENS`` defines, small, the names a page says its reader already has; a block annotated
``given=model,group`` runs after those definitions, its own lines unchanged.
"""

from __future__ import annotations

import os
from typing import Any

# name -> (the names it needs first, its definition)
GIVENS: dict[str, tuple[tuple[str, ...], str]] = {
    "torch": ((), "import torch"),
    "lowband": ((), "import lowband"),
    "model": (("torch",), "torch.manual_seed(0)\n"
              "model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))"),
    "inner": (("model",), "inner = torch.optim.AdamW(model.parameters(), lr=3e-4)"),
    "loss_fn": (("torch",), "loss_fn = torch.nn.functional.mse_loss"),
    "data": (("torch",), "_g = torch.Generator().manual_seed(int(os.environ.get('RANK', '0')))\n"
             "data = [(x, x.flip(1)) for x in (torch.randn(8, 16, generator=_g) for _ in range(12))]"),
    "batches": (("data",), "batches = data"),
    "tensor": (("torch",), "tensor = torch.randn(4 * 4096, generator=torch.Generator().manual_seed(0))"),
    "group": ((), "import lowband\ngroup = lowband.init_group()"),
    # torch.distributed (gloo) for DDP: on its own TCPStore, not the lowband coordinator
    "gloo": (("torch",), "import datetime\nimport torch.distributed as dist\n"
             "_h, _, _p = os.environ['DOCTEST_TORCH_STORE'].rpartition(':')\n"
             "dist.init_process_group('gloo', store=dist.TCPStore(_h, int(_p), None, False, "
             "datetime.timedelta(seconds=60)), rank=int(os.environ['RANK']), "
             "world_size=int(os.environ['WORLD_SIZE']))"),
    "ddp_model": (("model", "gloo"), "ddp_model = torch.nn.parallel.DistributedDataParallel(model)"),
}


def prelude(given: list[str]) -> str:
    """The definitions of ``given`` (and what they need), each once, in dependency order."""
    done: list[str] = []

    def add(name: str) -> None:
        if name in done:
            return
        if name not in GIVENS:
            raise KeyError(f"doc-test given={name!r} is not defined in GIVENS (known: {sorted(GIVENS)})")
        for dep in GIVENS[name][0]:
            add(dep)
        done.append(name)

    for g in given:
        add(g)
    return "\n".join(["import os", *(GIVENS[n][1] for n in done)]) + "\n"


def run_block(rank: int, world_size: int, code: str, given: list[str], env: dict[str, str], where: str) -> str:
    """Exec ``code`` after the givens in a fresh ``__main__`` namespace, with ``env`` set."""
    import io
    from contextlib import redirect_stdout

    if "WORLD_SIZE" in env:  # launched as env:// reads it
        env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ns: dict[str, Any] = {"__name__": "__main__"}
    out = io.StringIO()
    try:
        with redirect_stdout(out):
            exec(compile(prelude(given), f"<doc-test givens of {where}>", "exec"), ns)
            exec(compile(code, where, "exec"), ns)
    finally:
        _close_everything(ns)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out.getvalue()


def _close_everything(ns: dict[str, Any]) -> None:
    """What the block left open ends with it (a script's would end with its process)."""
    from lowband.transport.group import Group

    for v in list(ns.values()):
        if isinstance(v, Group):
            v.close()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
