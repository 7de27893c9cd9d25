"""The code blocks of README.md and docs/*.md, found and classified for the doc tests.

A fenced block tagged ``python`` (``py``) or ``bash`` (``sh``, ``shell``, ``console``) is code:
the doc tests run it as written. Any other fence (untagged, ``text``...) is shown output or a
diagram and is not run. A code block may carry one annotation, an HTML comment on the line
just above its fence (visible in the markdown source, hidden on the rendered page)::

    <!-- doc-test: skip reason="needs a CUDA GPU" -->
    <!-- doc-test: given=model,inner,group ranks=2 -->
    <!-- doc-test: torchrun nproc=2 given=model -->
    <!-- doc-test: file=rl_loop.py -->

- ``skip reason="..."``: not run here; the reason says why (a GPU, a second machine, minutes
  of run time, root). Every skip is counted and reported; a skip without a reason fails.
- ``given=a,b``: the block is a fragment that uses names the page says the reader has
  (``model``, ``group``...); the harness defines each, small, before the block
  (``GIVENS`` in ``doc_blocks_worker.py``), and runs the block's own lines unchanged.
- ``ranks=N``: run on N processes of the project's launcher (``lowband.testing.spawn_group``)
  with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set as env:// reads them,
  ``MASTER_ADDR:MASTER_PORT`` being a lowband coordinator started for the block.
- ``torchrun nproc=N``: saved as a script and run with ``torchrun --nproc_per_node N``.
- ``file=NAME``: saved as ``NAME`` in an empty directory and run as ``python NAME`` there.

A python block without annotation runs alone in a fresh namespace; a bash block runs with
``bash -e`` in the repository root, with ``lowband`` and ``python`` from the running virtual
environment on ``PATH`` and ``VENV`` naming a ready copy of it (so ``make`` targets use it
instead of installing a new one).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CODE_LANGS = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash",
              "console": "bash"}
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_NOTE = re.compile(r"^\s*<!--\s*doc-test:(?P<body>.*?)-->\s*$")
_KEYS = {"skip", "reason", "given", "ranks", "torchrun", "nproc", "file"}


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is, its language, its text and its annotation."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str  # "python", "bash", or the fence's own tag for a block that is not code
    code: str
    note: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"

    @property
    def is_code(self) -> bool:
        return self.lang in ("python", "bash")

    @property
    def skipped(self) -> bool:
        return "skip" in self.note

    @property
    def given(self) -> list[str]:
        return [g for g in self.note.get("given", "").split(",") if g]


def markdown_files() -> list[Path]:
    """README.md and every docs/*.md: a page added later is picked up without a change here."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def parse_note(body: str, where: str) -> dict[str, str]:
    note: dict[str, str] = {}
    for word in shlex.split(body):
        key, _, value = word.partition("=")
        if key not in _KEYS:
            raise ValueError(f"{where}: unknown doc-test annotation {key!r} (known: {sorted(_KEYS)})")
        note[key] = value
    return note


def blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path``, in order; raises ValueError on an unclosed fence."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = len(m["indent"]), m["fence"], m["info"].strip()
        tag = info.split()[0].lower() if info else ""
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence[0] * len(fence)) and not lines[i].strip().strip(fence[0])
        ):
            line = lines[i]
            body.append(line[indent:] if not line[:indent].strip() else line.lstrip())
            i += 1
        if i == len(lines):
            raise ValueError(f"{path}:{start + 1}: fence {fence!r} is never closed")
        i += 1
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        note_m = _NOTE.match(lines[k]) if k >= 0 else None
        where = f"{path}:{start + 1}"
        note = parse_note(note_m["body"], where) if note_m else {}
        out.append(Block(path, start + 1, CODE_LANGS.get(tag, tag), "\n".join(body) + "\n", note))
    return out


def all_blocks() -> list[Block]:
    return [b for p in markdown_files() for b in blocks(p)]


def summary(found: list[Block]) -> str:
    code = [b for b in found if b.is_code]
    skipped = [b for b in code if b.skipped]
    lines = [f"{len(found)} fenced blocks: {len(code)} code ({len(code) - len(skipped)} run, "
             f"{len(skipped)} marked skip), {len(found) - len(code)} output or diagrams (not code)"]
    lines += [f"  skip {b.id}: {b.note.get('reason', '(no reason given)')}" for b in skipped]
    return "\n".join(lines)


if __name__ == "__main__":
    for b in all_blocks():
        print(f"{b.id:32} {b.lang or '(untagged)':10} {b.note}")
    print(summary(all_blocks()))
