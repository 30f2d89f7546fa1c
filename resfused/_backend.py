"""Backend selection: explicit argument > set_backend()/RESFUSED_BACKEND > auto.

Backends:
  reference  plain PyTorch, any device; the test oracle and the CPU fallback.
  triton     resfused.triton_kernels; CUDA tensors, or CPU tensors when TRITON_INTERPRET=1.
  cuda       resfused._C (CUDA C++); CUDA tensors of fp32/fp16/bf16; no per-sample scale (sample_scale,
             drop-path) yet: calls with one resolve as if cuda were unavailable.
  cuda_sim   a correctness tool for tests, not for use: the cuda backend's C++ kernels (BN + add + ReLU
             only) run on CPU tensors by a CPU SIMT runtime (resfused/_cuda_sim.py); available once built
             (resfused._cuda_sim.build()), never picked by auto.

Only ``auto`` falls back; an explicitly requested backend that cannot run a call raises.

CPU fast paths (not names a caller passes: what ``auto`` resolves to on CPU tensors, so that an explicit
"reference" stays the float64-exact test oracle):
  native     the BN + add + ReLU ops on CPU float32/float64 tensors: aten's own batch norm
             (F.batch_norm: running stats, autograd) then in-place mul_/add_/relu_, exactly stock's ops
             (resfused.ops.bn_add_relu.native_forward).
  mkldnn     conv_bias_act (fuse_for_inference) on CPU float32 tensors: oneDNN's fused convolution with
             bias, sum and ReLU post-ops on channels_last activations and weights reordered once
             (resfused.ops.conv_bias_act, resfused.fuse.FusedConv2d).
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from typing import NamedTuple, Optional

import torch

logger = logging.getLogger("resfused")

BACKENDS = ("auto", "cuda", "triton", "reference", "cuda_sim")
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NATIVE = "native"  # auto's BN backend for CPU float32/float64 tensors (see the module docstring)
NATIVE_DTYPES = (torch.float32, torch.float64)

_selected: Optional[str] = None  # set_backend(); None means "use RESFUSED_BACKEND or auto"


def _check_name(name: str, argname: str = "backend") -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{argname} must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide default backend ("auto", "cuda", "triton", "reference", "cuda_sim"); None resets."""
    global _selected
    _selected = None if name is None else _check_name(name)


def get_backend() -> str:
    """The process-wide default backend name: set_backend() > RESFUSED_BACKEND > "auto"."""
    if _selected is not None:
        return _selected
    env = os.environ.get("RESFUSED_BACKEND")
    if env:
        return _check_name(env, "RESFUSED_BACKEND")
    return "auto"


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_import_errors: dict = {}


@torch.compiler.assume_constant_result
def import_error(module: str) -> Optional[str]:
    """None if ``module`` imports, else why not; cached per process.

    Marked constant for torch.compile, so that resolving a backend inside a compiled region neither
    traces importlib nor breaks the graph (tests/test_compile.py).
    """
    if module not in _import_errors:
        try:
            importlib.import_module(module)
            _import_errors[module] = None
        except Exception as e:  # ImportError, triton failing to initialise, a _C built for another torch
            _import_errors[module] = f"{type(e).__name__}: {e}"
    return _import_errors[module]


def _triton_import_error() -> Optional[str]:
    err = import_error("resfused.triton_kernels.bn_add_relu")
    return None if err is None else f"cannot import triton kernels: {err}"


def _cuda_ext_error() -> Optional[str]:
    err = import_error("resfused._C")
    return None if err is None else f"resfused._C is not importable ({err}); reinstall with a CUDA toolkit"


def _cuda_ext_status() -> tuple[Optional[object], Optional[str]]:
    """(module, None) when resfused._C loads, else (None, reason)."""
    err = _cuda_ext_error()
    return (None, err) if err else (importlib.import_module("resfused._C"), None)


def cuda_ext():
    return _cuda_ext_status()[0]


def unavailable_reason(name: str, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                       sample_scale: bool = False) -> Optional[str]:
    """None if backend ``name`` can run on (device, dtype); otherwise a sentence saying why not.

    With device None, asks whether the backend is usable on this machine at all. ``sample_scale``: the
    call passes a per-sample scale (resfused.ops.bn_add_relu), which the cuda backend does not implement.
    """
    if name == "reference":
        return None
    if name == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device is None:
            if torch.cuda.is_available() or triton_interpreted():
                return None
            return "no CUDA device and TRITON_INTERPRET is not set"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreted():
            return None
        if device.type == "cpu":
            return "the triton backend needs CUDA tensors (CPU tensors only with TRITON_INTERPRET=1)"
        return f"the triton backend does not support device type {device.type!r}"
    if name == "cuda":
        err = _cuda_ext_error()
        if err:
            return err
        if device is None:
            return None if torch.cuda.is_available() else "no CUDA device is available"
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got a {device.type} tensor"
        if dtype is not None and dtype not in _CUDA_DTYPES:
            return f"the cuda backend supports float32, float16 and bfloat16, got {dtype}"
        if sample_scale:
            return "the cuda backend does not implement sample_scale (the per-sample drop-path scale) yet"
        return None
    if name == "cuda_sim":
        from . import _cuda_sim

        err = _cuda_sim.unavailable_reason()
        if err:
            return err
        if device is None:
            return None
        if device.type != "cpu":
            return f"the cuda_sim backend runs on CPU tensors, got a {device.type} tensor"
        if dtype is not None and dtype not in _CUDA_DTYPES:
            return f"the cuda_sim backend supports float32, float16 and bfloat16, got {dtype}"
        if sample_scale:
            return "the cuda_sim backend does not implement sample_scale (as the cuda backend)"
        return None
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def cuda_op_missing(qualified_name: str, source: str) -> Optional[str]:
    """None when resfused._C loads and registers a CUDA kernel for ``qualified_name`` ("namespace::op"), else
    why not (``source``: the csrc file that defines it). Callers wrap it in a zero-argument function marked
    torch.compiler.assume_constant_result, so compiled code does not query the dispatcher."""
    err = _cuda_ext_error()
    if err:
        return err
    try:
        if torch._C._dispatch_has_kernel_for_dispatch_key(qualified_name, "CUDA"):
            return None
    except RuntimeError:  # the op is not registered at all
        pass
    return f"resfused._C was built without {source}; rebuild the extension"


