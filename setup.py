"""Build resfused: pure Python always; resfused._C (CUDA C++) when a CUDA toolkit and a CUDA torch exist.

Environment variables (pip has no --global-option any more):
  RESFUSED_SKIP_CUDA_BUILD=1   build pure Python only
  RESFUSED_FORCE_CUDA_BUILD=1  a missing toolkit or a failed CUDA build is an error
  TORCH_CUDA_ARCH_LIST         architectures; default: the visible GPU's, else "8.0;9.0+PTX"
  MAX_JOBS                     parallel compile jobs; default from cores and memory
Install with `pip install --no-build-isolation -e .` so the build sees the installed torch.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


SKIP = _flag("RESFUSED_SKIP_CUDA_BUILD")
FORCE = _flag("RESFUSED_FORCE_CUDA_BUILD")


def _say(msg: str) -> None:
    print(f"resfused setup: {msg}", file=sys.stderr)


def _give_up(msg: str):
    if FORCE:
        raise RuntimeError(f"RESFUSED_FORCE_CUDA_BUILD=1 but {msg}")
    _say(f"{msg}; building pure Python (the cuda backend will be unavailable)")
    return [], {}


def _wheel_dirs(sub: str, marker: str) -> list:
    """``nvidia/*/<sub>`` folders of the nvidia-* wheels torch depends on that hold ``marker``."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for base in spec.submodule_search_locations:
        for d in sorted(glob.glob(os.path.join(base, "*", sub))):
            if os.path.exists(os.path.join(d, marker)):
                found.append(d)
    return found


def _wheel_cuda_includes() -> list:
    """Include dirs from the nvidia-* wheels: ATen's CUDA headers need cusparse.h, csrc/conv_bn.cpp cudnn.h."""
    return _wheel_dirs("include", "cusparse.h") + _wheel_dirs("include", "cudnn.h")


def _cudnn_link_args() -> list:
    """Link libcudnn.so.9 (csrc/conv_bn.cpp calls cuDNN's graph API): the wheel's, else the toolkit's. At run
    time torch has loaded it already (libtorch_cuda needs it), so the soname resolves to torch's copy."""
    for lib in _wheel_dirs("lib", "libcudnn.so.9"):
        return [f"-L{lib}", "-l:libcudnn.so.9"]
    return ["-lcudnn"]


def _default_max_jobs() -> int:
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    return max(1, min(cores, int(mem_gib // 4)))  # nvcc on torch headers peaks near 3-4 GiB


def _cuda_extension():
    if SKIP:
        _say("RESFUSED_SKIP_CUDA_BUILD=1: building pure Python")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:
        return _give_up(f"torch is not importable at build time ({e}); use --no-build-isolation")
    if torch.version.cuda is None:
        return _give_up("torch is a CPU-only build")
    if CUDA_HOME is None:
        return _give_up("no CUDA toolkit found (set CUDA_HOME)")
    # csrc/*.{cpp,cu} and each op's folder of translation units (csrc/bn_add_relu/); csrc/sim/ is the CPU
    # test runtime, built by resfused/_cuda_sim.py, never into _C
    sources = sorted(
        glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu"))
        + glob.glob(os.path.join("csrc", "bn_add_relu", "*.cpp")) + glob.glob(os.path.join("csrc", "bn_add_relu", "*.cu")))
    if not sources:
        return _give_up("csrc/ holds no sources")
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    _say(f"building resfused._C for TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(local GPU)')} "
         f"with MAX_JOBS={os.environ['MAX_JOBS']}")

    class Build(BuildExtension):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as e:
                if FORCE:
                    raise
                _say(f"CUDA build failed ({type(e).__name__}: {e}); continuing pure Python")

    ext = CUDAExtension(
        name="resfused._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + _wheel_cuda_includes(),
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            "nvcc": ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"],
        },
        extra_link_args=_cudnn_link_args(),
    )
    return [ext], {"build_ext": Build.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()

setup(
    packages=find_packages(include=["resfused", "resfused.*"]) + ["resfused.triton_kernels"],
    package_dir={"resfused.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
