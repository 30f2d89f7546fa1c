"""Fused convolution + bias (+ projection-shortcut conv) (+ residual) (+ ReLU): custom op, fake impl, dispatch.

One inference-only custom op, taking the concrete backend name as its last argument:
  resfused::conv_bias_act(x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding, dilation,
                          groups, shortcut_stride, relu, backend) -> y
The backend functions it calls share one contract, documented in resfused/reference/conv_bias_act.py.
``conv_bias_act`` validates arguments (clear errors), picks the backend and calls the op. There is no
autograd: the op exists for ``resfused.fuse_for_inference``, whose models are inference-only.

Backends:
  reference  F.conv2d in fp32 (fp64 for fp64) + epilogue; any device.
  triton     triton_kernels/conv_bias_act.py: implicit GEMM with the whole epilogue and the shortcut conv
             fused (dual GEMM); CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
  mkldnn     resfused/_cpu/conv_bias_act.py: oneDNN's fused conv + bias + add + ReLU through torch.ops.mkldnn;
             not a name callers pass: what ``auto`` picks for CPU float32 tensors (an explicit "reference"
             stays the oracle). resfused.fuse.FusedConv2d calls it directly with weights reordered once.
  cuda       csrc/conv_bias_act.cu: cuDNN's fused conv + bias + add + ReLU (at::cudnn_convolution_add_relu /
             at::cudnn_convolution_relu); the shortcut conv runs as a separate cuDNN convolution whose output
             is the fused conv's ``z`` input (cuDNN's fused op has no second GEMM).
fp32 on a GPU: the triton and cuda backends use TF32 exactly when torch.backends.cudnn.allow_tf32 is set
(PyTorch's default for cuDNN convolutions, so they match stock convolution numerics).
"""

from __future__ import annotations

import importlib
from typing import Optional, Sequence, Union

import torch

from .. import _backend, _layout
from .._cpu import conv_bias_act as _mkldnn
from ..reference import conv_bias_act as _reference

Tensor = torch.Tensor
IntOrPair = Union[int, Sequence[int]]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CUDA_NAMESPACE = "resfused_cuda_conv"
MKLDNN = "mkldnn"  # auto's backend for CPU float32 tensors (resfused/_cpu/conv_bias_act.py)


@torch.compiler.assume_constant_result  # fixed once _C is loaded; keeps dispatcher queries out of traces
def cuda_op_reason() -> Optional[str]:
    """None when resfused._C carries the CUDA conv_bias_act op, else why not."""
    return _backend.cuda_op_missing(f"{_CUDA_NAMESPACE}::conv_bias_act", "csrc/conv_bias_act.cu")


def _backend_fn(name: str):
    if name == "reference":
        return _reference.conv_bias_act
    if name == "triton":
        return importlib.import_module("resfused.triton_kernels.conv_bias_act").conv_bias_act
    if name == "cuda":
        return getattr(torch.ops, _CUDA_NAMESPACE).conv_bias_act
    if name == MKLDNN:
        return _mkldnn.conv_bias_act
    raise ValueError(f"unknown resfused backend {name!r}")


@torch.library.custom_op("resfused::conv_bias_act", mutates_args=())
def conv_bias_act_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                     shortcut_x: Optional[Tensor], shortcut_weight: Optional[Tensor], stride: list[int],
                     padding: list[int], dilation: list[int], groups: int, shortcut_stride: list[int], relu: bool,
                     backend: str) -> Tensor:
    with _backend.autocast_off(x):
        return _backend_fn(backend)(x, weight, bias, residual, shortcut_x, shortcut_weight, list(stride),
                                    list(padding), list(dilation), groups, list(shortcut_stride), relu)


@conv_bias_act_op.register_fake
def _(x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding, dilation, groups, shortcut_stride,
      relu, backend):
    shape = output_shape(x.shape, weight.shape, stride, padding, dilation)
    fmt = _layout.memory_format(_layout.layout_of(x))
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def output_shape(x_shape, w_shape, stride, padding, dilation) -> tuple:
    n, _, h, w = x_shape
    c_out, _, kh, kw = w_shape
    return (n, c_out, _out_size(h, kh, stride[0], padding[0], dilation[0]),
            _out_size(w, kw, stride[1], padding[1], dilation[1]))


# ---------------------------------------------------------------------------------------------------
# validation and backend choice
# ---------------------------------------------------------------------------------------------------

def _pair(name: str, v: IntOrPair, minimum: int) -> list[int]:
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        v = (v, v)
    try:
        v = [int(e) for e in v]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    if len(v) != 2 or min(v) < minimum:
        raise ValueError(f"{name} must be an int or a pair of ints >= {minimum}, got {v!r}")
    return v


