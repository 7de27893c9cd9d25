"""Rollout commitments: honest ones verify across numerics; other models and edited tokens do not."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowband.errors import CodecError
from lowband.sync import Rollout, RolloutSwarm
from lowband.sync.commit import Commitment, commit, verify

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=2,
        vocab_size=128,
        n_positions=96,
        bos_token_id=0,
        eos_token_id=0,
    )
    fp32 = transformers.GPT2LMHeadModel(cfg).eval()
    stepped = copy.deepcopy(fp32).train()
    opt = torch.optim.Adam(stepped.parameters(), lr=1e-3)  # one step of this tiny model
    x = torch.randint(0, 128, (4, 32))
    stepped(input_ids=x, labels=x).loss.backward()
    opt.step()
    return {"fp32": fp32, "bf16": copy.deepcopy(fp32).to(torch.bfloat16), "stepped": stepped.eval()}


def _ids(seed: int, n: int = 70) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def test_honest_rollouts_verify_across_bf16_and_fp32(models) -> None:  # type: ignore[no-untyped-def]
    for seed in range(4):
        ids = _ids(seed)
        for actor in ("fp32", "bf16"):
            c = Commitment.from_bytes(commit(models[actor], ids).to_bytes())
            v = verify(models["fp32"], ids, c)
            assert v.ok, (actor, v.reason)
            assert c.nbytes == 12 + 12 * ids.numel()  # 3 x (u16 + bf16) a token


def test_other_model_and_edited_tokens_are_rejected(models) -> None:  # type: ignore[no-untyped-def]
    for seed in range(4):
        ids = _ids(seed)
        assert not verify(models["fp32"], ids, commit(models["stepped"], ids)).ok
        c = commit(models["bf16"], ids)
        edited = ids.clone()
        edited[40 + seed] = (edited[40 + seed] + 1 + seed) % 128
        v = verify(models["fp32"], edited, c)
        assert not v.ok and "token" in v.reason
        assert not verify(models["fp32"], ids[:-1], c).ok  # a token dropped


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_malformed_commitments_raise_codec_error(data: bytes) -> None:
    try:
        c = Commitment.from_bytes(data)
    except CodecError:
        return
    assert c.to_bytes() == data


def test_peers_share_rollouts_and_check_them(models) -> None:  # type: ignore[no-untyped-def]
    def check(r: Rollout) -> bool:
        c = Commitment.from_bytes(r.data["commitment"])
        return verify(models["fp32"], r.data["tokens"], c).ok

    with RolloutSwarm(bind="127.0.0.1:0", name="a", check=check) as a:
        with RolloutSwarm(bind="127.0.0.1:0", name="b", peers=[a.address]) as b:
            a.policy(3, 0xABC)
            ids = _ids(1)
            good = {"tokens": ids, "commitment": commit(models["bf16"], ids).to_bytes()}
            edited = {**good, "tokens": torch.cat([ids[:-1], (ids[-1:] + 1) % 128])}
            for data, fp in ((good, 0xABC), (edited, 0xABC), (good, 0xDEF)):
                assert b.share(data, version=3, fingerprint=fp) > 0
            got: list[Rollout] = []
            for _ in range(100):
                got += a.pull(timeout=0.1)
                if sum(a.counts.get("b", {}).values()) == 3:
                    break
            assert [r.worker for r in got] == ["b"] and torch.equal(got[0].data["tokens"], ids)
            assert a.counts["b"] == {
                "accepted": 1,
                "stale": 0,
                "unknown": 1,
                "malformed": 0,
                "rejected": 1,
            }
