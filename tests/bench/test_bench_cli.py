"""``lowband bench`` flag parsing: what it accepts, what it refuses and how it says so."""

from __future__ import annotations

import pytest

from lowband.bench._units import parse_duration, parse_rate
from lowband.bench.cli import main, parse_args
from lowband.bench.methods import METHODS, parse_methods
from lowband.bench.model import model_config
from lowband.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("100mbit", 1e8),
        ("100Mbit/s", 1e8),
        ("1gbit", 1e9),
        ("500kbit", 5e5),
        ("12.5MB/s", 1e8),
        ("1e2mbit", 1e8),
    ],
)
def test_rates_with_units_parse(text: str, bits: float) -> None:
    assert parse_rate(text) == pytest.approx(bits)


@pytest.mark.parametrize("text", ["100mbps", "100Mbps", "1gbps"])
def test_ambiguous_bps_rates_are_refused_with_the_reason(text: str) -> None:
    with pytest.raises(ConfigError, match="ambiguous"):
        parse_rate(text)


@pytest.mark.parametrize("text", ["100", "fast", "100mb", "0mbit", "-5mbit", "100 MB"])
def test_bad_rates_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_rate(text)


def test_durations() -> None:
    assert parse_duration("50ms") == pytest.approx(0.05)
    assert parse_duration("0.2s") == pytest.approx(0.2)
    assert parse_duration("500us") == pytest.approx(5e-4)
    for bad in ("50", "50m", "soon"):
        with pytest.raises(ConfigError):
            parse_duration(bad)


def test_methods_keep_commas_of_a_codec_spec() -> None:
    got = parse_methods("ddp,grad:topk:k=64,tile=4096+q2,demo")
    assert got == ["ddp", "grad:topk:k=64,tile=4096+q2", "demo"]
    assert parse_methods(",".join(METHODS)) == list(METHODS)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("ddp,adam", "unknown method 'adam'"),
        ("ddp,,demo", "empty method"),
        ("ddp,ddp", "twice"),
        ("grad:", "needs a codec spec"),
        ("grad:topk:k=64,tile=4096+q9", "q9"),
        ("grad:nonsense", "nonsense"),
    ],
)
def test_bad_methods_raise_config_error(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_methods(text)


def test_model_specs() -> None:
    assert model_config("small:n_layer=3").n_layer == 3
    for bad in ("huge", "small:n_layer", "small:depth=3", "small:n_embd=30,n_head=4"):
        with pytest.raises(ConfigError):
            model_config(bad)


def test_presets_and_overrides() -> None:
    a = parse_args(
        ["--quick", "--workers", "3", "--steps", "7", "--bandwidth", "1gbit", "--delay", "10ms"]
    )
    assert (a.preset_name, a.workers, a.preset.steps, a.bandwidth_bps, a.delay_s) == (
        "quick",
        3,
        7,
        1e9,
        0.01,
    )
    assert a.preset.eval_every <= 7
    assert parse_args([]).preset_name == "default"
    assert parse_args(["--preset", "long"]).preset_name == "long"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bandwidth", "100mbps"], "ambiguous rate '100mbps'"),
        (["--methods", "ddp,sgd"], "unknown method 'sgd'"),
        (["--methods", "grad:q3"], "q3"),
        (["--workers", "1"], "at least 2"),
        (["--delay", "50"], "bad duration"),
        (["--jitter", "80ms"], "larger than --delay"),
        (["--steps", "0"], "--steps"),
        (["--model", "giant"], "unknown model"),
        (["--data", "/nonexistent/corpus.txt"], "not a file"),
        (["--quick", "--preset", "long"], "contradicts"),
    ],
)
def test_main_rejects_bad_flags_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowband bench: error:")
    assert message in err


def test_argparse_errors_return_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--workers", "four"]) == 2
    assert "invalid int value" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "--link-model" in capsys.readouterr().out
