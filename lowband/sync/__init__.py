"""The sync step of an RL learner: weights out to rollout workers, rollouts back.

- :class:`WeightPublisher` / :class:`WeightSubscriber`: the learner publishes each
  new policy version as an exact sparse delta (or through a lossy codec with error
  feedback); workers apply it atomically and check its fingerprint; late joiners
  and workers that missed a message recover by snapshot.
- :class:`RolloutChannel`: workers push rollouts tagged with the policy version
  and fingerprint; the learner pulls the fresh ones; peers may share with each other.
"""

from lowband.sync.publisher import PublishStats, WeightPublisher
from lowband.sync.relay import WeightRelay
from lowband.sync.rollouts import Rollout, RolloutChannel
from lowband.sync.subscriber import WeightSubscriber

__all__ = [
    "PublishStats",
    "Rollout",
    "RolloutChannel",
    "WeightPublisher",
    "WeightRelay",
    "WeightSubscriber",
]
