# `make test` and `make demo` each set up .venv when it is missing or older than
# pyproject.toml, then run. torch/torchvision are pinned here and installed first
# (pip finds these builds on this machine's disk); the project then accepts them.
# Bytecode: pip installs without compiling (--no-compile; it compiles one file at a time),
# then compileall compiles the whole environment and the project on every core. Without
# .pyc files every process compiles torch again when it imports it, since these machines
# (and CI) set PYTHONDONTWRITEBYTECODE: `import torch, torchvision` took 9.9 CPU-s instead
# of 3.9 (bench/import_bytecode.py), in each of the suite's few hundred processes.
# torch ships one Python 3.12-only test file, which compileall skips.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: test test-fast demo lint setup clean bench components

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile --upgrade pip
	$(PY) -m pip install --quiet --no-compile $(TORCH)
	$(PY) -m pip install --quiet --no-compile -e '.[dev]'
	$(PY) -m compileall -q -j 0 -x 'torch/testing/_internal/py312_intrinsics' \
		"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" ssl_train shards
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m ssl_train.stages.codegen --check

# ssl_train/components.py (the TorchX components) is generated from the stage declarations
components: $(STAMP)
	$(PY) -m ssl_train.stages.codegen

test: $(STAMP) lint
	$(PY) -m pytest -q --durations=20

# everything but the end-to-end runs marked slow: a few minutes, for iterating
test-fast: $(STAMP) lint
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/ssl-train demo --out demo-out

bench: $(STAMP)
	$(PY) bench/shards_create.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache
