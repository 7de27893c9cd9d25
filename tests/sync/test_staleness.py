"""Staleness policies per rollout channel: sequential (on-policy) and asynchronous with a lag."""

from __future__ import annotations

import pytest
import torch
from sync_helpers import TIMEOUT, zeros_like

from lowband.errors import CollectiveTimeout, ConfigError
from lowband.sync import RolloutChannel, WeightPublisher, WeightSubscriber


def _roll(hub: RolloutChannel, w: RolloutChannel, versions: list[int]) -> list[int]:
    for v in versions:
        w.push({"tokens": torch.arange(4)}, version=v, fingerprint=1000 + v)
    got: list[int] = []
    for _ in range(50):
        got += [r.version for r in hub.pull(timeout=0.2)]
        if sum(sum(c.values()) for c in hub.counts.values()) >= len(versions):
            break
    return sorted(got)


@pytest.mark.parametrize(
    ("kw", "accepted", "stale"),
    [
        ({"staleness": "sequential"}, [5], 3),
        ({"staleness": "async", "max_lag": 2}, [3, 4, 5], 1),
        ({}, [4, 5], 2),  # the default: async, max_lag=1
    ],
)
def test_policy_accepts_within_lag_and_counts_the_rest(kw, accepted, stale) -> None:  # type: ignore[no-untyped-def]
    with RolloutChannel(bind="127.0.0.1:0", **kw) as hub:
        for v in range(1, 6):
            hub.policy(v, 1000 + v)
        with RolloutChannel(connect=hub.address, name="a") as w:
            assert _roll(hub, w, [2, 3, 4, 5]) == accepted
        assert hub.stale == stale and hub.counts["a"]["stale"] == stale
        assert sum(hub.lags.values()) == len(accepted) and max(hub.lags) == 5 - min(accepted)


def test_sequential_refuses_a_lag_and_bad_names() -> None:
    with pytest.raises(ConfigError):
        RolloutChannel(bind="127.0.0.1:0", staleness="sequential", max_lag=2)
    with pytest.raises(ConfigError):
        RolloutChannel(bind="127.0.0.1:0", staleness="eventually")


def test_actor_waits_for_the_version_the_learner_published() -> None:
    model = {"w": torch.randn(300)}
    replica = zeros_like(model)
    with WeightPublisher(model) as pub, WeightSubscriber(replica, connect=pub.address) as sub:
        pub.publish(version=1)
        with pytest.raises(CollectiveTimeout):
            sub.wait_for(2, timeout=0.5)
        model["w"][0] += 1
        pub.publish(version=2)
        assert sub.wait_for(2, timeout=TIMEOUT) == 2
        assert torch.equal(model["w"], replica["w"])
