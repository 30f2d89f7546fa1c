"""pytest-benchmark entry for the kernel suites (GPU; every case skips without one):

    pytest bench/ --benchmark-only [--bench-quick] [--bench-batch N] [-k fp32] [-k conv_bias]

Collects the suites' bench_*.py files besides test_*.py. The cases are bench_bn_add_relu's and
bench_conv_bias_act's: the full GPU selections, or with --bench-quick the subsets `bench/run.py --quick`
times; the implementations are each suite's GPU_IMPLS (BN: eager, compile, resfused-cuda, resfused-triton;
conv: those and cudnn-fused); an unavailable one skips with its reason.
pytest-benchmark times wall clock around a synchronized call; bench/run.py's CUDA-event timings
are the numbers the reports use.
"""

import importlib.util

import pytest

HAVE_PYTEST_BENCHMARK = importlib.util.find_spec("pytest_benchmark") is not None


def pytest_addoption(parser):
    group = parser.getgroup("resfused bench")
    group.addoption("--bench-quick", action="store_true", help="only the cases of `bench/run.py --quick`")
    group.addoption("--bench-batch", type=int, default=None, help="batch size N of the kernel shapes, both suites "
                    "(default 256)")


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        if not HAVE_PYTEST_BENCHMARK:
            return None
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_report_header(config):
    if not HAVE_PYTEST_BENCHMARK:
        return "bench/: pytest-benchmark is not installed: the kernel benchmarks are not collected"
    return None


def pytest_generate_tests(metafunc):
    from bench import bench_bn_add_relu as kernels
    from bench import bench_conv_bias_act as convs

    if "conv_case" in metafunc.fixturenames:
        sel = dict(convs.SELECTIONS[(True, metafunc.config.getoption("--bench-quick"))])
        if metafunc.config.getoption("--bench-batch"):
            sel["batch"] = metafunc.config.getoption("--bench-batch")
        cases = convs.conv_cases(**sel)
        metafunc.parametrize("conv_case", cases, ids=[c.id for c in cases])
    if "conv_impl" in metafunc.fixturenames:
        metafunc.parametrize("conv_impl", convs.GPU_IMPLS)
    if "kernel_case" in metafunc.fixturenames:
        sel = dict(kernels.SELECTIONS[(True, metafunc.config.getoption("--bench-quick"))])
        if metafunc.config.getoption("--bench-batch"):
            sel["batch"] = metafunc.config.getoption("--bench-batch")
        cases = kernels.kernel_cases(**sel)
        metafunc.parametrize("kernel_case", cases, ids=[c.id for c in cases])
    if "kernel_impl" in metafunc.fixturenames:
        metafunc.parametrize("kernel_impl", kernels.GPU_IMPLS)
