"""Named subsets (LoRA adapters) and subscribers whose tensor names differ, on HF models."""

from __future__ import annotations

import pytest
import torch
from sync_helpers import TIMEOUT

from lowband.errors import ConfigError, ConfigMismatch
from lowband.sync import WeightPublisher, WeightSubscriber

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _lora(seed: int = 0) -> torch.nn.Module:
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    return peft.get_peft_model(_gpt2(seed), cfg)


def _train_step(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (2, 12), generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()


def _is_lora(name: str) -> bool:
    return "lora_" in name


def test_lora_adapters_only_reach_a_peft_actor_exactly() -> None:
    learner, actor = _lora(), _lora()
    with torch.no_grad():  # the actor's adapters start elsewhere: the sync must overwrite them
        for n, p in actor.named_parameters():
            if _is_lora(n):
                p.normal_()
    with WeightPublisher(learner, only=_is_lora, chunk_elems=256) as pub:
        dense = sum(p.numel() for n, p in learner.named_parameters() if _is_lora(n))
        assert pub.publish().dense_bytes == dense * 4  # adapters only, not the base model
        with WeightSubscriber(actor, connect=pub.address) as strict:
            with pytest.raises(ConfigMismatch, match="strict=False"):
                strict.update(block=True, timeout=TIMEOUT)
        with WeightSubscriber(actor, connect=pub.address, strict=False) as sub:
            for step in range(2):
                _train_step(learner, step)
                v = pub.publish().version
                while sub.version != v:
                    sub.update(block=True, timeout=TIMEOUT)
                x = torch.randint(0, 64, (1, 10))
                with torch.no_grad():
                    assert torch.equal(learner(input_ids=x).logits, actor(input_ids=x).logits)


def test_load_weights_callback_gets_mapped_names_of_changed_tensors() -> None:
    learner = _lora()
    got: dict[str, torch.Tensor] = {}
    calls: list[list[str]] = []

    def load_weights(weights) -> None:  # type: ignore[no-untyped-def]
        batch = [(n, t.clone()) for n, t in weights]
        calls.append([n for n, _ in batch])
        got.update(batch)

    strip = "base_model.model."
    with WeightPublisher(learner, only=_is_lora) as pub:
        pub.publish()
        with WeightSubscriber(
            None,
            connect=pub.address,
            name_map=lambda n: n.removeprefix(strip),
            load_weights=load_weights,
        ) as sub:
            sub.update(block=True, timeout=TIMEOUT)
            assert len(calls) == 1  # the snapshot: every tensor
            with torch.no_grad():  # change one adapter tensor only
                name, p = next((n, p) for n, p in learner.named_parameters() if _is_lora(n))
                p.add_(1.0)
            v = pub.publish().version
            while sub.version != v:
                sub.update(block=True, timeout=TIMEOUT)
            assert calls[-1] == [name.removeprefix(strip)]
        want = {n.removeprefix(strip): p for n, p in learner.named_parameters() if _is_lora(n)}
        assert set(got) == set(want)
        assert all(torch.equal(got[n], want[n]) for n in want)
    with pytest.raises(ConfigError):
        WeightSubscriber(None, connect="127.0.0.1:1")


def test_name_map_into_another_model_class() -> None:
    learner = _gpt2(1)
    actor = transformers.GPT2Model(learner.config).eval()  # the bare transformer, other names
    with WeightPublisher(learner, chunk_elems=1000) as pub:
        _train_step(learner, 0)
        pub.publish()
        with WeightSubscriber(
            actor, connect=pub.address, name_map=lambda n: n.removeprefix("transformer.")
        ) as sub:
            assert sub.update(block=True, timeout=TIMEOUT) == pub.version
        x = torch.randint(0, 64, (1, 10))
        with torch.no_grad():
            want = learner.transformer(input_ids=x).last_hidden_state
            assert torch.equal(want, actor(input_ids=x).last_hidden_state)
    with pytest.raises(ConfigError, match="does not have"):
        WeightPublisher(learner, only=["no.such.tensor"])
