"""Backend choice: the best backend by default, logged once; named backends that cannot
run raise; a build without a compiler still installs and the kernels warn and serve
from the torch reference."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowband import kernels
from lowband.errors import BackendUnavailable, ConfigError
from lowband.kernels import _backend, _clib
from tests.kernels.conftest import needs_native

ROOT = Path(__file__).resolve().parents[2]


@needs_native
def test_default_is_native_on_cpu_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    assert kernels.available_backends("cpu")[0] == "native"
    _backend.forget_choices()  # resolved once per op: resolve again, so it is logged again
    with caplog.at_level(logging.INFO, logger="lowband.kernels._backend"):
        kernels.encode_gaps(torch.tensor([1, 5]))
        kernels.encode_gaps(torch.tensor([2, 7]))
    lines = [r for r in caplog.records if "encode_gaps" in r.getMessage()]
    assert len(lines) == 1 and "native" in lines[0].getMessage()


def test_named_backends() -> None:
    x = torch.randn(1000)
    ref = kernels.quantize(x, bits=4, backend="torch")
    for b in kernels.available_backends("cpu"):
        if b == "triton":
            continue  # interpreter tests live in test_triton_equals_ref.py
        got = kernels.quantize(x, bits=4, backend=b)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    with pytest.raises(ConfigError):
        kernels.quantize(x, bits=4, backend="cuda-magic")


def test_unavailable_backend_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable):
        kernels.quantize(torch.randn(10), bits=8, backend="triton")  # CPU tensor, no interpreter
    if _clib.available():
        with pytest.raises(BackendUnavailable):
            kernels.encode_gaps(torch.tensor([1]), backend="triton")


def test_triton_not_imported_by_default() -> None:
    """`import lowband` and CPU kernels never import triton."""
    code = "import sys, torch, lowband, lowband.kernels as k; k.quantize(torch.randn(10), bits=8); print('triton' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_without_native_library_warns_and_serves(tmp_path: Path) -> None:
    """A copy of the package without _native.so: a WARNING names what was lost, results stay right."""
    shutil.copytree(
        ROOT / "lowband", tmp_path / "lowband", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    code = (
        "import logging, torch; logging.basicConfig(level=logging.INFO);"
        "import lowband.kernels as k;"
        "x = torch.randn(1000); c, s = k.quantize(x, bits=2);"
        "assert torch.equal(c, k.quantize(x, bits=2, backend='torch')[0]);"
        "print(k.available_backends('cpu'))"
    )
    # Without TRITON_INTERPRET (the suite sets it), the CPU has exactly one backend left.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['torch']"
    assert (
        "WARNING" in out.stderr
        and "native kernels are unavailable" in out.stderr
        and "_native.so" in out.stderr
    )


def test_build_without_compiler_does_not_fail(tmp_path: Path) -> None:
    """setup.py's optional build: with no working C compiler, build_ext exits 0 and says why."""
    env = {**os.environ, "CC": "/bin/false", "LDSHARED": "/bin/false"}
    out = subprocess.run(
        [
            sys.executable,
            "setup.py",
            "-q",
            "build_ext",
            "--build-lib",
            str(tmp_path / "lib"),
            "--build-temp",
            str(tmp_path / "tmp"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "native kernels not built" in out.stderr
    assert not list((tmp_path / "lib").rglob("_native*.so"))


def test_resolve_gives_the_function_the_wrapper_calls() -> None:
    x = torch.randn(4096)
    fn = kernels.resolve("quantize", "cpu")
    want = kernels.quantize(x, bits=4, block=256)
    got = fn(x, bits=4, block=256)
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)
    # the checksum has one implementation, whatever the backend asked for
    assert kernels.resolve("checksum", backend="torch") is kernels.checksum


def test_resolve_rejects_unknown_ops_and_backends() -> None:
    with pytest.raises(ConfigError, match="unknown kernel op"):
        kernels.resolve("resolve")
    with pytest.raises(ConfigError, match="unknown kernel backend"):
        kernels.resolve("encode_gaps", backend="fortran")
    if "triton" not in kernels.available_backends("cpu"):
        with pytest.raises(BackendUnavailable):
            kernels.resolve("encode_gaps", backend="triton")
