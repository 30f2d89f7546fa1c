"""Reference backend of the fused convolution + bias (+ shortcut conv) (+ residual) (+ ReLU) op.

Every backend (reference, triton, cuda) implements ``conv_bias_act`` with the contract below;
resfused.ops.conv_bias_act validates and normalises arguments before calling it:

    y = relu?( conv2d(x, weight, stride, padding, dilation, groups)
               + conv2d(shortcut_x, shortcut_weight, stride=shortcut_stride)   # when shortcut_x is given
               + bias[c]                                                        # when bias is given
               + residual )                                                     # when residual is given

  * ``x``: dense (N, C_in, H, W), contiguous or channels_last; fp32/fp16/bf16 (fp64 on reference).
  * ``weight``: (C_out, C_in / groups, KH, KW), x's dtype, any dense memory format.
  * ``bias``: None or (C_out,) of any float dtype; added in the accumulation dtype.
  * ``shortcut_x``/``shortcut_weight``: both None, or a (N, C_sc, H2, W2) tensor and a (C_out, C_sc, 1, 1)
    weight: a 1x1 convolution with ``shortcut_stride`` and no padding whose output has y's spatial size
    (the projection shortcut of a ResNet block, accumulated into the same output tile by the fused
    kernels: a dual GEMM).
  * ``residual``: None or a tensor of y's shape and x's dtype.
  * The result has x's dtype and x's memory format (channels_last in, channels_last out).
  * Accumulation is fp32 for fp16/bf16/fp32 inputs (fp64 for fp64) and the result is rounded once. This is
    the contract of this oracle, the Triton and the mkldnn backends. The cuda backend (cuDNN's fused op,
    csrc/conv_bias_act.cu) rounds more often: the bias to x's dtype first, the projection shortcut's output
    (a separate cuDNN conv) to x's dtype, and on its unfused fallback the main conv's output too; its error
    is held to stock PyTorch's own composition (tests/test_gpu_defects.py), not to one rounding.

Here both convolutions run in the accumulation dtype (fp16/bf16 inputs are upcast), which makes this
the test oracle; it is also the CPU fallback.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import _layout

Tensor = torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def epilogue(acc: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], relu: bool, out_dtype: torch.dtype,
             memory_format: torch.memory_format) -> Tensor:
    """relu?(acc + bias + residual) computed in acc's dtype, rounded once to ``out_dtype``."""
    if bias is not None:
        acc = acc + bias.to(acc.dtype).view(1, -1, 1, 1)
    if residual is not None:
        acc = acc + residual.to(acc.dtype)
    if relu:
        acc = torch.relu(acc)
    return acc.to(dtype=out_dtype, memory_format=memory_format)


def conv_bias_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                  shortcut_x: Optional[Tensor], shortcut_weight: Optional[Tensor], stride: Sequence[int],
                  padding: Sequence[int], dilation: Sequence[int], groups: int, shortcut_stride: Sequence[int],
                  relu: bool) -> Tensor:
    """The fused op in plain PyTorch; see the module docstring for the contract."""
    layout = _layout.layout_of(x)
    acc_t = acc_dtype(x.dtype)
    acc = F.conv2d(x.to(acc_t), weight.to(acc_t), None, tuple(stride), tuple(padding), tuple(dilation), groups)
    if shortcut_x is not None:
        acc = acc + F.conv2d(shortcut_x.to(acc_t), shortcut_weight.to(acc_t), None, tuple(shortcut_stride))
    return epilogue(acc, bias, residual, relu, x.dtype, _layout.memory_format(layout))
