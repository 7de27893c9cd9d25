"""Parameters with requires_grad=False (a frozen base under LoRA adapters) are neither
sent nor stepped by DiLoCo and CompressedGradients (issue 13, item 8)."""

from __future__ import annotations

import pytest
import torch
from optim_helpers import LoraModel, make_model, run_ranks, train_step

from lowband.errors import ConfigError, ConfigMismatch
from lowband.optim import CompressedGradients, DiLoCo

BUILDERS = {
    "diloco": lambda params, group: DiLoCo(
        torch.optim.AdamW(params, lr=1e-2), group=group, sync_every=2, codec="q4",
        error_feedback=True,
    ),
    "compressed": lambda params, group: CompressedGradients(
        torch.optim.AdamW(params, lr=1e-2), group=group, codec="q4"
    ),
}


def _train(group, name: str, adapters_only: bool):
    model = LoraModel()
    frozen_before = [p.clone() for p in model.frozen()]
    params = model.adapters() if adapters_only else list(model.parameters())
    opt = BUILDERS[name](params, group)
    start = opt.stats.bytes_sent  # the start-up check is not a sync
    for t in range(6):
        train_step(model, opt, group.rank, t)
    return (
        opt.stats.bytes_sent - start,
        opt.stats.syncs,
        [p.detach().clone() for p in model.adapters()],
        frozen_before,
        [p.clone() for p in model.frozen()],
    )


@pytest.mark.parametrize("name", list(BUILDERS))
def test_frozen_parameters_are_not_sent(name: str) -> None:
    lora = run_ranks(2, lambda g: _train(g, name, adapters_only=False))
    alone = run_ranks(2, lambda g: _train(g, name, adapters_only=True))
    for (sent, syncs, adapters, before, after), (sent_alone, syncs_alone, ref, _, _) in zip(
        lora, alone
    ):
        assert syncs == syncs_alone > 0
        # exactly the bytes of an optimizer that holds only the adapters (the frozen
        # base is 6x the adapters: sent as zeros, it made every sync ~7x bigger)
        assert sent == sent_alone > 0
        for a, b in zip(before, after):
            assert torch.equal(a, b)  # frozen weights bit-identical
        for a, b in zip(adapters, ref):
            assert torch.equal(a, b)
    # the adapters did train, identically on both ranks at a sync (DiLoCo: step 6)
    assert not torch.equal(lora[0][2][1], LoraModel().up.detach())


@pytest.mark.parametrize("name", list(BUILDERS))
def test_peers_must_agree_on_which_parameters_are_frozen(name: str) -> None:
    def run(group):
        model = make_model()
        list(model.parameters())[group.rank].requires_grad_(False)
        try:
            BUILDERS[name](list(model.parameters()), group)
        except ConfigMismatch as e:
            return e
        return None

    assert all(isinstance(e, ConfigMismatch) for e in run_ranks(2, run))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_all_frozen_is_a_config_error(name: str) -> None:
    def run(group):
        model = make_model()
        for p in model.parameters():
            p.requires_grad_(False)
        with pytest.raises(ConfigError, match="requires_grad=True"):
            BUILDERS[name](list(model.parameters()), group)
        return True

    assert all(run_ranks(1, run))