def _check_tensor(name: str, t, dim: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def validate_args(x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding, dilation, groups,
                  shortcut_stride):
    """Raise TypeError/ValueError naming the offending argument; returns the output shape."""
    _check_tensor("x", x, 4)
    _check_tensor("weight", weight, 4)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    c_in, c_out = x.shape[1], weight.shape[0]
    if c_in % groups or c_out % groups:
        raise ValueError(f"groups={groups} must divide x's {c_in} channels and weight's {c_out} output channels")
    if weight.shape[1] * groups != c_in:
        raise ValueError(f"weight of shape {tuple(weight.shape)} expects {weight.shape[1] * groups} input channels "
                         f"with groups={groups}, but x has {c_in}")
    shape = output_shape(x.shape, weight.shape, stride, padding, dilation)
    if shape[2] < 1 or shape[3] < 1:
        raise ValueError(f"x of spatial size {tuple(x.shape[2:])} is too small for a {tuple(weight.shape[2:])} kernel "
                         f"with stride {stride}, padding {padding}, dilation {dilation}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.dim() != 1 or bias.shape[0] != c_out:
            got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"bias must be None or a ({c_out},) tensor, got {got}")
        if not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    if (shortcut_x is None) != (shortcut_weight is None):
        raise ValueError("shortcut_x and shortcut_weight must both be tensors or both be None")
    if shortcut_x is not None:
        _check_tensor("shortcut_x", shortcut_x, 4)
        _check_tensor("shortcut_weight", shortcut_weight, 4)
        for name, t in (("shortcut_x", shortcut_x), ("shortcut_weight", shortcut_weight)):
            if t.dtype != x.dtype:
                raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
            if t.device != x.device:
                raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if tuple(shortcut_weight.shape) != (c_out, shortcut_x.shape[1], 1, 1):
            raise ValueError(f"shortcut_weight must be a 1x1 weight of shape {(c_out, shortcut_x.shape[1], 1, 1)}, "
                             f"got {tuple(shortcut_weight.shape)}")
        sc_shape = output_shape(shortcut_x.shape, shortcut_weight.shape, shortcut_stride, (0, 0), (1, 1))
        if tuple(sc_shape) != tuple(shape):
            raise ValueError(f"the shortcut conv gives shape {tuple(sc_shape)} but the main conv gives {tuple(shape)}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"residual must be a Tensor or None, got {type(residual).__name__}")
        if tuple(residual.shape) != tuple(shape):
            raise ValueError(f"residual must have the output's shape {tuple(shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    return shape


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """resfused._backend.unavailable_reason for this op: None if backend ``name`` can run it on (device, dtype).

    Differs from the generic check in which module it imports for triton and in requiring the cuda
    extension to carry this op.
    """
    if name == "reference":
        return None
    if name == "triton":
        why = _backend.triton_unavailable_reason("resfused.triton_kernels.conv_bias_act", device)
        if why is None and dtype == torch.float64:
            why = "the triton conv_bias_act supports fp32/fp16/bf16, not float64"
        return why
    if name == "cuda":
        return _backend.unavailable_reason("cuda", device, dtype) or cuda_op_reason()
    raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {name!r}")


def resolve(backend: Optional[str], x: Tensor) -> str:
    """The concrete backend that runs conv_bias_act on ``x``; rules of resfused._backend.resolve_with
    (``auto``: cuda > triton > reference for CUDA tensors; for CPU tensors "mkldnn" (float32, where torch has
    oneDNN), else reference; an explicitly named backend that cannot run the call raises)."""
    name = _backend.resolve_with(unavailable_reason, backend, x, "conv_bias_act")
    if (name == "reference" and x.device.type == "cpu" and x.dtype == torch.float32
            and (_backend.get_backend() if backend is None else backend) == "auto"):
        why = _mkldnn.unavailable_reason()
        if why is None:
            return MKLDNN
        _backend._log_once(f"resfused: auto runs conv_bias_act on CPU with the reference backend: {why}")
    return name


def _dense(t: Optional[Tensor]) -> Optional[Tensor]:
    if t is None:
        return None
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def conv_bias_act(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None, *,
                  stride: IntOrPair = 1, padding: IntOrPair = 0, dilation: IntOrPair = 1, groups: int = 1,
                  shortcut_x: Optional[Tensor] = None, shortcut_weight: Optional[Tensor] = None,
                  shortcut_stride: IntOrPair = 1, relu: bool = True, backend: Optional[str] = None) -> Tensor:
    """``relu(conv2d(x, weight) + conv2d(shortcut_x, shortcut_weight) + bias + residual)`` in one kernel.

    Inference only (no autograd).

    Args:
        x: (N, C_in, H, W), float16/bfloat16/float32 (float64 on the reference backend), contiguous or
            channels_last (other strides are copied to contiguous first).
        weight: (C_out, C_in / groups, KH, KW), x's dtype; any memory format (channels_last is what the
            triton and cuda kernels read fastest).
        bias: None or (C_out,), any float dtype; added in fp32.
        residual: None or a tensor of the output's shape (N, C_out, Ho, Wo) and x's dtype.
        stride, padding, dilation, groups: as F.conv2d (zero padding only).
        shortcut_x, shortcut_weight: None, or the projection shortcut's input (N, C_sc, H2, W2) and its 1x1
            weight (C_out, C_sc, 1, 1): ``conv2d(shortcut_x, shortcut_weight, stride=shortcut_stride)`` is
            accumulated into the same output tile (the ResNet downsample branch, with its folded bias
            already summed into ``bias``).
        relu: apply the ReLU.
        backend: "auto", "cuda", "triton", "reference", or None for resfused.get_backend().

    Returns:
        (N, C_out, Ho, Wo) in x's dtype and memory format.
    """
    stride, padding = _pair("stride", stride, 1), _pair("padding", padding, 0)
    dilation, shortcut_stride = _pair("dilation", dilation, 1), _pair("shortcut_stride", shortcut_stride, 1)
    validate_args(x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding, dilation, groups,
                  shortcut_stride)
    name = resolve(backend, x)
    if name == "cuda" and shortcut_x is not None:
        _backend._log_once("resfused: cuda conv_bias_act runs the projection shortcut as a separate cuDNN conv feeding the "
                  "fused conv's residual input (cuDNN's fused conv-bias-add-ReLU has no second GEMM)")
    return torch.ops.resfused.conv_bias_act(
        _dense(x), _dense(weight), bias, _dense(residual), _dense(shortcut_x), _dense(shortcut_weight), stride,
        padding, dilation, groups, shortcut_stride, bool(relu), name)
