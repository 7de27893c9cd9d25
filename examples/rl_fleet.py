"""An RL fleet over emulated internet links: a learner, 2 relays and 8 actors (issue 19).

Every process runs in its own network namespace (``lowband.wan``, netns mode: needs
root) behind its own access link: the learner's uplink is 100 Mbit/s, the two relays
sit in datacenters (1 Gbit/s, 10 ms from the learner), the actors have 100 Mbit/s
down, 20-100 Mbit/s up and 30-150 ms round trips. The namespaces are removed when the
example ends, also on an error or Ctrl-C.

- The policy is a small GPT-2 (``transformers``, a random config: nothing downloaded).
- The task is verifiable: the prompt is three digits counting up from a random start
  (``4 5 6``); the policy writes the next four (``7 8 9 0``, modulo 10). The learner
  scores each completion itself from its tokens (the fraction of the four that are
  right); a uniformly random policy over the 16-token vocabulary scores 1/16.
- The learner (``WeightPublisher``, fp32, exact sparse deltas) feeds relay 1; relay 2
  follows relay 1 (cut-through). Actors 0-3 follow relay 1 and 4-7 relay 2, each with
  the other relay and the learner as fallbacks and ``origin=`` the learner (whose
  fingerprint every version must match).
- Actors sample groups of completions with the newest policy they have and push them
  through a ``RolloutChannel`` (asynchronous, ``--max-lag`` versions); the learner takes
  GRPO steps (group-relative advantages, PPO-clipped ratio against the actor's
  log-probabilities; Shao et al. 2024) and publishes after every step.

Printed: reward per step against the random policy, the rollouts' lag, payload bytes per
version, and the time from ``publish()`` until the last actor has applied that version
(actors apply new versions between rollouts, so this includes their sampling time;
``benchmarks/bench_fleet.py`` measures delivery alone).
Pass: the mean reward over the last 20% of steps beats the random policy by at least
``--margin`` (default 0.25: over 31% of the digits right, against 6.25%), no fingerprint
mismatch anywhere, and no namespace of this run left behind.

    python examples/rl_fleet.py [--steps 80 --seed 0]          # root; a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from multiprocessing.connection import Connection

import torch

VOCAB, PROMPT, NEW = 16, 3, 4
RANDOM_REWARD = 1 / VOCAB
LEARNER, RELAY1, RELAY2, ACTOR0, N_ACTORS = 0, 1, 2, 3, 8


def make_policy(seed: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=PROMPT + NEW,
        n_embd=64,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,  # no dropout: the learner's log-probabilities are the actor's
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def prompts(n: int, g: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, 10, (n, 1), generator=g)
    return (start + torch.arange(PROMPT)) % 10


def reward(prompt: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """The verifiable reward: the fraction of the completion that keeps counting."""
    want = (prompt[:, -1:] + 1 + torch.arange(NEW)) % 10
    return (completion == want).float().mean(-1)


def sample(policy: torch.nn.Module, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``NEW`` tokens; the completion and its log-probabilities."""
    ids, logps = prompt, []
    with torch.no_grad():
        for _ in range(NEW):
            logits = policy(input_ids=ids).logits[:, -1].float()
            dist = torch.distributions.Categorical(logits=logits)
            tok = dist.sample()
            logps.append(dist.log_prob(tok))
            ids = torch.cat([ids, tok[:, None]], 1)
    return ids[:, PROMPT:], torch.stack(logps, 1)


