"""Each Work carries the exact counts of its collective; optimizers add them up (issue 14.3)."""

from __future__ import annotations

import torch

import lowband
from lowband.testing import ThreadGroup


def test_works_count_their_own_messages_and_add_up_to_the_group() -> None:
    def body(group):
        before = group.stats.as_dict()
        works = [
            group.all_reduce(torch.arange(4096.0) * (group.rank + 1), "q8"),
            group.all_reduce(torch.ones(100), "topk:k=8,tile=64+q4"),
            group.broadcast(torch.full((50,), float(group.rank)), src=1),
        ]
        for w in works:
            w.wait()
        return before, group.stats.as_dict(), [w.stats.as_dict() for w in works]

    with ThreadGroup(3) as tg:
        for before, after, works in tg.run(body):
            for name in ("bytes_sent", "bytes_received", "messages",
                         "transport_bytes_sent", "transport_bytes_received"):
                assert sum(w[name] for w in works) == after[name] - before[name], name
            assert all(w["bytes_sent"] + w["bytes_received"] > 0 and w["seconds_in_comm"] > 0 for w in works)
            for peer in (0, 1, 2):
                got = sum(w["per_peer"].get(peer, {}).get("bytes_sent", 0) for w in works)
                assert got == after["per_peer"].get(peer, {}).get("bytes_sent", 0) - before[
                    "per_peer"].get(peer, {}).get("bytes_sent", 0)


def test_optimizer_stats_are_the_sum_of_its_works_not_of_other_traffic() -> None:
    def body(group):
        torch.manual_seed(0)
        model = torch.nn.Linear(32, 8)
        opt = lowband.CompressedGradients(torch.optim.SGD(model.parameters(), lr=0.1), group=group, codec="q4")
        start = opt.stats.as_dict()
        other = group.all_reduce(torch.ones(10_000))  # someone else's traffic on the same group
        model(torch.ones(4, 32)).sum().backward()
        opt.step()
        other.wait()
        return start, opt.stats.as_dict(), other.stats.as_dict(), group.stats.as_dict()

    with ThreadGroup(2) as tg:
        for start, mine, other, total in tg.run(body):
            assert mine["syncs"] == 1 and mine["bytes_sent"] > start["bytes_sent"] > 0
            # the group moved both; the optimizer counts its own collectives alone
            assert mine["bytes_sent"] + other["bytes_sent"] == total["bytes_sent"]
