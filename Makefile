# lowband: two commands do everything on a fresh machine (README, "Quickstart").
#   make bench   set up .venv and run `lowband bench` on its embedded default
#   make test    set up .venv and run the test suite (what .ci/run calls)
#
# torch: TORCH picks the requirement (default: the CPU-friendly pinned release).
# GPU users: `make setup TORCH=torch` (a CUDA build); CPU users on a machine without
# a local wheel: `make setup PIP_TORCH_ARGS="--index-url <PyTorch CPU wheel index>"`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
PIP_TORCH_ARGS ?=
EXTRAS ?= dev,bench,triton
PYTEST_ARGS ?=

.PHONY: setup test bench codecs lint clean

setup: $(VENV)/.lowband-ready

$(VENV)/.lowband-ready: pyproject.toml setup.py $(wildcard csrc/*.c csrc/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(PIP_TORCH_ARGS) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/python -c "import lowband.kernels as k; print('lowband kernels:', k.available_backends('cpu'))"
	touch $@

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/lowband bench

codecs: setup
	$(BIN)/lowband codecs

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info lowband/_native*.so