def learner(args: argparse.Namespace, conn: Connection) -> None:
    from lowband.sync import RolloutChannel, WeightPublisher
    from lowband.wan import local_address

    torch.set_num_threads(1)
    policy = make_policy(args.seed)
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    ip = local_address()
    with (
        WeightPublisher(policy, bind=f"{ip}:0") as pub,
        RolloutChannel(bind=f"{ip}:0", max_lag=args.max_lag) as hub,
    ):
        st = pub.publish(version=1)
        hub.policy(st.version, st.fingerprint)
        conn.send((pub.address, hub.address, st.dense_bytes))
        for step in range(1, args.steps + 1):
            wait = 600 if step == 1 else 120  # the first: 8 actors import torch on 2 cores
            batch, deadline = [], time.monotonic() + wait
            while len(batch) < args.batch:
                if time.monotonic() > deadline:
                    raise SystemExit(f"learner: no rollouts for {wait} s")
                batch += hub.pull(args.batch - len(batch), timeout=1.0)
            policy.train()
            loss, rewards, lags = torch.zeros(()), [], []
            for r in batch:
                d = r.data
                rw = reward(d["prompt"], d["completion"])  # scored here, from the tokens
                adv = (rw - rw.mean()) / (rw.std() + 1e-4)
                ids = torch.cat([d["prompt"], d["completion"]], 1)
                logits = policy(input_ids=ids).logits[:, PROMPT - 1 : -1]
                logp = torch.log_softmax(logits, -1).gather(2, d["completion"][..., None])[..., 0]
                ratio = torch.exp(logp - d["logp"])
                clipped = torch.min(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None])
                loss = loss - clipped.mean() / len(batch)
                rewards.append(float(rw.mean()))
                lags.append(pub.version - r.version)
            opt.zero_grad()
            loss.backward()
            opt.step()
            policy.eval()
            t0 = time.monotonic()
            st = pub.publish(version=step + 1)
            hub.policy(st.version, st.fingerprint)
            conn.send(("step", step, st.version, t0, st.payload_bytes, rewards, lags))
        conn.send(("done", hub.counts, hub.stale))
        conn.recv()


def relay(connect: list[str], origin: str | None, conn: Connection) -> None:
    from lowband.sync import WeightRelay
    from lowband.wan import local_address

    with WeightRelay(connect=connect, origin=origin, bind=f"{local_address()}:0") as r:
        conn.send(r.address)
        conn.recv()
        conn.send({"mismatches": r.fingerprint_mismatches, "error": repr(r.error)})


def actor(
    rank: int,
    args: argparse.Namespace,
    sources: list[str],
    origin: str,
    rollouts: str,
    conn: Connection,
) -> None:
    from lowband.sync import RolloutChannel, WeightSubscriber

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(args.seed * 1000 + rank)
    torch.manual_seed(args.seed * 1000 + rank)
    policy = make_policy(args.seed + 1).eval()  # other weights: the first version overwrites them
    with (
        WeightSubscriber(policy, connect=sources, origin=origin) as sub,
        RolloutChannel(connect=rollouts, name=f"actor{rank}") as ch,
    ):
        seen = 0
        while not conn.poll():
            v = sub.update(block=seen == 0, timeout=120)
            if v is not None:
                conn.send(("version", v, time.monotonic()))
                seen = v
            p = prompts(1, g).expand(args.group, -1)
            completion, logp = sample(policy, p)
            ch.push(
                {"prompt": p.contiguous(), "completion": completion, "logp": logp},
                version=sub.version,
                fingerprint=sub.fingerprint,
            )
            time.sleep(args.actor_pause)
        conn.recv()
        conn.send(
            {
                "mismatches": sub.fingerprint_mismatches,
                "failovers": sub.failovers,
                "version": sub.version,
            }
        )


