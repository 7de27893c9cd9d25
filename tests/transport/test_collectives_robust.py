"""The robust aggregation rules on their own: exact values on small hand-made inputs."""

from __future__ import annotations

import pytest
import torch

from lowband.errors import ConfigError
from lowband.transport._robust import median, norm_clip, robust_rule, trim_count, trimmed_mean


def test_median_odd_and_even():
    rows = torch.tensor([[1.0, 9.0], [3.0, -1.0], [2.0, 4.0]])
    assert torch.equal(median(rows), torch.tensor([2.0, 4.0]))
    rows = torch.tensor([[1.0], [3.0], [2.0], [100.0]])
    assert torch.equal(median(rows), torch.tensor([2.5]))


def test_trimmed_mean_drops_the_extremes():
    assert [trim_count(p) for p in (1, 2, 3, 8, 16, 17)] == [0, 0, 1, 1, 2, 2]
    rows = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0], [7.0], [1000.0]])
    assert torch.equal(trimmed_mean(rows), torch.tensor([4.5]))  # mean of 2..7
    two = torch.tensor([[1.0], [3.0]])
    assert torch.equal(trimmed_mean(two), torch.tensor([2.0]))  # too few to trim


def test_norm_clip_scales_to_the_median_norm():
    rows = torch.tensor([[3.0, 4.0], [0.0, 5.0], [30.0, 40.0]])  # norms 5, 5, 50
    out = norm_clip(rows, [5.0, 5.0, 50.0])
    assert torch.allclose(out, (rows[0] + rows[1] + rows[2] / 10) / 3)
    # understating one's norm does not help: the shard's own norm counts
    assert torch.allclose(norm_clip(rows, [5.0, 5.0, 0.1]), out)
    with pytest.raises(ConfigError):
        norm_clip(rows, None)


def test_rule_lookup():
    assert robust_rule("mean") is None and robust_rule("sum") is None
    assert robust_rule("median") is median
    with pytest.raises(ConfigError, match="unknown op"):
        robust_rule("max")
