"""The README's and docs' code blocks run as written (issue 13): a page that does not work
cannot land.

Every fenced ``python`` and ``bash`` block of README.md and docs/*.md is a test here, found
anew at each run (``doc_blocks.py`` says how blocks are found, annotated and run). A block that
cannot run on this machine carries ``<!-- doc-test: skip reason="..." -->`` above it and is
reported as skipped with that reason; ``python tests/docs/doc_blocks.py`` lists them all.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
from doc_blocks import ROOT, Block, all_blocks, blocks, summary
from doc_blocks_worker import GIVENS, prelude, run_block

from lowband.testing import spawn_group, start_store
from lowband.transport import start_coordinator

pytestmark = pytest.mark.slow
BLOCKS = all_blocks()
CODE = [b for b in BLOCKS if b.is_code]
BIN = Path(sys.executable).parent
TIMEOUT = 150.0
# what a shell command looks like: a fence holding one must say it is bash (or be marked)
_COMMAND = re.compile(r"^\s*(\$ )?(python3?|lowband|torchrun|make|bash|pip|curl)\b")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    return {**env, **extra}


def _check(proc: subprocess.CompletedProcess[str], block: Block) -> None:
    assert proc.returncode == 0, f"{block.id} exited {proc.returncode}:\n{block.code}\n---\n{proc.stdout[-6000:]}"


def _ready_venv(tmp: Path) -> Path:
    """A copy of the running venv, as `make setup` leaves one: make's targets then run in it."""
    venv = tmp / "venv"
    venv.mkdir()
    (venv / "bin").symlink_to(BIN)
    (venv / ".lowband-ready").touch()
    return venv


def _run_python(block: Block, tmp: Path) -> None:
    note = block.note
    if "file" in note:
        script = tmp / note["file"]
        script.write_text(prelude(block.given) + block.code if block.given else block.code)
        _check(subprocess.run([sys.executable, script.name], cwd=tmp, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT), block)
    elif "torchrun" in note:
        script = tmp / "block.py"
        script.write_text(prelude(block.given) + block.code)
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", note.get("nproc", "2"),
               "--master_port", str(_free_port()), str(script)]
        proc = subprocess.run(cmd, cwd=tmp, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=TIMEOUT)
        _check(proc, block)
    else:
        n = int(note.get("ranks", "1"))
        with ExitStack() as stack:
            env: dict[str, str] = {}
            if n > 1 or "group" in block.given:  # env:// as init_group() reads it
                host, _, port = stack.enter_context(start_coordinator()).address.rpartition(":")
                env = {"WORLD_SIZE": str(n), "MASTER_ADDR": host, "MASTER_PORT": port}
            if "gloo" in block.given or "ddp_model" in block.given:
                store, env["DOCTEST_TORCH_STORE"] = start_store()
                stack.callback(lambda: store)  # served until the block is done
            spawn_group(n, run_block, block.code, block.given, env, block.id, timeout=TIMEOUT)


def _run_bash(block: Block, tmp: Path) -> None:
    env = _env(VENV=str(_ready_venv(tmp)))
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.code], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    _check(proc, block)


@pytest.mark.parametrize("block", CODE, ids=[b.id for b in CODE])
def test_doc_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    if block.skipped:
        pytest.skip(f"marked in {block.id}: {block.note.get('reason')}")
    if block.lang == "python":
        _run_python(block, tmp_path)
    else:
        _run_bash(block, tmp_path)


def test_every_mark_is_honest() -> None:
    """A skip says why; a given is one the harness defines; launch options are well formed."""
    problems = []
    for b in BLOCKS:
        if b.note and not b.is_code:
            problems.append(f"{b.id}: a doc-test annotation on a block that is not python or bash")
        if b.skipped and not b.note.get("reason", "").strip():
            problems.append(f"{b.id}: skip without reason=")
        if unknown := [g for g in b.given if g not in GIVENS]:
            problems.append(f"{b.id}: given {unknown} not defined in doc_blocks_worker.GIVENS")
        for key in ("ranks", "nproc"):
            if key in b.note and not b.note[key].isdigit():
                problems.append(f"{b.id}: {key}={b.note[key]!r} is not a number")
        if b.lang == "bash" and (b.given or {"ranks", "torchrun", "file"} & b.note.keys()):
            problems.append(f"{b.id}: given/ranks/torchrun/file are for python blocks")
    assert not problems, "\n".join(problems)


def test_no_command_hides_in_an_untagged_block() -> None:
    """A command shown in a fence without a language would escape these tests: tag it bash."""
    hidden = [b.id for b in BLOCKS if not b.is_code and any(_COMMAND.match(ln) for ln in b.code.splitlines())]
    assert not hidden, f"commands in fences not tagged bash (or python): {hidden}"


def test_there_are_blocks_to_run() -> None:
    print(summary(BLOCKS))
    assert len(CODE) > len([b for b in CODE if b.skipped]) > 0, summary(BLOCKS)


def test_a_block_that_does_not_run_fails_and_a_marked_one_is_skipped(tmp_path: Path) -> None:
    """The harness itself: a page whose block breaks fails its test; marks are read."""
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n```python\nprint(model)   # no model here\n```\n\n"
        "<!-- doc-test: given=model -->\n```python\nprint(model)\n```\n\n"
        '<!-- doc-test: skip reason="needs a GPU" -->\n```bash\nnvidia-smi\n```\n\n'
        "```\nshown output\n```\n"
    )
    broken, given, marked, text = blocks(page)
    assert (broken.lang, given.given, marked.note, text.is_code) == (
        "python", ["model"], {"skip": "", "reason": "needs a GPU"}, False)
    with pytest.raises(NameError, match="model"):
        _run_python(broken, tmp_path)
    _run_python(given, tmp_path)
