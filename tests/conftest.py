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

try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # the property tests skip without it
    _hypothesis_settings = None
else:
    # tests/test_properties.py: "ci" (the default) is derandomized (the same examples every run, so CI never
    # flakes on a new draw) and sized to stay under ~90 s on CPU; "long" (pytest --hypothesis-profile=long)
    # draws 10x as many, randomly.
    _hypothesis_settings.register_profile("ci", max_examples=100, derandomize=True, deadline=None,
                                          print_blob=True)
    _hypothesis_settings.register_profile("long", max_examples=1000, deadline=None, print_blob=True)
    _hypothesis_settings.load_profile("ci")

import resfused  # noqa: E402  (after TRITON_INTERPRET is set)
from resfused import _backend  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


ALL_BACKENDS = ("reference", "triton", "cuda")
# On CPU, the BN + add + ReLU tests also run "auto" (what a CPU user gets: "native", aten's batch norm, for
# float32/float64) and "cuda_sim" (the cuda backend's C++ kernels on the CPU SIMT runtime). On a GPU both are
# covered by the real thing.
CPU_EXTRA_BACKENDS = [] if HAS_CUDA else ["auto", "cuda_sim"]


def prepare_backend(backend):
    """Build what ``backend`` needs before a test uses it (cuda_sim: the runtime, cached by source)."""
    if backend == "cuda_sim":
        from resfused import _cuda_sim

        _cuda_sim.build()


def usable_backends(device=DEVICE, unavailable_reason=None):
    """The concrete backends the tests run on ``device``: on a CUDA device every backend (one that cannot
    run fails each of its tests, explicitly requested backends raise with the reason; a GPU machine
    missing a backend is a failure, never a skip); on CPU those that can run there (reference, and triton
    in the interpreter). ``unavailable_reason(name, device)``: the op's own availability check (default:
    resfused._backend's)."""
    if device.type == "cuda":
        return list(ALL_BACKENDS)
    why = unavailable_reason or (lambda name, dev: _backend.unavailable_reason(name, dev))
    return [b for b in ALL_BACKENDS if why(b, device) is None]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _full_fp32_precision():
    """fp32 comparisons at full fp32 precision: no TF32 in cuDNN convolutions or matmuls (the TF32 tests turn
    it on themselves)."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


@pytest.fixture
def deterministic_cudnn():
    """cuDNN's deterministic algorithms (and resfused's cuDNN plans filtered the same way): no convolution or
    statistics reduction may add in a run-dependent order, or no two runs, captured or not, are bitwise equal."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _reset_backend():
    resfused.set_backend(None)
    yield
    resfused.set_backend(None)
