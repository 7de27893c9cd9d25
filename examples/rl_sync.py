"""An asynchronous actor-learner RL loop on one machine, synced by lowband (issue 8).

One learner process and ``--actors`` actor processes. The task has a verifiable
reward: the prompt is two digits ``a, b`` and the policy answers ``a + b`` (one of
19 answers; reward 1 when right). A random policy scores 1/19 = 5.3%.

- Actors hold the policy as a :class:`~lowband.sync.WeightSubscriber` (fp32
  tensors carrying the published bf16 values), pick up new versions with
  ``update(block=False)`` between batches, sample ``--group`` answers per prompt and
  push the rollouts through a :class:`~lowband.sync.RolloutChannel`, tagged with
  the policy version and fingerprint they used.
- The learner keeps fp32 master weights, pulls rollouts (dropping those more
  than ``--max-lag`` versions old or with a fingerprint it never published), takes
  a GRPO-style step (group-relative advantages ``(r - mean) / (std + eps)`` per
  prompt, PPO-clipped ratio against the actor's log-probabilities; Shao et al.
  2024, DeepSeekMath) and publishes a bf16 view with ``codec="exact"`` after every
  step.

It prints reward, payload bytes per sync against the dense bf16 size, and policy
lag. Pass: the mean reward over the last 20% of steps beats the random policy's
by at least ``--margin`` (default 0.5, i.e. >= 55.3% correct), and every actor
applied every version it saw with a matching fingerprint (no mismatch).

    python examples/rl_sync.py [--steps 150 --actors 2 --seed 0]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from multiprocessing.connection import Connection

import torch
from torch import nn

RANDOM_REWARD = 1 / 19


def make_policy(hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(20, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, 19),
    )


def encode(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x = torch.zeros(a.numel(), 20)
    x[torch.arange(a.numel()), a] = 1.0
    x[torch.arange(a.numel()), 10 + b] = 1.0
    return x


def actor(
    rank: int, args: argparse.Namespace, weights: str, rollouts: str, done: Connection
) -> None:
    """One actor: sync the policy, sample groups of answers, push rollouts, until told to stop."""
    from lowband.sync import RolloutChannel, WeightSubscriber

    torch.set_num_threads(1)
    torch.manual_seed(args.seed * 1000 + rank + 1)
    policy = make_policy(args.hidden)
    with (
        WeightSubscriber(policy, connect=weights) as sub,
        RolloutChannel(connect=rollouts, name=f"actor{rank}") as ch,
    ):
        sub.update(block=True, timeout=60)
        while not done.poll():
            sub.update(block=False)
            a = torch.randint(0, 10, (args.prompts,))
            b = torch.randint(0, 10, (args.prompts,))
            with torch.no_grad():
                logits = policy(encode(a, b))
                dist = torch.distributions.Categorical(
                    logits=logits.unsqueeze(1).expand(-1, args.group, -1)
                )
                ans = dist.sample()
                logp = dist.log_prob(ans)
            reward = (ans == (a + b).unsqueeze(1)).float()
            ch.push(
                {"a": a, "b": b, "answers": ans, "logp": logp, "reward": reward},
                version=sub.version,
                fingerprint=sub.fingerprint,
            )
            time.sleep(args.actor_pause)
        done.recv()
        done.send(
            {
                "versions_applied": sub.versions_applied,
                "snapshots": sub.snapshots,
                "mismatches": sub.fingerprint_mismatches,
                "version": sub.version,
            }
        )


def grpo_loss(policy: nn.Module, r: dict, clip: float) -> torch.Tensor:
    adv = (r["reward"] - r["reward"].mean(1, keepdim=True)) / (
        r["reward"].std(1, keepdim=True) + 1e-4
    )
    logits = policy(encode(r["a"], r["b"]))
    logp = torch.log_softmax(logits, -1).gather(1, r["answers"])  # (prompts, group)
    ratio = torch.exp(logp - r["logp"])
    return -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=64, help="prompts per rollout")
    ap.add_argument(
        "--group", type=int, default=8, help="answers sampled per prompt (the GRPO group)"
    )
    ap.add_argument("--batch", type=int, default=4, help="rollouts per learner step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--clip", type=float, default=0.2)
    ap.add_argument("--max-lag", type=int, default=2)
    ap.add_argument("--margin", type=float, default=0.5)
    ap.add_argument("--actor-pause", type=float, default=0.005)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from lowband.sync import RolloutChannel, WeightPublisher

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    policy = make_policy(args.hidden)
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    ctx = mp.get_context("spawn")
    rewards: list[float] = []
    with (
        WeightPublisher(policy, codec="exact", dtype=torch.bfloat16) as pub,
        RolloutChannel(bind="127.0.0.1:0", max_lag=args.max_lag) as hub,
    ):
        first = pub.publish(version=1)
        hub.policy(first.version, first.fingerprint)
        dense = first.dense_bytes
        pipes, procs = [], []
        for rank in range(args.actors):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=actor, args=(rank, args, pub.address, hub.address, child), daemon=True
            )
            p.start()
            pipes.append(parent)
            procs.append(p)
        try:
            sent, lags = [], []
            t0 = time.perf_counter()
            print(
                f"policy: {sum(p.numel() for p in policy.parameters())} parameters, dense bf16 {dense} bytes; "
                f"{args.actors} actors; random policy reward {RANDOM_REWARD:.3f}"
            )
            for step in range(1, args.steps + 1):
                batch = []
                deadline = time.monotonic() + 120
                while len(batch) < args.batch:
                    if time.monotonic() > deadline:
                        raise SystemExit("no rollouts from the actors for 120 s")
                    batch += hub.pull(args.batch - len(batch), timeout=1.0)
                loss = torch.zeros(())
                for r in batch:
                    loss = loss + grpo_loss(policy, r.data, args.clip) / len(batch)
                    lags.append(pub.version - r.version)
                    rewards.append(float(r.data["reward"].mean()))
                opt.zero_grad()
                loss.backward()
                opt.step()
                st = pub.publish(version=step + 1)
                hub.policy(st.version, st.fingerprint)
                sent.append(st.payload_bytes)
                if step % max(1, args.steps // 12) == 0 or step == args.steps:
                    k = args.batch * max(1, args.steps // 12)
                    print(
                        f"step {step:4d}  reward {sum(rewards[-k:]) / len(rewards[-k:]):.3f}  "
                        f"sync {sum(sent[-10:]) / len(sent[-10:]):8.0f} B ({sum(sent[-10:]) / len(sent[-10:]) / dense:6.1%} of dense)  "
                        f"changed {st.positions_changed:6d}  lag {sum(lags[-k:]) / len(lags[-k:]):.2f}"
                    )
            wall = time.perf_counter() - t0
        finally:
            reports = []
            for pipe in pipes:
                pipe.send("stop")
            for pipe, p in zip(pipes, procs):
                if pipe.poll(60):
                    reports.append(pipe.recv())
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
                    p.join()
        tail = rewards[-max(1, len(rewards) // 5) :]
        final = sum(tail) / len(tail)
        counts = hub.counts
    mismatches = sum(r["mismatches"] for r in reports)
    print(
        f"{args.steps} steps in {wall:.1f} s; mean bytes per sync {sum(sent) / len(sent):.0f} "
        f"({sum(sent) / len(sent) / dense:.1%} of dense bf16 {dense} B)"
    )
    print(f"rollouts per actor: {counts}")
    print(f"actors: {reports}")
    ok_reward = final >= RANDOM_REWARD + args.margin
    ok_sync = len(reports) == args.actors and mismatches == 0 and all(r["version"] for r in reports)
    print(
        f"reward over the last 20% of steps: {final:.3f} vs random {RANDOM_REWARD:.3f} "
        f"(margin {final - RANDOM_REWARD:+.3f}, needed {args.margin:+.3f}): {'PASS' if ok_reward else 'FAIL'}"
    )
    print(
        f"fingerprints: {mismatches} mismatches over {sum(r['versions_applied'] for r in reports)} applied versions: "
        f"{'PASS' if ok_sync else 'FAIL'}"
    )
    return 0 if ok_reward and ok_sync else 1


if __name__ == "__main__":
    raise SystemExit(main())
