"""The ``cuda_sim`` backend: the CUDA C++ BN + add + ReLU kernels of csrc/ executed on CPU tensors by a
CPU SIMT runtime (csrc/sim/). A correctness tool for tests, never picked by ``auto`` and never fast.

What runs is the real device code (csrc/bn_add_relu/*.cuh), the real launch sequences (launch.cuh) and
the real planner (plan.cpp), compiled by the system C++ compiler; the planner is fed a simulated device's
properties (H100's by default: 132 SMs, 228 KiB shared memory per SM, 64 K registers, 2,048 threads per
SM), so the two-pass and the persistent (cooperative) scheme both run at small shapes. Each CUDA thread
is a fiber; ``settings()`` picks the order in which threads and blocks run (forward, reverse, random) and
the checks: shared-memory races between barriers and out-of-bounds accesses outside the call's tensors
raise ``SimError``. Results are not bit-equal to a GPU's (rsqrtf, FMA contraction differ).

Built on demand by ``build()`` (seconds; cached under build/cuda_sim/ keyed on the sources, the flags
and the compiler), and only from a source checkout (csrc/ next to the package). The scheme knobs are the
cuda backend's: RESFUSED_CUDA_SCHEME (auto | two_pass | persistent) and
RESFUSED_CUDA_PERSISTENT_CACHE_BYTES, read on every call.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass, replace
from typing import Optional

import torch

Tensor = torch.Tensor

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# RESFUSED_SIM_CSRC: another csrc/ tree (tests build deliberately broken copies of the kernels)
_CSRC = os.environ.get("RESFUSED_SIM_CSRC") or os.path.join(_ROOT, "csrc")
_SOURCES = ("sim/runtime.cpp", "bn_add_relu/plan.cpp", "sim/bn_add_relu_sim.cpp", "sim/planted.cpp")
# the kernels' translation unit: every memory access calls the runtime's check hooks (no sanitizer
# runtime is linked: -fsanitize=kernel-address leaves the callbacks to us)
_INSTRUMENT = ["-fsanitize=kernel-address", "--param", "asan-instrumentation-with-call-threshold=0",
               "--param", "asan-stack=0", "--param", "asan-globals=0"]
_FLAGS = ["-std=c++20", "-O1", "-g0", "-fPIC", "-fno-strict-aliasing", "-fno-fast-math", "-ffp-contract=off",
          "-U_FORTIFY_SOURCE", "-Wall", "-Wno-unknown-pragmas"]

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_SCHEME_CODES = {"auto": 0, "two_pass": 1, "persistent": 2}
_ORDER_CODES = {"forward": 0, "reverse": 1, "random": 2}


class SimError(RuntimeError):
    """A kernel failed a check of the runtime (race, bounds, barrier) or a launch was invalid."""


@dataclass(frozen=True)
class Device:
    """The simulated device: planner inputs and the launch-time co-residency check. Register counts per
    thread are assumptions (64 for every kernel kind: the two-pass reductions, the two-pass elementwise
    kernels, the persistent kernels; bench/results/static/sm90.json has what ptxas gives each);
    ``launch_persistent_regs`` larger than ``persistent_regs`` makes planned cooperative launches fail at
    launch (tests of the fallback). ``l2_bytes`` feeds the planner's cost model (re-read hits)."""
    sms: int = 132
    smem_per_sm: int = 233472
    smem_optin: int = 232448
    smem_reserved: int = 1024
    regs_per_sm: int = 65536
    threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    cooperative: bool = True
    l2_bytes: int = 50331648
    reduce_regs: int = 64
    elementwise_regs: int = 64
    persistent_regs: int = 64
    launch_persistent_regs: int = 64


H100 = Device()


@dataclass(frozen=True)
class Settings:
    order: str = "forward"
    seed: int = 0
    races: bool = True
    bounds: bool = True
    device: Device = H100


_lock = threading.RLock()
_lib = None
_lib_error: Optional[str] = None
_settings = Settings()
_applied: Optional[Settings] = None


