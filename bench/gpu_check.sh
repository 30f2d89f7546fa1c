#!/usr/bin/env bash
# bench/gpu_check.sh: the one prepared check for a lent GPU machine. The plan, its caps and its outputs are
# described in bench/gpu_check.py (`bash bench/gpu_check.sh --help`, `--plan`); this wrapper only picks the Python.
#
#     [OUT=dir] [GIT_SHA=sha] [PYTHON=python3] bash bench/gpu_check.sh [--simulate | --dry-run | --plan | --stamp | --help]
#
# On the device machine (Python 3.12, torch 2.11.0+cu130, no network), from the repository root:
#     OUT=$OUT GIT_SHA=<sha> bash bench/gpu_check.sh          (timeout_s 480: leaves room for one rerun)
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHON="$PY"
exec "$PY" bench/gpu_check.py "$@"
