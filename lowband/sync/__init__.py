"""The sync step of an RL learner: weights out to rollout workers, rollouts back.

- :class:`WeightPublisher` / :class:`WeightSubscriber`: the learner publishes each
  new policy version as an exact sparse delta (or through a lossy codec with error
  feedback); workers apply it atomically and check its fingerprint; late joiners
  and workers that missed a message recover by snapshot.
- :class:`WeightRelay`: re-serves a publisher's versions (cut-through, verified at each
  hop), so the learner's upload does not grow with the number of actors.
- :class:`RolloutChannel`: workers push rollouts tagged with the policy version
  and fingerprint; the learner pulls the fresh ones (sequential or asynchronous with a
  maximum lag); :class:`RolloutSwarm`: peers share rollouts directly (SAPO).
- :mod:`lowband.sync.commit`: per-rollout commitments from the hidden states (TOPLOC's
  idea), checked by recomputing one prefill.
"""

from lowband.sync.publisher import PublishStats, WeightPublisher
from lowband.sync.relay import WeightRelay
from lowband.sync.rollouts import Rollout, RolloutChannel
from lowband.sync.subscriber import WeightSubscriber
from lowband.sync.swarm import RolloutSwarm

__all__ = [
    "PublishStats",
    "Rollout",
    "RolloutChannel",
    "RolloutSwarm",
    "WeightPublisher",
    "WeightRelay",
    "WeightSubscriber",
]
