"""Run every attack of ``benchmarks/_attacks_*.py`` against real processes on loopback.

Each module has an ``ATTACKS`` list of zero-argument functions returning
``{"attack", "bound", "measured", "held"}`` (each ends every process it started). This prints
one table row an attack (``--json``: a JSON list), and exits 1 if any bound did not hold or an
attack raised. ``--only WORD`` runs the attacks whose module or function name contains WORD.

    python benchmarks/attack.py            # all, about 3 minutes on 2 quiet cores
    python benchmarks/attack.py --only coordinator --json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _modules() -> list[tuple[str, object]]:
    out = []
    for path in sorted(HERE.glob("_attacks_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        out.append((path.stem.removeprefix("_attacks_"), mod))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    ap.add_argument("--only", default="", help="run attacks whose module or function name contains this")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)  # the victims' refusals are expected
    rows = []
    for name, mod in _modules():
        for fn in mod.ATTACKS:  # type: ignore[attr-defined]
            if args.only and args.only not in name and args.only not in fn.__name__:
                continue
            t0 = time.monotonic()
            try:
                row = dict(fn())
            except Exception as e:  # noqa: BLE001 - an attack that raised did not hold
                row = {"attack": fn.__name__, "bound": "-", "measured": f"raised {type(e).__name__}: {e}",
                       "held": False}
                traceback.print_exc(file=sys.stderr)
            row = {"module": name, **row, "seconds": round(time.monotonic() - t0, 1)}
            rows.append(row)
            if not args.json:
                print(f"[{name}] {row['attack']}\n    bound:    {row['bound']}\n    measured: {row['measured']}"
                      f"\n    held:     {row['held']}  ({row['seconds']} s)", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        held = sum(bool(r["held"]) for r in rows)
        print(f"\n{held}/{len(rows)} bounds held")
        print("\n| module | attack | bound | measured | held |\n| --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['module']} | {r['attack']} | {r['bound']} | {r['measured']} | {'yes' if r['held'] else 'NO'} |")
    return 0 if rows and all(r["held"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
