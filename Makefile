# make test   create .venv, install pinned torch/torchvision/triton + the package (building resfused._C
#             when a CUDA toolkit is present), run the tests
# make bench  the benchmarks: kernel + model suites on a GPU; on a CPU-only machine, says so and runs
#             the CPU-meaningful checks
# make test-compat   the same on the GPU machine's stack (Python 3.12, torch 2.11.0, triton 3.6.0,
#             torchvision 0.26.0, numpy < 2.4) in .venv-compat: builds _C against torch 2.11's headers and runs
#             the CPU suite but the slow whole-model tests (COMPAT_PYTEST_ARGS), so a version mismatch shows
#             here, not in device minutes
# make static        static kernel report for H100 (sm_90, no GPU needed) -> bench/results/static/sm90.{json,md}
# make static-check  its CI subset: fails when a kernel no longer compiles or a config in use spills
# RESFUSED_SKIP_CUDA_BUILD=1 skips the CUDA C++ build; RESFUSED_FORCE_CUDA_BUILD=1 makes it mandatory.

VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.resfused-installed
DEPS   := torch==2.14.1 torchvision==0.29.1 triton==3.8.0
TOOLS  := pytest pytest-xdist pytest-timeout pytest-benchmark numpy matplotlib tqdm ninja timm hypothesis
PYTEST_ARGS ?= -n 2

# The lent GPU machine's stack (bench/gpu_check.sh runs there): see `make test-compat`.
COMPAT_VENV   ?= .venv-compat
COMPAT_PY     := $(COMPAT_VENV)/bin/python
COMPAT_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(shell command -v python3.12) python3)
COMPAT_DEPS   := torch==2.11.0 torchvision==0.26.0 triton==3.6.0 "numpy<2.4"
COMPAT_STAMP  := $(COMPAT_VENV)/.resfused-installed
COMPAT_PYTEST_ARGS ?= -n 2 -m "not slow"

ifeq ($(CUDA_HOME),)
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME := /usr/local/cuda
endif
endif

.PHONY: test test-compat bench static static-check install hooks clean

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.deps: | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(DEPS) $(TOOLS)
	touch $@

$(STAMP): $(VENV)/.deps setup.py pyproject.toml $(wildcard csrc/* csrc/*/*)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m resfused
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

$(COMPAT_PY):
	$(COMPAT_PYTHON) -m venv $(COMPAT_VENV)

$(COMPAT_VENV)/.deps: | $(COMPAT_PY)
	$(COMPAT_PY) -m pip install -q --upgrade pip
	$(COMPAT_PY) -m pip install -q $(COMPAT_DEPS) $(filter-out numpy,$(TOOLS))
	touch $@

$(COMPAT_STAMP): $(COMPAT_VENV)/.deps setup.py pyproject.toml $(wildcard csrc/* csrc/*/*)
	$(COMPAT_PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test-compat: $(COMPAT_STAMP)
	$(COMPAT_PY) -m resfused
	$(COMPAT_PY) -c "import torch, triton, torchvision, numpy, sys; print('compat stack:', sys.version.split()[0], torch.__version__, triton.__version__, torchvision.__version__, numpy.__version__)"
	$(COMPAT_PY) -m pytest -q $(COMPAT_PYTEST_ARGS) tests

bench: $(STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

static: $(STAMP)
	$(PY) bench/static_report.py

static-check: $(STAMP)
	$(PY) bench/static_report.py --check

# The git-SHA stamp .git-sha (what a device copy, which has no .git, reports as its commit) rewritten after every
# commit, checkout and merge. Stdlib Python only: no venv needed.
HOOKS := post-commit post-checkout post-merge
hooks:
	@d=$$(git rev-parse --git-path hooks) && mkdir -p "$$d" && for h in $(HOOKS); do \
	  printf '#!/bin/sh\n# installed by `make hooks`\nexec python3 bench/gpu_check.py --stamp >/dev/null\n' > "$$d/$$h"; \
	  chmod +x "$$d/$$h"; echo "installed $$d/$$h"; done
	python3 bench/gpu_check.py --stamp

clean:
	rm -rf build *.egg-info resfused/_C*.so $(STAMP) $(COMPAT_STAMP)