class BackendInfo(NamedTuple):
    name: str
    available: bool
    reason: Optional[str]  # why not, when not available; None when available


def backends(device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None) -> list[BackendInfo]:
    """Every backend a caller can name (not "auto"), fastest first (cuda_sim, a test tool, last): whether it can
    run on (``device``, ``dtype``), and why not. With device None: whether it is usable on this machine at all.
    The public form of what ``python -m resfused`` prints."""
    dev = torch.device(device) if isinstance(device, str) else device
    out = []
    for name in ("cuda", "triton", "reference", "cuda_sim"):
        why = unavailable_reason(name, dev, dtype)
        out.append(BackendInfo(name, why is None, why))
    return out


def available_backends() -> list[str]:
    """Backends usable on this machine (for some device), fastest first (cuda_sim, a test tool, last)."""
    return [b.name for b in backends() if b.available]


_logged: set = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        logger.info(msg)


def resolve_with(reason, backend: Optional[str], tensor: torch.Tensor, op: str = "") -> str:
    """The concrete backend that will run an op on ``tensor``, given the op's availability check.

    ``reason(name, device, dtype)`` is None when backend ``name`` can run the op, else why not.
    ``backend`` None means the process default. ``auto`` picks cuda > triton > reference for CUDA
    tensors and reference for CPU tensors; any other name must be usable or this raises.
    """
    name = get_backend() if backend is None else _check_name(backend)
    for_op = f" for {op}" if op else ""
    if name == "cuda_sim" and op:
        raise RuntimeError(f"resfused backend 'cuda_sim' runs only the BN + add + ReLU ops, not {op}")
    if name != "auto":
        why = reason(name, tensor.device, tensor.dtype)
        if why is not None:
            raise RuntimeError(f"resfused backend {name!r} is unavailable{for_op}: {why}")
        return name
    if tensor.device.type != "cuda":
        return "reference"
    for cand in ("cuda", "triton"):
        why = reason(cand, tensor.device, tensor.dtype)
        if why is None:
            return cand
        _log_once(f"resfused: auto backend skips {cand!r}{for_op}: {why}")
    return "reference"


def resolve(backend: Optional[str], tensor: torch.Tensor, sample_scale: bool = False, native: bool = True) -> str:
    """resolve_with for the BN + add + ReLU ops. ``sample_scale``: the call passes a per-sample scale
    (cuda cannot run it; auto skips it). With ``native`` (the unsynchronised ops), ``auto`` on a CPU
    float32/float64 tensor resolves to "native" (aten's batch norm + in-place add/ReLU) instead of the
    reference composite; an explicit "reference" is always the reference."""
    name = resolve_with(lambda name, device, dtype: unavailable_reason(name, device, dtype, sample_scale),
                        backend, tensor)
    if (native and name == "reference" and tensor.device.type == "cpu" and tensor.dtype in NATIVE_DTYPES
            and (get_backend() if backend is None else backend) == "auto"):
        return NATIVE
    return name


def autocast_off(t: torch.Tensor):
    """Context for a custom op's implementation: autocast stays active inside custom ops, where it would
    recast the reference's fp32-accumulating convolutions to the autocast dtype."""
    return torch.autocast(t.device.type, enabled=False)


def cudnn_conv_allows_tf32() -> bool:
    """Whether cuDNN convolutions use TF32 for fp32 inputs.

    The legacy flag torch.backends.cudnn.allow_tf32 raises once a program has mixed it with the newer
    fp32_precision settings (set differently for convolutions and RNNs); then the convolution setting decides.
    """
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        return getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", "ieee") == "tf32"


def triton_unavailable_reason(module: str, device: torch.device) -> Optional[str]:
    """None when the Triton kernels in ``module`` import and can run on ``device``, else why not."""
    err = import_error(module)
    if err:
        return f"cannot import triton kernels: {err}"
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
        return None
    return "the triton backend needs CUDA tensors (CPU tensors only with TRITON_INTERPRET=1)"


_warned_missing_ext = False


def warn_if_ext_missing() -> None:
    """Warn once at import time when a CUDA device exists but resfused._C does not load."""
    global _warned_missing_ext
    if _warned_missing_ext:
        return
    _warned_missing_ext = True
    try:
        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if has_gpu:
        _, err = _cuda_ext_status()
        if err:
            warnings.warn(f"resfused: CUDA C++ backend unavailable, using Triton/reference: {err}. "
                          "Run `python -m resfused` for details.", RuntimeWarning, stacklevel=3)