def _compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _source_files() -> list[str]:
    files = []
    for sub in ("sim", "bn_add_relu"):
        d = os.path.join(_CSRC, sub)
        for name in sorted(os.listdir(d)):
            if name.endswith((".h", ".cuh", ".cpp")):
                files.append(os.path.join(d, name))
    return files


def _cache_dir() -> str:
    return os.environ.get("RESFUSED_SIM_CACHE") or os.path.join(_ROOT, "build", "cuda_sim")


def _library_path(cxx: str) -> str:
    h = hashlib.sha256()
    for f in _source_files():
        h.update(os.path.relpath(f, _CSRC).encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h.update(" ".join(_FLAGS + _INSTRUMENT).encode() + version.encode())
    return os.path.join(_cache_dir(), f"resfused_sim_{h.hexdigest()[:16]}.so")


def unavailable_reason() -> Optional[str]:
    """None when the runtime library is built and loads, else why not."""
    if _lib is not None:
        return None
    if not os.path.isdir(os.path.join(_CSRC, "sim")):
        return "the cuda_sim backend needs a source checkout (csrc/sim/ next to the resfused package)"
    cxx = _compiler()
    if cxx is None:
        return "the cuda_sim backend needs a C++ compiler (g++)"
    if _lib_error is not None:
        return _lib_error
    if not os.path.exists(_library_path(cxx)):
        return "the cuda_sim runtime is not built; call resfused._cuda_sim.build() (tests do)"
    return None if _load(_library_path(cxx)) is not None else _lib_error


def build() -> str:
    """Compile the runtime and the kernels with the system C++ compiler (cached); returns the library path.
    Raises RuntimeError when the compiler fails."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("cuda_sim: no C++ compiler found (set CXX)")
    path = _library_path(cxx)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)  # pytest-xdist workers build once
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            objs, procs = [], []
            for src in _SOURCES:
                obj = f"{tmp}.{os.path.basename(src)}.o"
                flags = _FLAGS + (_INSTRUMENT if src.endswith(("_sim.cpp", "planted.cpp")) else [])
                procs.append((src, subprocess.Popen([cxx, *flags, "-c", os.path.join(_CSRC, src), "-o", obj],
                                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
                objs.append(obj)
            errors = []
            for src, p in procs:
                out, _ = p.communicate()
                if p.returncode != 0:
                    errors.append(f"{src}:\n{out}")
            if not errors:
                p = subprocess.run([cxx, "-shared", *objs, "-o", tmp], capture_output=True, text=True)
                if p.returncode != 0:
                    errors.append(p.stdout + p.stderr)
            for o in objs:
                with contextlib.suppress(OSError):
                    os.remove(o)
            if errors:
                raise RuntimeError("cuda_sim: building the runtime failed:\n" + "\n".join(errors)[-8000:])
            os.replace(tmp, path)
    if _load(path) is None:
        raise RuntimeError(f"cuda_sim: {_lib_error}")
    return path


def _load(path: str):
    global _lib, _lib_error
    with _lock:
        if _lib is not None:
            return _lib
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            _lib_error = f"cuda_sim: cannot load {path}: {e}"
            return None
        lib.rf_sim_error.restype = ctypes.c_char_p
        lib.rf_sim_kernel_counts.restype = ctypes.c_char_p
        lib.rf_sim_planted_error.restype = ctypes.c_char_p
        _lib = lib
        return lib


def _library():
    why = unavailable_reason()
    if why is not None:
        raise RuntimeError(f"resfused backend 'cuda_sim' is unavailable: {why}")
    return _lib


@contextlib.contextmanager
def settings(**changes):
    """Run the enclosed calls with other Settings fields (order, seed, races, bounds, device)."""
    global _settings
    for k, v in changes.items():
        if k not in Settings.__dataclass_fields__:
            raise TypeError(f"cuda_sim.settings: unknown setting {k!r}")
        if k == "order" and v not in _ORDER_CODES:
            raise ValueError(f"cuda_sim.settings: order must be one of {tuple(_ORDER_CODES)}, got {v!r}")
    with _lock:
        old = _settings
        _settings = replace(old, **changes)
        try:
            yield _settings
        finally:
            _settings = old


def _check(rc: int, lib) -> int:
    if rc < 0:
        raise SimError(lib.rf_sim_error().decode())
    return rc


def _apply(lib) -> None:
    global _applied
    s = _settings
    if _applied is not None and _applied.device == s.device and _applied == s and s.order != "random":
        return
    d = s.device
    if _applied is None or _applied.device != d:
        props = (ctypes.c_int * 9)(d.sms, d.smem_per_sm, d.smem_optin, d.smem_reserved, d.regs_per_sm,
                                   d.threads_per_sm, d.max_blocks_per_sm, int(d.cooperative), d.l2_bytes)
        _check(lib.rf_sim_configure(props, d.reduce_regs, d.elementwise_regs, d.persistent_regs,
                                    d.launch_persistent_regs), lib)
    _check(lib.rf_sim_set_run(_ORDER_CODES[s.order], ctypes.c_uint64(s.seed), int(s.races), int(s.bounds)), lib)
    _applied = s


def kernel_counts() -> dict[str, int]:
    """Launches per kernel ("cl_stats_kernel<F32>", ...) since the library was loaded in this process."""
    lib = _library()
    text = lib.rf_sim_kernel_counts().decode()
    return {k: int(v) for k, v in (item.split("=") for item in text.split(";") if item)}


_PLANTED = {"clean": 0, "race": 1, "oob_write": 2, "divergent_sync": 3}


def run_planted(which: str, values: Tensor) -> Tensor:
    """Run one of csrc/sim/planted.cpp's kernels (one block, a thread per value) under the current
    settings; returns its output, raises SimError when a check catches it."""
    lib = _library()
    if which not in _PLANTED:
        raise ValueError(f"cuda_sim.run_planted: which must be one of {tuple(_PLANTED)}, got {which!r}")
    values = values.to(torch.float32).contiguous()
    out = torch.zeros_like(values)
    with _lock:
        _apply(lib)
        _regions(lib, {"in": values, "out": out})
        rc = lib.rf_sim_planted(_PLANTED[which], _ptr(values), _ptr(out), values.numel())
    if rc < 0:
        raise SimError(lib.rf_sim_planted_error().decode())
    return out


# ---- the backend functions (contract: resfused/reference/bn_add_relu.py)

def _requested_scheme() -> int:
    v = os.environ.get("RESFUSED_CUDA_SCHEME", "") or "auto"
    if v not in _SCHEME_CODES:
        raise RuntimeError("resfused_cuda: RESFUSED_CUDA_SCHEME must be auto, two_pass or persistent")
    return _SCHEME_CODES[v]


def _cache_cap() -> int:
    v = os.environ.get("RESFUSED_CUDA_PERSISTENT_CACHE_BYTES", "")
    if v == "":
        return -1
    if not v.isdigit():
        raise RuntimeError("resfused_cuda: RESFUSED_CUDA_PERSISTENT_CACHE_BYTES must be a non-negative integer, "
                           f"got '{v}'")
    return int(v)


def _shape(x: Tensor, name: str = "x") -> tuple:
    """(dtype code, layout code, N, C, H*W) of a CPU 4-D fp32/fp16/bf16 tensor, NCHW or channels_last."""
    if x.device.type != "cpu":
        raise RuntimeError(f"resfused_cuda_sim: {name} must be a CPU tensor, got a tensor on {x.device}")
    if x.dim() != 4:
        raise RuntimeError(f"resfused_cuda_sim: {name} must be 4-D (N, C, H, W), got {x.dim()}-D")
    if x.dtype not in _DTYPE_CODES:
        raise RuntimeError(f"resfused_cuda_sim: {name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.is_contiguous():
        layout = 0
    elif x.is_contiguous(memory_format=torch.channels_last):
        layout = 1
    else:
        raise RuntimeError(f"resfused_cuda_sim: {name} must be contiguous (NCHW) or channels_last, got strides "
                           f"{x.stride()}")
    n, c, h, w = x.shape
    return (_DTYPE_CODES[x.dtype], layout, n, c, h * w)


def _like_x(t: Tensor, name: str, x: Tensor) -> None:
    if t.dtype != x.dtype or t.shape != x.shape or t.device != x.device:
        raise RuntimeError(f"resfused_cuda_sim: {name} must have x's shape, dtype and device")
    fmt = torch.channels_last if (not x.is_contiguous()) else torch.contiguous_format
    if not t.is_contiguous(memory_format=fmt):
        raise RuntimeError(f"resfused_cuda_sim: {name} must have x's memory layout, got strides {t.stride()}")


def _vec(t: Optional[Tensor], name: str, c: int) -> Optional[Tensor]:
    if t is None:
        return None
    if t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != 1 or t.shape[0] != c or not t.is_contiguous():
        raise RuntimeError(f"resfused_cuda_sim: {name} must be a contiguous float32 CPU tensor of shape ({c},)")
    return t


def _ptr(t: Optional[Tensor]):
    return ctypes.c_void_p(t.data_ptr()) if t is not None and t.numel() > 0 else ctypes.c_void_p(0)


def _regions(lib, tensors: dict) -> None:
    """The call's tensors by name: the memory its kernels may touch (the bounds check)."""
    live = [(k, t) for k, t in tensors.items() if t is not None and t.numel() > 0]
    n = max(len(live), 1)
    ptrs = (ctypes.c_void_p * n)(*[t.data_ptr() for _, t in live])
    sizes = (ctypes.c_int64 * n)(*[t.numel() * t.element_size() for _, t in live])
    names = (ctypes.c_char_p * n)(*[k.encode() for k, _ in live])
    _check(lib.rf_sim_set_regions(ptrs, sizes, names, len(live)), lib)


def _mask_shape(shape: tuple) -> tuple:
    _, layout, n, c, hw = shape
    rows, inner = (n * hw, c) if layout == 1 else (n * c, hw)
    return rows, (inner + 7) // 8


def _plan(lib, op: int, shape: tuple, training=True, need_input_grad=True, need_weight_grad=True):
    out = (ctypes.c_int64 * 10)()
    _check(lib.rf_sim_plan(op, *[ctypes.c_int64(v) if i >= 2 else v for i, v in enumerate(shape)],
                           _requested_scheme(), ctypes.c_int64(_cache_cap()), int(training), int(need_input_grad),
                           int(need_weight_grad), out), lib)
    return out


def _refuse(lib, op: int, shape: tuple, training=True, need_input_grad=True, need_weight_grad=True):
    out = (ctypes.c_int64 * 10)()
    _check(lib.rf_sim_refuse_persistent(op, *[ctypes.c_int64(v) if i >= 2 else v for i, v in enumerate(shape)],
                                        ctypes.c_int64(_cache_cap()), int(training),
                                        int(need_input_grad), int(need_weight_grad), out), lib)
    return out


def _dims(shape: tuple) -> list:
    return [shape[0], shape[1], ctypes.c_int64(shape[2]), ctypes.c_int64(shape[3]), ctypes.c_int64(shape[4])]


def _workspace(plan) -> Tensor:
    return torch.full((max(int(plan[1]), 1),), float("nan"), dtype=torch.float32)


def plan(x: Tensor, op: str) -> str:
    """The plan a call on x would use, in the cuda backend's bn_add_relu_plan format."""
    lib = _library()
    if op not in ("forward_train", "backward"):
        raise RuntimeError(f"resfused_cuda_sim: op must be 'forward_train' or 'backward', got '{op}'")
    with _lock:
        _apply(lib)
        shape = _shape(x)
        p = _plan(lib, 0 if op == "forward_train" else 1, shape)
        cost = (ctypes.c_double * 4)()
        _check(lib.rf_sim_plan_cost(0 if op == "forward_train" else 1, *_dims(shape), p, cost), lib)
    if p[0] == 2:
        return (f"persistent grid={p[5]} threads={p[6]} smem={p[7]} cache_iters={p[8]} iters={p[9]} "
                f"est_us={cost[0]:.1f}")
    return f"two_pass tiles={p[2]} splits={p[3]} est_us={cost[0]:.1f}"


_PLAN_FIELDS = ("scheme", "workspace_floats", "num_tiles", "splits", "per_block", "grid", "threads", "smem",
                "cache_iters", "iters")


def planner(shape: tuple, dtype: torch.dtype, layout: str, op: str, scheme: str = "auto") -> dict:
    """What the planner decides for a (N, C, H, W) shape without a tensor (any size): the plan of
    ``scheme`` (auto | two_pass | persistent) for ``op`` (forward_train, or backward in training with the
    input's gradient) on the simulated device, with the cost model's estimate of it (plan.h):
    ``{"scheme": "two_pass" | "persistent", <plan fields>, "us", "hbm_bytes", "launches", "grid_syncs"}``.
    RESFUSED_CUDA_PERSISTENT_CACHE_BYTES applies, as in a call."""
    if op not in ("forward_train", "backward"):
        raise ValueError(f"cuda_sim.planner: op must be 'forward_train' or 'backward', got {op!r}")
    if scheme not in _SCHEME_CODES:
        raise ValueError(f"cuda_sim.planner: scheme must be one of {tuple(_SCHEME_CODES)}, got {scheme!r}")
    if layout not in ("nchw", "cl"):
        raise ValueError(f"cuda_sim.planner: layout must be 'nchw' or 'cl', got {layout!r}")
    if dtype not in _DTYPE_CODES:
        raise ValueError(f"cuda_sim.planner: dtype must be float32, float16 or bfloat16, got {dtype}")
    n, c, h, w = shape
    dims = (_DTYPE_CODES[dtype], 1 if layout == "cl" else 0, n, c, h * w)
    lib = _library()
    op_code = 0 if op == "forward_train" else 1
    cost = (ctypes.c_double * 4)()
    with _lock:
        _apply(lib)
        p = (ctypes.c_int64 * 10)()
        _check(lib.rf_sim_plan(op_code, *_dims(dims), _SCHEME_CODES[scheme], ctypes.c_int64(_cache_cap()), 1, 1, 1,
                               p), lib)
        _check(lib.rf_sim_plan_cost(op_code, *_dims(dims), p, cost), lib)
    out = dict(zip(_PLAN_FIELDS, (int(v) for v in p)))
    out["scheme"] = "persistent" if out["scheme"] == 2 else "two_pass"
    out.update(us=cost[0], hbm_bytes=cost[1], launches=int(cost[2]), grid_syncs=int(cost[3]))
    return out


def forward_train(x, residual, weight, bias, running_mean, running_var, momentum, eps, relu):
    lib = _library()
    shape = _shape(x)
    c = shape[3]
    if residual is not None:
        _like_x(residual, "residual", x)
    weight, bias = _vec(weight, "weight", c), _vec(bias, "bias", c)
    running_mean, running_var = _vec(running_mean, "running_mean", c), _vec(running_var, "running_var", c)
    y = torch.full_like(x, float("nan"))  # unwritten outputs show
    mask = (torch.full(_mask_shape(shape), 0xA5, dtype=torch.uint8) if relu
            else torch.empty(0, dtype=torch.uint8))
    mean = torch.full((c,), float("nan"))
    invstd = torch.full((c,), float("nan"))
    with _lock:
        _apply(lib)
        p = _plan(lib, 0, shape)
        ws = _workspace(p)

        def run(p, ws):
            _regions(lib, dict(x=x, residual=residual, weight=weight, bias=bias, running_mean=running_mean,
                               running_var=running_var, y=y, mask=mask, mean=mean, invstd=invstd, workspace=ws))
            return _check(lib.rf_sim_forward_train(
                *_dims(shape), p, _ptr(x), _ptr(residual), _ptr(weight), _ptr(bias), _ptr(running_mean),
                _ptr(running_var), _ptr(y), _ptr(mask), _ptr(mean), _ptr(invstd), _ptr(ws) if p[1] > 0 else None,
                ctypes.c_double(momentum), ctypes.c_double(eps), int(relu)), lib)

        if run(p, ws) == 1:  # the cooperative launch was refused: two-pass, now and for later calls
            p = _refuse(lib, 0, shape)
            ws = _workspace(p)
            run(p, ws)
    return y, mask, mean, invstd


def forward_eval(x, residual, weight, bias, running_mean, running_var, eps, relu, save_mask):
    lib = _library()
    shape = _shape(x)
    c = shape[3]
    if residual is not None:
        _like_x(residual, "residual", x)
    weight, bias = _vec(weight, "weight", c), _vec(bias, "bias", c)
    running_mean, running_var = _vec(running_mean, "running_mean", c), _vec(running_var, "running_var", c)
    want_mask = relu and save_mask
    y = torch.full_like(x, float("nan"))
    mask = (torch.full(_mask_shape(shape), 0xA5, dtype=torch.uint8) if want_mask
            else torch.empty(0, dtype=torch.uint8))
    with _lock:
        _apply(lib)
        _regions(lib, dict(x=x, residual=residual, weight=weight, bias=bias, running_mean=running_mean,
                           running_var=running_var, y=y, mask=mask))
        _check(lib.rf_sim_forward_eval(*_dims(shape), _ptr(x), _ptr(residual), _ptr(weight), _ptr(bias),
                                       _ptr(running_mean), _ptr(running_var), _ptr(y), _ptr(mask),
                                       ctypes.c_double(eps), int(relu)), lib)
    return y, mask


def backward(grad_out, x, mask, mean, invstd, weight, relu, training, need_input_grad, need_residual_grad,
             need_weight_grad):
    lib = _library()
    shape = _shape(x)
    c = shape[3]
    _like_x(grad_out, "grad_out", x)
    mean, invstd, weight = _vec(mean, "mean", c), _vec(invstd, "invstd", c), _vec(weight, "weight", c)
    if relu:
        rows, cols = _mask_shape(shape)
        if mask.dtype != torch.uint8 or not mask.is_contiguous() or mask.numel() != rows * cols:
            raise RuntimeError(f"resfused_cuda_sim: mask must be a contiguous uint8 tensor of {rows} x {cols} "
                               "packed bits (resfused._layout)")
    empty = torch.empty(0, dtype=x.dtype)
    grad_input = torch.full_like(x, float("nan")) if need_input_grad else empty
    grad_residual = torch.full_like(x, float("nan")) if need_residual_grad else empty
    grad_weight = torch.full((c,), float("nan"))
    grad_bias = torch.full((c,), float("nan"))
    flags = (int(training), int(need_input_grad), int(need_weight_grad))
    with _lock:
        _apply(lib)
        p = _plan(lib, 1, shape, *flags)
        ws = _workspace(p)

        def run(p, ws):
            _regions(lib, dict(grad_out=grad_out, x=x, mask=mask if relu else None, mean=mean, invstd=invstd,
                               weight=weight, grad_input=grad_input, grad_residual=grad_residual,
                               grad_weight=grad_weight, grad_bias=grad_bias, workspace=ws))
            return _check(lib.rf_sim_backward(
                *_dims(shape), p, _ptr(grad_out), _ptr(x), _ptr(mask) if relu else None, _ptr(mean), _ptr(invstd),
                _ptr(weight), _ptr(grad_input) if need_input_grad else None,
                _ptr(grad_residual) if need_residual_grad else None, _ptr(grad_weight), _ptr(grad_bias),
                _ptr(ws) if p[1] > 0 else None, int(relu), *[int(v) for v in
                                                           (training, need_input_grad, need_residual_grad,
                                                            need_weight_grad)]), lib)

        if run(p, ws) == 1:
            p = _refuse(lib, 1, shape, *flags)
            ws = _workspace(p)
            run(p, ws)
    if not need_weight_grad:
        grad_weight = torch.empty(0, dtype=torch.float32)
        grad_bias = torch.empty(0, dtype=torch.float32)
    return grad_input, grad_residual, grad_weight, grad_bias
