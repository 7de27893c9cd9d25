"""``lowband bench``: bytes, time and loss of each training method on emulated internet links.

Modules: :mod:`~lowband.bench.cli` (the command), :mod:`~lowband.bench.runner` (emulator,
coordinator and worker processes), :mod:`~lowband.bench.worker` (one worker's training),
:mod:`~lowband.bench.methods` (one adapter per method), :mod:`~lowband.bench.report` and
:mod:`~lowband.bench.plots` (results), :mod:`~lowband.bench.model` and
:mod:`~lowband.bench.data` (the small byte-level transformer and its corpus, also used by the
examples). Nothing is imported here, so ``import lowband.bench`` stays cheap.
"""

__all__: list[str] = []
