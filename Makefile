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

.PHONY: test test-fast demo lint setup environments clean bench components tf-env floor-env image wheelhouse

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile --upgrade pip
	$(PY) -m pip install --quiet --no-compile $(TORCH)
	$(PY) -m pip install --quiet --no-compile -e '.[dev]'
	$(PY) -m compileall -q -j 0 -x 'torch/testing/_internal/py312_intrinsics' \
		"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" ssl_train shards
	touch $(STAMP)

# .venv-tf: a separate environment with TensorFlow (tests/tf_env.txt) in which the tests
# write real TensorFlow checkpoints for ssl-train's reader (ssl_train/checkpoint_import/),
# which needs no TensorFlow. Created once, reinstalled only when tests/tf_env.txt changes;
# the tests that need it skip, saying so, when it is missing. Its bytecode is compiled
# like .venv's: each helper process imports TensorFlow.
TF_VENV := .venv-tf
TF_STAMP := $(TF_VENV)/.installed

tf-env: $(TF_STAMP)

$(TF_STAMP): tests/tf_env.txt
	test -x $(TF_VENV)/bin/python || $(PYTHON) -m venv $(TF_VENV)
	$(TF_VENV)/bin/python -m pip install --quiet --no-compile -r tests/tf_env.txt
	$(TF_VENV)/bin/python -m compileall -q -j 0 \
		"$$($(TF_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/tensorflow"
	touch $(TF_STAMP)

# .venv-floor/site: the oldest s3fs, fsspec and botocore pyproject.toml accepts
# (tests/floor_env.txt), installed beside .venv, not into it; the floor test puts them
# ahead of .venv's packages in a child process. Reinstalled when the file changes.
FLOOR_SITE := .venv-floor/site
FLOOR_STAMP := .venv-floor/.installed

floor-env: $(FLOOR_STAMP)

$(FLOOR_STAMP): tests/floor_env.txt $(STAMP)
	rm -rf $(FLOOR_SITE)
	$(PY) -m pip install --quiet --no-compile --target $(FLOOR_SITE) -r tests/floor_env.txt
	$(PY) -m compileall -q -j 0 $(FLOOR_SITE)
	touch $(FLOOR_STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m ssl_train.stages.codegen --check

# ssl_train/components.py (the TorchX components) is generated from the stage declarations
components: $(STAMP)
	$(PY) -m ssl_train.stages.codegen

# The environments are installed side by side (pips, each mostly one core).
environments:
	$(MAKE) -j2 $(STAMP) $(TF_STAMP)
	$(MAKE) $(FLOOR_STAMP)

# The fast tier (everything not marked slow: single-process tests, each mostly on one
# core) runs in TEST_WORKERS processes (pytest-xdist), a test file per worker so that its
# module fixtures are built once; OpenMP waits without spinning, since the cores are
# shared. `make test` adds the image tests (marker containers) to that pass, first:
# building the image is mostly one core of unpacking and layer hashing. The rest of the
# slow tier runs alone afterwards: its runs start several multi-threaded processes each
# and time real windows (a preemption's checkpoint, a lease), and beside other tests
# they ran several times slower and timed out (BENCHMARKS.md, issue 28).
TEST_WORKERS ?= 2
PARALLEL := -n $(TEST_WORKERS) --dist loadfile
SHARED_CORES := OMP_WAIT_POLICY=PASSIVE

test: environments lint
	$(SHARED_CORES) $(PY) -m pytest -q -m "not slow or containers" $(PARALLEL) --durations=10
	$(PY) -m pytest -q -m "slow and not containers" --durations=20

# everything but the end-to-end runs marked slow: a few minutes, for iterating
test-fast: environments lint
	$(SHARED_CORES) $(PY) -m pytest -q -m "not slow" $(PARALLEL) --durations=5

demo: $(STAMP)
	$(VENV)/bin/ssl-train demo --out demo-out

bench: $(STAMP)
	$(PY) bench/shards_create.py

clean:
	rm -rf $(VENV) $(TF_VENV) demo-out .pytest_cache .ruff_cache

# The training image (docker/Dockerfile), built with podman, or docker where that is what
# the machine has. The wheelhouse holds the project's wheel and every dependency wheel,
# torch pinned as above, so the build needs no network. BASE_IMAGE defaults to a local
# Debian base made by debootstrap (docker/local-base.sh), which builds the CPU image on
# any Linux box; for a cluster image pass the CUDA one, e.g.
#   make image BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime IMAGE=registry/ml/ssl-train:TAG
ENGINE ?= $(shell command -v podman 2>/dev/null || command -v docker 2>/dev/null)
IMAGE ?= localhost/ssl-train:dev
LOCAL_BASE := localhost/ssl-train-base:bookworm-python
BASE_IMAGE ?= $(LOCAL_BASE)
WHEELHOUSE := build/wheelhouse
# PyPI's torch 2.14.1 is built for CUDA 13.0 (NVIDIA driver 580.65.06 or newer). For a
# cluster with an older driver, take the same torch built for another CUDA from
# PyTorch's index, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu128 (driver
# 525.60.13 or newer); its local version (+cu128) ranks above PyPI's.
TORCH_INDEX ?=
export CONTAINERS_CONF ?= $(CURDIR)/docker/containers.conf

wheelhouse: $(STAMP)
	rm -rf $(WHEELHOUSE)
	$(PY) -m pip wheel --quiet --no-deps --wheel-dir $(WHEELHOUSE)/project .
	$(PY) -m pip wheel --quiet --wheel-dir $(WHEELHOUSE)/deps \
		$(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) $(TORCH) $(WHEELHOUSE)/project/*.whl
	rm -f $(WHEELHOUSE)/deps/ssl_train-*.whl

image: wheelhouse
	@test -n "$(ENGINE)" || { echo "make image: neither podman nor docker is installed" >&2; exit 2; }
	if [ "$(BASE_IMAGE)" = "$(LOCAL_BASE)" ]; then ENGINE=$(ENGINE) docker/local-base.sh $(LOCAL_BASE); fi
	$(ENGINE) build --build-arg BASE_IMAGE=$(BASE_IMAGE) \
		--build-arg DEPS_DIGEST=$$(cd $(WHEELHOUSE)/deps && ls -l --time-style=+ *.whl | awk '{print $$5, $$NF}' | sha256sum | cut -c1-16) \
		-f docker/Dockerfile -t $(IMAGE) .
	$(ENGINE) image inspect --format '{{.Size}}' $(IMAGE) | \
		awk '{printf "built $(IMAGE): %.2f GB\n", $$1 / 1e9}'
