"""Shared fixtures: the device under test and the backends that can run on it.

On a machine without a GPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set here
before anything imports triton) on CPU tensors; on a GPU every backend runs on CUDA tensors.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # One fixed config per Triton kernel: autotuning compiles ~9 configs for every test shape, minutes of
    # compiling that would not fit bench/gpu_check.sh's test budget. The benchmarks run the autotuned kernels
    # and check their outputs.
    os.environ.setdefault("RESFUSED_TRITON_AUTOTUNE", "0")

import resfused  # noqa: E402  (after TRITON_INTERPRET is set)
from resfused import _backend  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def usable_backends(device=DEVICE):
    """Concrete backends that can run on ``device``; reference always."""
    return [b for b in ("reference", "triton", "cuda") if _backend.unavailable_reason(b, device) is None]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _reset_backend():
    resfused.set_backend(None)
    yield
    resfused.set_backend(None)
