"""Error feedback keeps its residual bounded for every codec it accepts, and refuses
``q1``, whose +-absmax grid is not a contraction (issue 15, item 12)."""

from __future__ import annotations

import math

import pytest
import torch

from lowband.compress import ErrorFeedback, parse
from lowband.errors import ConfigError
from lowband.optim import CompressedGradients, DiLoCo
from lowband.testing import ThreadGroup

# |r| / |x| that each value codec keeps, dense (random inputs; measured, with ~2x room):
# the round-to-nearest error is below half a step, stochastic rounding's below one step.
DENSE_BOUND = {
    "fp32": 1e-6,
    "fp16": 1e-3,
    "bf16": 1e-2,
    "q8": 0.02,
    "q8:rounding=stochastic": 0.03,
    "q4": 0.3,
    "q4:block=64": 0.3,
    "q4:rounding=stochastic": 0.5,
    "q2": 2.0,
    "q2:rounding=stochastic": 4.0,
    "sign": 2.5,
    "sign:block=64": 2.5,
}
SOME_VALUES = ["fp16", "q4", "q2:rounding=stochastic", "sign"]
# A top-k of density d sends a position about every 1/d steps, by which time its residual
# has summed about 1/d random inputs: |r| / |x| of order 1/sqrt(d) (measured: 0.8/sqrt(d)).
SPARSE = {"topk:density=0.01+": 0.01, "topk:k=8,tile=64+": 8 / 64, "dct:chunk=8+topk:k=4,tile=64+": 4 / 64}


def _bound(spec: str) -> float:
    value = spec.split("+")[-1] if not spec.endswith("+lz4") else spec.split("+")[-2]
    if value == "lz4":
        value = "fp32"
    bound = DENSE_BOUND[value]
    for prefix, density in SPARSE.items():
        if spec.startswith(prefix):
            bound += 1.5 / math.sqrt(density)
    return bound


ACCEPTED = (
    list(DENSE_BOUND)
    + ["dct:chunk=8+q4", "dct:chunk=8+sign"]  # the DCT is orthonormal: bounds as dense
    + [p + v for p in list(SPARSE)[:2] for v in SOME_VALUES]
    + ["dct:chunk=8+topk:k=4,tile=64+q4", "dct:chunk=8+topk:k=4,tile=64+sign"]
    + ["q8+lz4", "lz4", "topk:k=8,tile=64+q2+lz4"]
)
REFUSED = [
    "q1",
    "q1:rounding=stochastic",
    "q1:block=64",
    "dct:chunk=8+q1",
    "topk:k=8,tile=64+q1",
    "topk:k=8,tile=64+q1:rounding=stochastic",
    "dct:chunk=8+topk:k=4,tile=64+q1+lz4",
]


def _residual_ratios(ef: ErrorFeedback, steps: int = 200, n: int = 1024) -> list[float]:
    g = torch.Generator().manual_seed(0)
    ratios = []
    for _ in range(steps):
        x = torch.randn(n, generator=g) * (0.5 + torch.rand(1, generator=g))  # scale varies
        ef.encode(x, key="w")
        ratios.append(float(ef.residuals["w"].norm() / x.norm()))
    return ratios


@pytest.mark.parametrize("spec", ACCEPTED)
def test_residual_stays_bounded(spec: str) -> None:
    ratios = _residual_ratios(ErrorFeedback(spec))
    bound = _bound(spec)
    assert max(ratios) < bound, (spec, max(ratios), bound)
    # and it is not growing: the second hundred steps stay within the first's range
    assert max(ratios[100:]) <= 1.25 * max(ratios[:100]) + 1e-6, spec


def test_q1_residual_grows_without_bound() -> None:
    """Why q1 is refused: driven past the check, its residual grows step after step."""
    ef = ErrorFeedback("sign")
    ef.codec = parse("q1")  # what ErrorFeedback("q1") held before it refused
    ratios = _residual_ratios(ef)
    assert max(ratios[100:]) > 1.25 * max(ratios[:100])
    assert max(ratios) > 10 * DENSE_BOUND["sign"]


@pytest.mark.parametrize("spec", REFUSED)
def test_q1_is_refused_with_a_config_error(spec: str) -> None:
    with pytest.raises(ConfigError, match="sign"):
        ErrorFeedback(spec)
    with pytest.raises(ConfigError, match="not a contraction"):
        ErrorFeedback("q2").encode(torch.ones(64), key="w", codec=parse(spec))
    parse(spec).encode(torch.ones(64))  # the codec alone is fine


def test_optimizers_refuse_q1_with_error_feedback_and_take_it_without() -> None:
    with ThreadGroup(1) as tg:
        model = torch.nn.Linear(4, 4)
        inner = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(ConfigError):
            CompressedGradients(inner, group=tg.groups[0], codec="q1")  # EF is on by default
        with pytest.raises(ConfigError):
            DiLoCo(inner, group=tg.groups[0], sync_every=2, codec="q1", error_feedback=True)
        CompressedGradients(inner, group=tg.groups[0], codec="q1", error_feedback=False)
        CompressedGradients(inner, group=tg.groups[0], codec="sign")


@pytest.mark.parametrize("spec", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("decay", [1.0, 0.9])
def test_cast_feedback_matches_its_definition(spec: str, decay: float) -> None:
    """The cast codecs update the residual in place (in 1M-value pieces for half widths): the
    frames and the residual are those of the definition, v = x + decay * r, r = v - wire(v),
    over more than one piece, with NaN, Inf and out-of-range values in the input."""
    n = (2 << 20) + 4099
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, generator=g) * 1000
    x[[7, (1 << 20) + 3, n - 1]] = torch.tensor([float("nan"), float("inf"), 1e6])
    codec = parse(spec)
    ef = ErrorFeedback(codec, decay=decay)
    r = torch.randn(n, generator=g) * 0.01
    ef.residuals["k"] = r.clone()
    p = ef.encode(x, key="k")
    v = x + r * decay if decay != 1.0 else x + r
    want = codec.value.to_wire(v)
    got = torch.frombuffer(bytearray(p.buffers[0]), dtype=want.dtype)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    torch.testing.assert_close(ef.residuals["k"], v - want.to(torch.float32), rtol=0, atol=0, equal_nan=True)
