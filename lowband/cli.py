"""The ``lowband`` command: a thin dispatcher to each subcommand's own module.

Subcommands are imported only when called, so ``lowband --help`` is instant and
one missing optional dependency never breaks the others.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["main"]

#: subcommand -> ("module:function", one-line help). Each function takes argv and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("lowband.bench.cli:main", "compare methods on emulated internet links (the main job)"),
    "codecs": ("lowband.compress.demo:main", "encode/decode a tensor with a few codecs: error and wire size"),
    "coordinator": ("lowband.transport.coordinator:main", "run the rendezvous and membership service"),
    "keys": ("lowband.transport.security:main", "generate CURVE key pairs"),
    "wan": ("lowband.wan.cli:main", "run the link emulator (netns or proxy mode)"),
}


def _usage() -> str:
    lines = ["usage: lowband <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\n'lowband <command> --help' describes each.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from lowband._version import __version__

        print(f"lowband {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lowband: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _ = COMMANDS[name]
    module, func = target.split(":")
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
