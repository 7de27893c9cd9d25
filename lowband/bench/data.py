"""The benchmark's text corpus: real text that is present without a download.

By default the corpus is a fixed, ordered list of modules from the running
Python's standard library (:data:`STDLIB_FILES`), read as raw bytes and joined
with a separator line. Every Python install carries them, so ``lowband bench``
needs no network. Different Python versions ship slightly different sources,
so the corpus records its SHA-256 and size: two runs are comparable only when
those agree. ``--data FILE`` replaces the corpus with any file.

Tokens are bytes (a vocabulary of 256), so the model is character-level for
ASCII text and needs no tokenizer. The last ``val_fraction`` of the bytes is
held out for validation loss; training windows never reach into it.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowband.errors import ConfigError

__all__ = ["STDLIB_FILES", "VOCAB_SIZE", "Corpus", "load_corpus", "get_batch"]

#: Byte-level vocabulary.
VOCAB_SIZE = 256

#: The default corpus: these standard-library files, in this order (paths relative to
#: ``sysconfig.get_paths()["stdlib"]``). About 1.5 MB on CPython 3.11. The list is fixed so
#: that a corpus hash identifies the Python version's sources, not a directory walk.
STDLIB_FILES: tuple[str, ...] = (
    "argparse.py",
    "ast.py",
    "base64.py",
    "bisect.py",
    "calendar.py",
    "collections/__init__.py",
    "configparser.py",
    "contextlib.py",
    "copy.py",
    "csv.py",
    "dataclasses.py",
    "datetime.py",
    "difflib.py",
    "enum.py",
    "fractions.py",
    "functools.py",
    "glob.py",
    "heapq.py",
    "inspect.py",
    "json/decoder.py",
    "json/encoder.py",
    "logging/__init__.py",
    "pathlib.py",
    "pprint.py",
    "queue.py",
    "random.py",
    "shlex.py",
    "shutil.py",
    "statistics.py",
    "string.py",
    "textwrap.py",
    "threading.py",
    "tokenize.py",
    "typing.py",
    "warnings.py",
)

_SEPARATOR = b"\n# ---- %s ----\n"


@dataclass(frozen=True)
class Corpus:
    """Byte tokens split into a training and a held-out part, with their provenance."""

    name: str
    sha256: str
    nbytes: int
    train: torch.Tensor = field(repr=False)  # uint8, 1-D
    val: torch.Tensor = field(repr=False)  # uint8, 1-D
    files: tuple[str, ...] = ()

    def describe(self) -> dict[str, object]:
        """What a results file records about the corpus."""
        return {
            "name": self.name,
            "sha256": self.sha256,
            "bytes": self.nbytes,
            "train_bytes": int(self.train.numel()),
            "val_bytes": int(self.val.numel()),
            "files": list(self.files),
        }


def _stdlib_bytes() -> tuple[bytes, tuple[str, ...]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[bytes] = []
    for rel in STDLIB_FILES:
        path = root / rel
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ConfigError(
                f"the default corpus needs {path} from the standard library ({e.strerror}); "
                "pass --data FILE to use another text"
            ) from e
        parts.append(_SEPARATOR % rel.encode())
        parts.append(data)
    return b"".join(parts), STDLIB_FILES


def load_corpus(
    path: str | os.PathLike[str] | None = None,
    *,
    val_fraction: float = 0.1,
    min_bytes: int = 4096,
) -> Corpus:
    """Load the default standard-library corpus, or the file at ``path``.

    Raises :class:`ConfigError` when the file cannot be read, is too small to hold
    training and validation windows, or ``val_fraction`` is outside (0, 0.5].
    """
    if not 0.0 < val_fraction <= 0.5:
        raise ConfigError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    if path is None:
        raw, files = _stdlib_bytes()
        name = "python-stdlib-subset"
    else:
        p = Path(path)
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read --data {str(p)!r}: {e.strerror or e}") from e
        files = (p.name,)
        name = p.name
    if len(raw) < min_bytes:
        raise ConfigError(f"corpus {name!r} has {len(raw)} bytes; at least {min_bytes} are needed")
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    n_val = max(1, int(len(raw) * val_fraction))
    return Corpus(
        name=name,
        sha256=hashlib.sha256(raw).hexdigest(),
        nbytes=len(raw),
        train=tokens[: len(raw) - n_val],
        val=tokens[len(raw) - n_val :],
        files=files,
    )


def get_batch(
    tokens: torch.Tensor,
    batch_size: int,
    block_size: int,
    *,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``batch_size`` random windows: inputs ``(B, T)`` and next-byte targets ``(B, T)``.

    Windows come from ``tokens`` alone, so a training batch never sees held-out bytes.
    The draw depends only on ``generator``, which makes every worker's stream reproducible.
    """
    if tokens.numel() <= block_size + 1:
        raise ConfigError(
            f"a split of {tokens.numel()} bytes cannot hold a window of {block_size + 1}"
        )
    starts = torch.randint(0, tokens.numel() - block_size - 1, (batch_size,), generator=generator)
    offsets = torch.arange(block_size + 1)
    windows = tokens[starts[:, None] + offsets].long()
    return windows[:, :-1], windows[:, 1:]
