"""Rollout commitments (lowband.sync.commit): bytes per token, false rejections, detection (issue 19).

A small random-config GPT-2 (CPU). ``--rollouts`` honest rollouts (a random prompt of 16
tokens, 48 sampled tokens, KV-cached generation) are made by an actor and checked by a
validator that recomputes one prefill:

- ``honest bf16->fp32``: actor in bf16 (generation and commitment), validator in fp32;
- ``honest fp32 batch``: both fp32, the actor's prefill batched by 50, the validator's by 7
  (other kernel shapes, other summation orders);
- ``one step``: the actor's model is the validator's after one Adam step (``--lr``) on a
  language-modelling batch (a policy one update away), bf16 actor, fp32 validator;
- ``altered token``: honest bf16 commitments, one completion token replaced by another.

Pass: 0 false rejections in both honest sets, >= 99% of each altered set rejected.

    python benchmarks/bench_commit.py [--rollouts 1000 --lr 1e-4]    # minutes (19 on a loaded 2-core box)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch


def _model(seed: int):  # type: ignore[no-untyped-def]
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_embd=128,
        n_layer=4,
        n_head=4,
        vocab_size=512,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def _states(model, ids: torch.Tensor, batch: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    out = []
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch):
            h = model(input_ids=ids[i : i + batch], output_hidden_states=True).hidden_states[-1]
            out.append(h.float())
    return torch.cat(out)


def _generate(model, n: int, prompt: int, new: int, seed: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n, 50):
        b = min(50, n - i)
        p = torch.randint(0, model.config.vocab_size, (b, prompt), generator=g)
        torch.manual_seed(seed + i)
        with torch.no_grad():
            seq = model.generate(
                p,
                attention_mask=torch.ones_like(p),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=True,
                top_k=0,
                pad_token_id=0,
            )
        out.append(seq)
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rollouts", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--rtol", type=float, default=0.02)
    ap.add_argument("--token-rtol", type=float, default=0.05)
    ap.add_argument("--rank", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)

    from lowband.sync.commit import commit, verify

    t0 = time.perf_counter()
    validator = _model(0)
    actor_bf16 = copy.deepcopy(validator).to(torch.bfloat16)
    stepped = copy.deepcopy(validator).train()
    opt = torch.optim.Adam(stepped.parameters(), lr=args.lr)
    x = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(9))
    stepped(input_ids=x, labels=x).loss.backward()
    opt.step()
    stepped = stepped.eval()

    n, prompt, new = args.rollouts, 16, 48
    # Tokens are sampled in fp32 (bf16 matmuls are slow on CPU); each commitment is computed
    # by its actor's own model and numerics (bf16 for the bf16 actor), which is what is checked.
    honest = _generate(validator, n, prompt, new, seed=1)
    other = _generate(stepped.float(), n, prompt, new, seed=2)
    stepped = stepped.to(torch.bfloat16)
    kw = {"block": args.block, "k": args.k}
    check = {"rtol": args.rtol, "token_rtol": args.token_rtol, "rank": args.rank}

    def run(name: str, actor, ids: torch.Tensor, actor_batch: int, *, alter: bool = False) -> dict:  # type: ignore[no-untyped-def]
        a_states = _states(actor, ids, actor_batch)
        commits = [commit(None, ids[i], states=a_states[i], **kw) for i in range(ids.shape[0])]  # type: ignore[arg-type]
        if alter:
            g = torch.Generator().manual_seed(5)
            ids = ids.clone()
            for i in range(ids.shape[0]):
                pos = prompt + int(torch.randint(0, new, (1,), generator=g))
                ids[i, pos] = (
                    ids[i, pos] + 1 + int(torch.randint(0, 510, (1,), generator=g))
                ) % 512
        v_states = _states(validator, ids, 7)
        verdicts = [
            verify(None, ids[i], commits[i], states=v_states[i], **check)
            for i in range(ids.shape[0])
        ]  # type: ignore[arg-type]
        rejected = sum(not v.ok for v in verdicts)
        worst = max(max(v.errors) for v in verdicts)
        med = sorted(max(v.errors) for v in verdicts)[len(verdicts) // 2]
        tok = max(
            float(
                (
                    (v_states[i].gather(1, c.indices) - c.values.float()).abs()
                    / v_states[i].gather(1, c.indices).abs().clamp_min(1e-6)
                ).max()
            )
            for i, c in enumerate(commits)
        )
        return {
            "name": name,
            "n": len(verdicts),
            "rejected": rejected,
            "worst_err": worst,
            "median_err": med,
            "token_err": tok,
            "bytes": commits[0].nbytes,
        }

    fp32_actor = validator
    rows = [
        run("honest bf16->fp32", actor_bf16, honest, 50),
        run("honest fp32 batch", fp32_actor, honest, 50),
        run("one step", stepped, other, 50),
        run("altered token", actor_bf16, honest, 50, alter=True),
    ]
    tokens = prompt + new
    print(
        f"GPT-2 {sum(p.numel() for p in validator.parameters()) / 1e6:.1f}M params, "
        f"{tokens} tokens a rollout, block {args.block}, k {args.k}, rtol {args.rtol}, "
        f"token_rtol {args.token_rtol}, rank {args.rank}, one step = Adam lr {args.lr}"
    )
    print(
        f"commitment: {rows[0]['bytes']} bytes a rollout = {rows[0]['bytes'] / tokens:.1f} bytes/token"
    )
    print("err: a block's median relative error (max and median over rollouts); tok: max per value")
    print(
        f"{'case':>18} {'rollouts':>8} {'rejected':>8} {'rate':>7} {'max err':>8} {'median':>8} {'max tok':>8}"
    )
    for r in rows:
        print(
            f"{r['name']:>18} {r['n']:8d} {r['rejected']:8d} {r['rejected'] / r['n']:7.1%} "
            f"{r['worst_err']:8.4f} {r['median_err']:8.4f} {r['token_err']:8.3f}"
        )
    ok = rows[0]["rejected"] == 0 and rows[1]["rejected"] == 0
    ok = ok and all(r["rejected"] >= 0.99 * r["n"] for r in rows[2:])
    print(f"{'PASS' if ok else 'FAIL'} ({time.perf_counter() - t0:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