def topology():  # type: ignore[no-untyped-def]
    from lowband.wan import HostLink, Topology

    links = [HostLink(up_bps=100e6, down_bps=1e9, queue_bytes=1 << 20)]
    links += [HostLink(up_bps=1e9, down_bps=1e9, queue_bytes=4 << 20)] * 2
    ups = [20e6, 30e6, 40e6, 50e6, 60e6, 70e6, 80e6, 100e6]
    links += [HostLink(up_bps=u, down_bps=100e6, queue_bytes=1 << 20) for u in ups]
    one_way = [0.015 + 0.06 * i / (N_ACTORS - 1) for i in range(N_ACTORS)]  # 30-150 ms RTT
    n = len(links)
    d = [[0.0] * n for _ in range(n)]
    for a in range(n):
        for b in range(n):
            if a != b:
                da = one_way[a - ACTOR0] if a >= ACTOR0 else 0.010
                db = one_way[b - ACTOR0] if b >= ACTOR0 else 0.010
                d[a][b] = max(da, db)
    return Topology.from_links(links, d)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--group", type=int, default=16, help="completions sampled per prompt")
    ap.add_argument("--batch", type=int, default=16, help="rollouts (groups) per learner step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-lag", type=int, default=2)
    ap.add_argument("--margin", type=float, default=0.25)
    ap.add_argument("--actor-pause", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from lowband.wan import LinkEmulator
    from lowband.wan._netns import list_namespaces

    ctx = mp.get_context("spawn")
    pipes: list[Connection] = []

    def start(net, host: int, target, *a) -> Connection:  # type: ignore[no-untyped-def]
        mine, theirs = ctx.Pipe()
        net.spawn(host, target, args=(*a, theirs))
        pipes.append(mine)
        return mine

    rewards: list[float] = []
    with LinkEmulator(topology(), mode="netns") as net:
        own_ns = set(net.namespaces)
        lc = start(net, LEARNER, learner, args)
        if not lc.poll(300):
            raise SystemExit("the learner did not start")
        weights, rollouts, dense = lc.recv()
        r1 = start(net, RELAY1, relay, [weights], None)
        a1 = r1.recv()
        r2 = start(net, RELAY2, relay, [a1, weights], weights)
        a2 = r2.recv()
        actors = []
        for i in range(N_ACTORS):
            mine, other = (a1, a2) if i < N_ACTORS // 2 else (a2, a1)
            actors.append(
                start(net, ACTOR0 + i, actor, i, args, [mine, other, weights], weights, rollouts)
            )
        print(
            f"learner uplink 100 Mbit/s, 2 relays, {N_ACTORS} actors (20-100 Mbit/s up, "
            f"30-150 ms RTT); policy {dense} bytes fp32; random policy reward {RANDOM_REWARD:.3f}"
        )
        held: dict[int, dict[int, float]] = {
            i: {} for i in range(N_ACTORS)
        }  # actor -> version -> t
        published: dict[int, float] = {}
        sizes, lags = [], []
        counts, stale = {}, 0
        t_start = time.monotonic()
        while True:
            for i, c in enumerate(actors):
                while c.poll():
                    _, v, t = c.recv()
                    held[i][v] = t
            if not lc.poll(0.05):
                if time.monotonic() - t_start > 900:
                    raise SystemExit("the run took more than 15 minutes")
                continue
            try:
                msg = lc.recv()
            except EOFError:
                raise SystemExit("the learner ended early (its error is above)") from None
            if msg[0] == "done":
                _, counts, stale = msg
                break
            _, step, version, t0, nbytes, rw, lg = msg
            published[version] = t0
            sizes.append(nbytes)
            rewards += rw
            lags += lg
            if step % 5 == 0 or step == args.steps:
                k = args.batch * 5
                print(
                    f"step {step:3d}  reward {statistics.mean(rewards[-k:]):.3f}  "
                    f"lag {statistics.mean(lags[-k:]):.2f}  bytes/version {nbytes}"
                )
        time.sleep(3.0)  # the last versions reach the actors
        for i, c in enumerate(actors):
            while c.poll():
                _, v, t = c.recv()
                held[i][v] = t
        deliver = []
        for v, t0 in sorted(published.items()):
            # an actor busy sampling may apply several versions at once: it holds v from
            # the first time it held v or a newer one
            firsts = [min((t for u, t in h.items() if u >= v), default=None) for h in held.values()]
            if all(f is not None for f in firsts):
                deliver.append(max(firsts) - t0)  # type: ignore[type-var]
        reports = []
        for c in [lc, r1, r2, *actors]:
            c.send("stop")
        for c in [r1, r2, *actors]:
            if c.poll(60):
                while True:
                    m = c.recv()
                    if isinstance(m, dict):
                        reports.append(m)
                        break
                    if not c.poll(10):
                        break
    left = sorted(own_ns & set(list_namespaces()))  # this run's; others may run their own
    tail = rewards[-max(1, len(rewards) // 5) :]
    final = statistics.mean(tail)
    mismatches = sum(r.get("mismatches", 0) for r in reports)
    print(
        f"bytes per version: mean {statistics.mean(sizes):.0f} ({statistics.mean(sizes) / dense:.1%} "
        f"of dense fp32); stale rollouts dropped: {stale}; rollouts per actor: "
        f"{ {k: v['accepted'] for k, v in counts.items()} }"
    )
    if deliver:
        print(
            f"time to deliver a version to all {N_ACTORS} actors: median {statistics.median(deliver):.3f} s, "
            f"max {max(deliver):.3f} s over {len(deliver)} versions"
        )
    print(f"actors and relays: {reports}")
    ok_reward = final >= RANDOM_REWARD + args.margin
    print(
        f"reward over the last 20% of steps: {final:.3f} vs random {RANDOM_REWARD:.3f} "
        f"(margin {final - RANDOM_REWARD:+.3f}, needed {args.margin:+.3f}): "
        f"{'PASS' if ok_reward else 'FAIL'}"
    )
    print(f"fingerprint mismatches: {mismatches}; namespaces left behind: {left or 'none'}")
    return 0 if ok_reward and mismatches == 0 and not left else 1


if __name__ == "__main__":
    raise SystemExit(main())
