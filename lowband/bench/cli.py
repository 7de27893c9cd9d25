"""``lowband bench``: how many bytes each training method sends, how long it takes on
emulated internet links, and what it costs in loss.

Flags are parsed here and turned into a run of :mod:`lowband.bench.runner`; the results
are printed as a table and written as JSON and two PNG plots into ``--out``. Presets
size the run for a 2-core machine: ``default`` (< 10 min), ``quick`` (< 2 min) and
``long`` (< 60 min, long enough for the loss comparison to mean something).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from lowband.errors import ConfigError, LowbandError

__all__ = ["main", "MIN_EVALS", "PRESETS", "Preset", "build_parser", "parse_args"]


@dataclass(frozen=True)
class Preset:
    """The size of a run: model, steps, batch, sync and evaluation cadence."""

    model: str
    steps: int
    batch_size: int
    eval_every: int
    eval_batches: int
    eval_batch_size: int
    lr: float
    demo_lr: float
    sync_every: int  # diloco and streaming-diloco-q4
    sparseloco_sync_every: int


#: Every preset evaluates at least 8 times (:data:`MIN_EVALS`) and ``quick`` syncs every
#: method at least 5 times (:data:`lowband.bench.report.MIN_SYNCS`), so its ratios rest on
#: more than one sync. ``default`` sizes the model so that ddp's per-step all-reduce at
#: 100 Mbit/s dominates its step (what the benchmark shows) while the whole run stays under
#: 10 minutes on 2 cores; ``long`` trains a smaller model for many more steps so the losses
#: separate meaningfully. DiLoCo's H = 50 in ``default`` gives it 3 syncs: the report says so.
PRESETS: dict[str, Preset] = {
    "quick": Preset(
        model="tiny",
        steps=60,
        batch_size=8,
        eval_every=5,
        eval_batches=2,
        eval_batch_size=16,
        lr=3e-3,
        demo_lr=3e-3,
        sync_every=10,
        sparseloco_sync_every=10,
    ),
    "default": Preset(
        model="base:block_size=64",
        steps=150,
        batch_size=2,
        eval_every=15,
        eval_batches=2,
        eval_batch_size=16,
        lr=2e-3,
        demo_lr=1e-3,
        sync_every=50,
        sparseloco_sync_every=10,
    ),
    "long": Preset(
        model="small",
        steps=1200,
        batch_size=8,
        eval_every=100,
        eval_batches=4,
        eval_batch_size=32,
        lr=3e-3,
        demo_lr=1.2e-3,
        sync_every=50,
        sparseloco_sync_every=10,
    ),
}

#: Evaluations after step 0 that every preset makes, so each curve has points to show.
MIN_EVALS = 8

DEFAULT_METHODS = "ddp,diloco,streaming-diloco-q4,sparseloco,demo"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="lowband bench",
        description="Train the same small character-level transformer with each method on "
        "emulated internet links; report bytes, time and loss against dense data parallelism.",
    )
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default 4)")
    ap.add_argument(
        "--islands",
        help="islands of processes instead of one process per worker: NxL (N islands of L ranks, "
        "e.g. 2x2) or L1+L2+... (e.g. 2+1); FSDP2 inside each, lowband between; also runs the "
        "flat run of the same model and compares (docs/islands.md)",
    )
    ap.add_argument(
        "--bandwidth", default="100mbit", help="each host's rate, up and down (default 100mbit)"
    )
    ap.add_argument("--delay", default="50ms", help="one-way delay between hosts (default 50ms)")
    ap.add_argument(
        "--jitter", default="2ms", help="delay jitter, never reordering a flow (default 2ms)"
    )
    ap.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated: ddp, diloco, streaming-diloco-q4, sparseloco, demo, grad:<codec spec> "
        f"(default {DEFAULT_METHODS})",
    )
    ap.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="run size (default: default)"
    )
    ap.add_argument("--quick", action="store_true", help="the same as --preset quick (< 2 minutes)")
    ap.add_argument("--steps", type=int, help="training steps per method (overrides the preset)")
    ap.add_argument("--model", help="model preset tiny|small|base, with overrides: small:n_layer=3")
    ap.add_argument(
        "--batch-size", type=int, help="sequences per worker and step (overrides the preset)"
    )
    ap.add_argument("--data", help="a text file to train on instead of the standard-library corpus")
    ap.add_argument(
        "--seed", type=int, default=0, help="seed of the weights and batches (default 0)"
    )
    ap.add_argument("--out", default="bench-out", help="directory for results.json and the plots")
    ap.add_argument(
        "--link-model",
        action="store_true",
        help="also print projections of each method's counted bytes on other links and model sizes",
    )
    ap.add_argument(
        "--emulator",
        choices=("auto", "netns", "proxy"),
        default="auto",
        help="link emulator mode: netns (faithful, root) or proxy; auto picks netns when it can",
    )
    ap.add_argument(
        "--threads", type=int, help="torch threads per worker (default: cores / workers)"
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    return ap


@dataclass(frozen=True)
class BenchArgs:
    """The validated flags."""

    workers: int
    bandwidth_bps: float
    delay_s: float
    jitter_s: float
    methods: tuple[str, ...]
    preset_name: str
    preset: Preset
    data: str | None
    seed: int
    out: Path
    link_model: bool
    emulator: str
    threads: int
    progress: bool
    verbose: bool
    islands: tuple[int, ...] = ()  # ranks per island; () = one process per worker


def parse_args(argv: list[str]) -> BenchArgs:
    """Parse and validate; bad values raise :class:`ConfigError` with the reason."""
    from lowband.bench._units import parse_duration, parse_rate
    from lowband.bench.methods import parse_methods
    from lowband.bench.model import model_config

    ns = build_parser().parse_args(argv)
    if ns.quick and ns.preset not in (None, "quick"):
        raise ConfigError(f"--quick contradicts --preset {ns.preset}")
    name = "quick" if ns.quick else (ns.preset or "default")
    preset = PRESETS[name]
    islands: tuple[int, ...] = ()
    if ns.islands is not None:
        from lowband.bench.islands import DEFAULT_ISLAND_METHODS, check_methods, parse_islands

        islands = parse_islands(ns.islands)
        if ns.workers is not None and ns.workers != len(islands):
            raise ConfigError(f"--workers {ns.workers} contradicts --islands {ns.islands} ({len(islands)} islands)")
        ns.workers = len(islands)
        ns.methods = ns.methods or DEFAULT_ISLAND_METHODS
        check_methods(tuple(parse_methods(ns.methods)))
    ns.workers = 4 if ns.workers is None else ns.workers
    ns.methods = ns.methods or DEFAULT_METHODS
    if ns.workers < 2:
        raise ConfigError(
            f"--workers must be at least 2 (got {ns.workers}): one worker sends nothing"
        )
    if ns.workers > 64:
        raise ConfigError(f"--workers {ns.workers} is more than this benchmark supports (64)")
    if ns.steps is not None:
        if ns.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {ns.steps}")
        every = min(preset.eval_every, max(1, ns.steps // MIN_EVALS))
        preset = replace(preset, steps=ns.steps, eval_every=every)
    if ns.batch_size is not None:
        if ns.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {ns.batch_size}")
        preset = replace(preset, batch_size=ns.batch_size)
    if ns.model is not None:
        model_config(ns.model)  # validates
        preset = replace(preset, model=ns.model)
    else:
        model_config(preset.model)
    jitter = parse_duration(ns.jitter)
    delay = parse_duration(ns.delay)
    if jitter > delay:
        raise ConfigError(f"--jitter {ns.jitter} is larger than --delay {ns.delay}")
    if ns.data is not None and not os.path.isfile(ns.data):
        raise ConfigError(f"--data {ns.data!r} is not a file")
    if islands and any(preset.batch_size % n for n in islands):
        raise ConfigError(
            f"--batch-size {preset.batch_size} must split evenly between the ranks of every island {islands}"
        )
    cores = os.cpu_count() or 1
    processes = sum(islands) if islands else ns.workers
    threads = ns.threads if ns.threads is not None else max(1, cores // processes)
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    return BenchArgs(
        workers=ns.workers,
        bandwidth_bps=parse_rate(ns.bandwidth),
        delay_s=delay,
        jitter_s=jitter,
        methods=tuple(parse_methods(ns.methods)),
        preset_name=name,
        preset=preset,
        data=ns.data,
        seed=ns.seed,
        out=Path(ns.out),
        link_model=ns.link_model,
        emulator=ns.emulator,
        threads=threads,
        progress=not ns.no_progress,
        verbose=ns.verbose,
        islands=islands,
    )


_EMULATOR_NOTES = {
    "netns": "real kernel TCP through network namespaces, tc tbf for rate and a delay line",
    "proxy": "userspace relay with a sender-window model, no root",
}


def _train_config(args: BenchArgs) -> Any:
    from lowband.bench.methods import TrainConfig

    p = args.preset
    return TrainConfig(
        steps=p.steps,
        batch_size=p.batch_size,
        lr=p.lr,
        warmup=min(20, max(1, p.steps // 10)),
        demo_lr=p.demo_lr,
        sync_every=p.sync_every,
        sparseloco_sync_every=p.sparseloco_sync_every,
    )


def _check_links_carried(method: dict[str, Any], mode: str) -> None:
    """Refuse figures from traffic that went around the link emulator.

    Every payload byte crosses the sender's emulated uplink, so the link counter must be at
    least the payload counter. If it is not, peers reached each other some other way (for
    instance a transport that does not connect through ``lowband.wan.connect_address`` in
    proxy mode) and the times would flatter every method.
    """
    from lowband.errors import TransportError

    for w in method["per_worker"]:
        link = w.get("link_bytes_sent")
        if link is not None and link < w["payload_bytes_sent"]:
            raise TransportError(
                f"{method['method']}: worker {w['rank']} sent {w['payload_bytes_sent']} payload bytes "
                f"but its emulated link carried only {link}: the traffic bypassed the link emulator "
                f"({mode} mode), so its times would flatter. Use netns mode (root) or a transport that "
                "connects through lowband.wan.connect_address."
            )


def run(args: BenchArgs, *, argv: list[str]) -> dict[str, Any]:
    """Run the benchmark and write its files; returns the results dictionary."""
    from lowband._version import __version__
    from lowband.bench import report
    from lowband.bench._units import format_rate
    from lowband.bench.data import load_corpus
    from lowband.bench.methods import describe_method, sync_every
    from lowband.bench.model import CharTransformer, model_config
    from lowband.bench.runner import LinkSettings, run_workers

    args.out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(args.data)
    mcfg = model_config(args.preset.model)
    if min(corpus.train.numel(), corpus.val.numel()) <= mcfg.block_size + 1:
        raise ConfigError(
            f"corpus {corpus.name!r} is too short for the model's context of {mcfg.block_size} bytes "
            f"(validation split: {corpus.val.numel()} bytes)"
        )
    params = CharTransformer(mcfg).num_parameters()
    train = _train_config(args)
    print(
        f"lowband bench ({args.preset_name}): {args.workers} workers"
        f"{' (islands ' + '+'.join(map(str, args.islands)) + ')' if args.islands else ''}, "
        f"{format_rate(args.bandwidth_bps)} up/down, {args.delay_s * 1e3:g} ms one way "
        f"(jitter {args.jitter_s * 1e3:g} ms); model {args.preset.model} ({params:,} params); "
        f"{train.steps} steps x {train.batch_size} x {mcfg.block_size} bytes per worker\n"
        f"corpus {corpus.name}: {corpus.nbytes:,} bytes, sha256 {corpus.sha256[:16]}...",
        flush=True,
    )
    started = time.time()
    load_at_start = list(os.getloadavg())  # other work on the machine slows every method

    processes = sum(args.islands) if args.islands else args.workers

    def by_worker(out: Any, m: str) -> tuple[Any, Any]:
        if not args.islands:
            return out.results[m], out.curves.get(m, {})
        from lowband.bench.islands import per_island

        return per_island(out.results[m], out.curves.get(m, {}), args.islands)

    def assemble(out: Any, complete: bool) -> dict[str, Any]:
        """Results of the methods every worker finished; written to results.json."""
        methods = {
            m: report.summarize(m, *by_worker(out, m), out.link.get(m))
            for m in args.methods
            if len(out.results.get(m, {})) == processes
        }
        for m in methods:
            methods[m]["settings"] = describe_method(m, train)
            methods[m]["sync_every"] = sync_every(m, train)
            _check_links_carried(methods[m], out.emulator_mode)
        report.compare_to_baseline(methods)
        settings = {
            "preset": args.preset_name,
            "workers": args.workers,
            "bandwidth_bps": args.bandwidth_bps,
            "bandwidth": format_rate(args.bandwidth_bps),
            "delay_ms": args.delay_s * 1e3,
            "jitter_ms": args.jitter_s * 1e3,
            "emulator_mode": out.emulator_mode,
            "emulator_note": _EMULATOR_NOTES.get(out.emulator_mode, out.emulator_mode),
            "curve": False,
            "model": mcfg.as_dict(),
            "model_spec": args.preset.model,
            "params": params,
            "train": asdict(train),
            "eval": {
                "every": args.preset.eval_every,
                "batches": args.preset.eval_batches,
                "batch_size": args.preset.eval_batch_size,
            },
            "seed": args.seed,
            "islands": list(args.islands) or None,
            "threads_per_worker": args.threads,
            "cpu_count": os.cpu_count(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": list(os.getloadavg()),
        }
        results: dict[str, Any] = {
            "lowband_version": __version__,
            "complete": complete,
            "command": ["lowband", "bench", *argv],
            "started_unix": started,
            "elapsed_s": time.time() - started,
            "settings": settings,
            "corpus": corpus.describe(),
            "byte_counters": "payload: frames of payloads (group.stats); transport: all bytes handed to "
            "ZeroMQ; link: bytes counted by the link emulator on each host's access link. All per "
            "worker (mean over workers), measured over the training steps only; setup traffic "
            "(identical-start checks) is reported separately per worker.",
            "methods": methods,
            "targets": report.targets(methods, args.preset_name),
        }
        if args.link_model:
            results["projections"] = report.link_projections(
                methods, measured_bps=args.bandwidth_bps, measured_delay=args.delay_s, params=params
            )
        report.write_json(args.out / "results.json", results)
        return results

    out = run_workers(
        {
            "methods": args.methods,
            "model": mcfg,
            "train": train,
            "seed": args.seed,
            "data": args.data,
            "threads": args.threads,
            "eval_every": args.preset.eval_every,
            "eval_batches": args.preset.eval_batches,
            "eval_batch_size": args.preset.eval_batch_size,
        },
        workers=args.workers,
        link=LinkSettings(args.bandwidth_bps, args.delay_s, args.jitter_s, mode=args.emulator),
        progress=args.progress,
        on_method_done=lambda partial, _method: assemble(partial, complete=False),
        islands=args.islands,
    )
    results = assemble(out, complete=True)
    methods, settings = results["methods"], results["settings"]
    from lowband.bench.plots import plot_loss_vs_bytes, plot_loss_vs_time

    plot_loss_vs_bytes(methods, settings, args.out / "loss_vs_bytes.png")
    plot_loss_vs_time(methods, settings, args.out / "loss_vs_time.png")

    from lowband.bench._curve_note import NOTE

    print(f"\nlink emulator: {out.emulator_mode} mode ({settings['emulator_note']}); {NOTE}")
    print(
        "bytes are per worker (mean over workers); wall time is the slowest worker's, without evaluation\n"
    )
    print(report.format_table(methods))
    print(report.format_notes(methods, steps=train.steps, settings=settings))
    if results["targets"]:
        print()
        print(report.format_targets(results["targets"]))
    if args.link_model:
        print()
        print(report.format_projections(results["projections"]))
    print(
        f"\nwrote {args.out / 'results.json'}, {args.out / 'loss_vs_bytes.png'}, {args.out / 'loss_vs_time.png'}"
    )
    return results


def run_islands(args: BenchArgs, *, argv: list[str]) -> dict[str, Any]:
    """The flat run (into ``OUT/flat``), the islands run (into ``OUT``), then their comparison."""
    from lowband.bench import report
    from lowband.bench.islands import compare, format_comparison

    shape = "+".join(map(str, args.islands))
    print(f"== flat run: {len(args.islands)} processes, one whole replica each ==", flush=True)
    flat = run(replace(args, islands=(), out=args.out / "flat", threads=args.threads), argv=argv)
    print(f"\n== islands run: {shape} ({sum(args.islands)} processes, FSDP2 inside each island) ==", flush=True)
    isl = run(args, argv=argv)
    rows = compare(flat, isl, args.islands)
    isl["islands_vs_flat"] = rows
    report.write_json(args.out / "results.json", isl)
    print()
    print(format_comparison(rows))
    return isl


def main(argv: list[str] | None = None) -> int:
    """``lowband bench [flags]``; returns an exit code (2: bad flags, 130: interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except ConfigError as e:
        print(f"lowband bench: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse: --help, or a flag it rejected itself
        return int(e.code or 0)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        if args.islands:
            run_islands(args, argv=argv)
        else:
            run(args, argv=argv)
    except ConfigError as e:  # found before any process started (corpus, model)
        print(f"lowband bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\nlowband bench: interrupted; workers, coordinator and link emulator stopped",
            file=sys.stderr,
        )
        return 130
    except LowbandError as e:
        print(f"lowband bench: error: {e}", file=sys.stderr)
        return 1
    return 0
