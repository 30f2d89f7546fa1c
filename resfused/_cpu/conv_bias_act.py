"""The "mkldnn" backend of resfused::conv_bias_act: oneDNN's fused convolution through torch's own mkldnn ops.

What ``auto`` runs for CPU float32 tensors (resfused.ops.conv_bias_act.resolve) and what
resfused.fuse.FusedConv2d calls directly on CPU: the CPU counterpart of cuDNN's fused conv-bias-add-ReLU.
  * torch.ops.mkldnn._convolution_pointwise: conv + bias with ReLU as a oneDNN post-op (attr "relu"/"none").
  * torch.ops.mkldnn._convolution_pointwise.binary / _convolution_pointwise_.binary: conv + bias + residual
    ("add" post-op, alpha 1) + ReLU, out of place or accumulated into the residual tensor in place.
  * torch.ops.mkldnn._reorder_convolution_weight: the weight reordered once into oneDNN's blocked format
    (an opaque mkldnn tensor; ``pack_weight``), so no per-call weight reorder.
These are the ops Inductor's CPU freezing passes emit (torch/_inductor/fx_passes/mkldnn_fusion.py); they exist
in torch 2.11 and 2.14. Activations stay channels_last (oneDNN's nhwc): a channels_last input gives a
channels_last output, with no layout copies between layers.

Memory per call: one read of x (and of the residual), one write of y; the projection shortcut (dual GEMM in
the Triton kernel) is a separate 1x1 oneDNN conv whose fresh output the main conv accumulates into in place.
Numerics: fp32 accumulation, as F.conv2d on CPU (the same oneDNN kernels); the epilogue is applied in fp32
before the single rounding of the output.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

Tensor = torch.Tensor

_OPS = ("_convolution_pointwise", "_convolution_pointwise_", "_reorder_convolution_weight")


@torch.compiler.assume_constant_result
def unavailable_reason() -> Optional[str]:
    """None when this torch build has oneDNN and the fused-convolution ops above, else why not."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    missing = [n for n in _OPS if not hasattr(torch.ops.mkldnn, n)]
    if missing:
        return f"this torch build lacks torch.ops.mkldnn.{', '.join(missing)}"
    return None


def pack_weight(weight: Tensor, padding: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
                groups: int) -> Tensor:
    """``weight`` (C_out, C_in/groups, KH, KW), CPU float32, reordered once into oneDNN's blocked format
    (an opaque mkldnn tensor, valid for any input size) for the convs below."""
    return torch.ops.mkldnn._reorder_convolution_weight(weight.detach(), list(padding), list(stride), list(dilation),
                                                        int(groups), None)


def _packed(weight: Tensor) -> bool:
    return weight.layout == torch._mkldnn  # type: ignore[attr-defined]


def _both_layouts(t: Tensor) -> bool:
    """Contiguous as NCHW and as channels_last at once (C == 1 or H == W == 1: ResNet's layer4 at 32x32)."""
    return t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


@torch.compiler.assume_constant_result
@functools.cache
def _binary_both_layouts_ok() -> bool:
    """Whether this torch's out-of-place ``_convolution_pointwise.binary`` takes a ``pack_weight`` weight with a
    residual whose layout is ambiguous (``_both_layouts``). torch 2.11 raises "could not create a memory" there
    (the in-place variant works, for every shape); 2.14 does not. Probed once on a tiny conv (1x1 pixel,
    8 channels: the case that fails; C == H == W == 1 does not)."""
    x, res = torch.ones(1, 1, 1, 1), torch.zeros(1, 8, 1, 1)
    w = pack_weight(torch.ones(8, 1, 1, 1), [0, 0], [1, 1], [1, 1], 1)
    try:
        torch.ops.mkldnn._convolution_pointwise.binary(x, res, w, None, [0, 0], [1, 1], [1, 1], 1, "add", 1.0,
                                                       None, [], None)
    except RuntimeError:
        return False
    return True


def conv_bias_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                  shortcut_x: Optional[Tensor], shortcut_weight: Optional[Tensor], stride: Sequence[int],
                  padding: Sequence[int], dilation: Sequence[int], groups: int, shortcut_stride: Sequence[int],
                  relu: bool, residual_inplace: bool = False) -> Tensor:
    """The fused op on oneDNN; contract of resfused/reference/conv_bias_act.py, CPU float32.

    ``weight``/``shortcut_weight`` are dense tensors or ``pack_weight`` results. The result's memory format is
    x's. ``residual_inplace``: accumulate into ``residual`` and return it (the caller owns it and needs it no
    more); a fresh projection-shortcut output is always accumulated into in place.
    """
    mk = torch.ops.mkldnn
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    unary = "relu" if relu else None
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    if shortcut_x is not None:
        # The shortcut's output is ours: the main conv adds into it. The bias (main + shortcut folded) goes on
        # the main conv.
        # shortcut_x as it is (dense): where y is 1x1 both layouts coincide, and converting would be a copy.
        residual_sum = mk._convolution_pointwise(shortcut_x, shortcut_weight, None, [0, 0], list(shortcut_stride),
                                                 [1, 1], 1, "none", [], None)
        if residual is not None:
            residual_sum.add_(residual)
        residual, residual_inplace = residual_sum, True
    if residual is None:
        y = mk._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups, "relu" if relu else "none",
                                      [], None)
    elif residual_inplace or (_packed(weight) and _both_layouts(residual) and not _binary_both_layouts_ok()):
        if not residual_inplace:  # the out-of-place op fails here: accumulate into a copy (N*C elements at 1x1)
            residual = residual.clone(memory_format=fmt)
        y = mk._convolution_pointwise_.binary(residual.contiguous(memory_format=fmt), x, weight, bias, padding, stride,
                                              dilation, groups, "add", 1.0, unary, [], None)
    else:
        y = mk._convolution_pointwise.binary(x, residual.contiguous(memory_format=fmt), weight, bias, padding, stride,
                                             dilation, groups, "add", 1.0, unary, [], None)
    # Shapes where both layouts coincide for x (C == 1, H == W == 1) but not for y: x's layout is "nchw" then.
    return y if y.is_contiguous(memory_format=fmt) else y.contiguous(memory_format=fmt)
