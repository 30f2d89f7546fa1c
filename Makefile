# make test   create .venv, install pinned torch/torchvision/triton + the package (building resfused._C
#             when a CUDA toolkit is present), run the tests
# make bench  the benchmarks: kernel + model suites on a GPU; on a CPU-only machine, says so and runs
#             the CPU-meaningful checks
# make static        static kernel report for H100 (sm_90, no GPU needed) -> bench/results/static/sm90.{json,md}
# make static-check  its CI subset: fails when a kernel no longer compiles or a config in use spills
# RESFUSED_SKIP_CUDA_BUILD=1 skips the CUDA C++ build; RESFUSED_FORCE_CUDA_BUILD=1 makes it mandatory.

VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.resfused-installed
DEPS   := torch==2.14.1 torchvision==0.29.1 triton==3.8.0
TOOLS  := pytest pytest-xdist pytest-benchmark numpy matplotlib tqdm ninja timm
PYTEST_ARGS ?= -n 2

ifeq ($(CUDA_HOME),)
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME := /usr/local/cuda
endif
endif

.PHONY: test bench static static-check install clean

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.deps: | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(DEPS) $(TOOLS)
	touch $@

$(STAMP): $(VENV)/.deps setup.py pyproject.toml $(wildcard csrc/*)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m resfused
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

bench: $(STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

static: $(STAMP)
	$(PY) bench/static_report.py

static-check: $(STAMP)
	$(PY) bench/static_report.py --check

clean:
	rm -rf build *.egg-info resfused/_C*.so $(STAMP)
