"""cuda backend of the fused conv + BatchNorm training ops (contract: resfused/reference/conv_bn.py).

Composes the CUDA C++ ops of resfused._C:
  forward        torch.ops.resfused_cuda_conv_bn.conv_bn_forward (csrc/conv_bn.cpp): one cuDNN graph per call,
                 prologue relu(x * scale + shift) applied to the conv's input tiles, conv, and the output's
                 per-channel sum and sum of squares from the conv's epilogue (cuDNN genstats); the finalize
                 (invstd, running statistics) is a few (C,) vector ops here.
  backward       wgrad: torch.ops.resfused_cuda_conv_bn.conv_bn_wgrad, the same prologue recomputed inside
                 cuDNN's wgrad (scale-bias-ReLU wgrad fusion), so the activation is not materialized; dgrad:
                 cuDNN's (aten.convolution_backward), then the prologue's dReLU + dBN on the foundation's kernels
                 (bn_add_relu_forward_eval recomputes the packed ReLU mask, bn_add_relu_backward applies it and
                 the BN backward): not fused into the dgrad epilogue on this backend (the Triton backend fuses
                 the dReLU and the dBN sums there). Passes after dgrad: read x, write a (dropped) and the mask;
                 then the BN backward's (two-pass: read grad_a, x, mask twice, write grad_x).
  tail           torch.ops.resfused_cuda.bn_add_relu_forward_eval / bn_add_relu_backward (csrc/bn_add_relu.cu),
                 the foundation's fused BN + add + ReLU kernels given the statistics as (mean, 1/invstd^2, eps=0);
                 with a projection shortcut its BN is applied by a first forward_eval pass (no ReLU), and its
                 gradient by a second backward call over the same mask.
Without a fused cuDNN engine for a configuration (conv_bn_plan says which path a call takes) the C++ ops take
an unfused path (ATen activation + cuDNN conv + var_mean) and warn once.

Rounding, against the contract's fp32 intermediates (each within stock-like error): the fused statistics are
uncentred sums, recentred from y inside the C++ op for channels whose |mean| > 4 std (csrc/conv_bn_stats.cu; its
CPU kernel is what tests/test_gpu_defects.py checks the math on); the backward's ReLU mask is recomputed centred ((x - mean) * invstd * w + b, invstd through
1/invstd^2) where the forward applied x * scale + shift, so the two can disagree where the pre-activation is
within a few ulps of 0; dgrad's output is rounded to x's dtype before the dBN, and so are its sums (Triton
takes them from the fp32 accumulator); a projection shortcut's bn_d(residual) is rounded to the activation
dtype before the add (as stock's BN output is).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _layout
from ..reference import conv_bn as _reference

Tensor = torch.Tensor

NAMESPACE = "resfused_cuda_conv_bn"


def _conv_ops():
    return getattr(torch.ops, NAMESPACE)


def _bn_ops():
    return torch.ops.resfused_cuda


def prologue_affine(in_mean: Tensor, in_invstd: Tensor, in_weight: Tensor, in_bias: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, shift) with relu(x * scale + shift) == relu((x - mean) * weight * invstd + bias)."""
    scale = in_weight * in_invstd
    return scale.contiguous(), (in_bias - in_mean * scale).contiguous()


def _affine_or_none(prologue: bool, in_mean, in_invstd, in_weight, in_bias):
    if not prologue:
        return None, None
    return prologue_affine(in_mean, in_invstd, in_weight, in_bias)


def _in_format(t: Tensor, like: Tensor) -> Tensor:
    return t.contiguous(memory_format=_layout.memory_format(_layout.layout_of(like)))


def plan(x: Tensor, weight: Tensor, prologue: bool, stride: Sequence[int], padding: Sequence[int],
         dilation: Sequence[int], groups: int, stats: bool, op: str) -> str:
    """Which path the C++ op ``op`` ("forward" or "wgrad") takes for this configuration:
    "cudnn-graph engine=... workspace=..." or "unfused: <why>"."""
    return _conv_ops().conv_bn_plan(x, weight, prologue, list(stride), list(padding), list(dilation),
                                    groups, stats, op)


def forward(x: Tensor, weight: Tensor, in_mean: Optional[Tensor], in_invstd: Optional[Tensor],
            in_weight: Optional[Tensor], in_bias: Optional[Tensor], running_mean: Optional[Tensor],
            running_var: Optional[Tensor], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
            groups: int, prologue: bool, stats: bool, momentum: float, eps: float):
    """See resfused.reference.conv_bn.forward. Returns (y, mean, invstd)."""
    scale, shift = _affine_or_none(prologue, in_mean, in_invstd, in_weight, in_bias)
    y, mean, var = _conv_ops().conv_bn_forward(x, weight, scale, shift, list(stride), list(padding),
                                               list(dilation), groups, stats)
    if not stats:
        return y, mean, var
    _reference.update_running_stats(running_mean, running_var, mean, var, y.numel() // max(y.shape[1], 1), momentum)
    return y, mean, torch.rsqrt(var + eps)


def backward(grad_y: Tensor, x: Tensor, weight: Tensor, in_mean: Optional[Tensor], in_invstd: Optional[Tensor],
             in_weight: Optional[Tensor], in_bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
             dilation: Sequence[int], groups: int, prologue: bool, in_training: bool, need_input_grad: bool,
             need_weight_grad: bool, need_in_affine_grad: bool):
    """See resfused.reference.conv_bn.backward. Returns (grad_x, grad_weight, grad_in_weight, grad_in_bias)."""
    st = _layout.stats_dtype(x.dtype)
    empty = lambda dtype: torch.empty(0, dtype=dtype, device=x.device)  # noqa: E731
    scale, shift = _affine_or_none(prologue, in_mean, in_invstd, in_weight, in_bias)
    grad_weight = empty(weight.dtype)
    if need_weight_grad:
        dw = _conv_ops().conv_bn_wgrad(grad_y, x, scale, shift, list(weight.shape), list(stride), list(padding),
                                       list(dilation), groups)
        grad_weight = torch.empty_like(weight).copy_(dw)
    grad_x, grad_in_w, grad_in_b = empty(x.dtype), empty(st), empty(st)
    if not (need_input_grad or (prologue and need_in_affine_grad)):
        return grad_x, grad_weight, grad_in_w, grad_in_b
    # dgrad only needs x's shape; the weight in x's format is what cuDNN's NHWC dgrad reads fastest.
    grad_a = torch.ops.aten.convolution_backward(grad_y, x, _in_format(weight, x), None, list(stride), list(padding),
                                                 list(dilation), False, [0, 0], groups, [True, False, False])[0]
    grad_a = _in_format(grad_a, x)
    if not prologue:
        return grad_a, grad_weight, grad_in_w, grad_in_b
    # dReLU + dBN of the prologue on the BN + add + ReLU kernels: forward_eval recomputes relu(bn(x)) for its
    # packed ReLU mask (the activation it also writes is dropped), backward is the BN backward with that mask.
    ops = _bn_ops()
    _, mask = ops.bn_add_relu_forward_eval(x, None, in_weight, in_bias, in_mean, _as_var(in_invstd), 0.0, True, True)
    grad_x, _, gw, gb = ops.bn_add_relu_backward(grad_a, x, mask, in_mean, in_invstd, in_weight, True, in_training,
                                                 need_input_grad, False, need_in_affine_grad)
    if need_in_affine_grad:
        grad_in_w, grad_in_b = gw, gb
    return grad_x, grad_weight, grad_in_w, grad_in_b


def _as_var(invstd: Tensor) -> Tensor:
    """The variance that forward_eval (eps = 0) turns back into ``invstd``."""
    return invstd.reciprocal().square()


def tail_forward(y: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor, residual: Tensor,
                 res_mean: Optional[Tensor], res_invstd: Optional[Tensor], res_weight: Optional[Tensor],
                 res_bias: Optional[Tensor], residual_bn: bool):
    """See resfused.reference.conv_bn.tail_forward. Returns (out, mask)."""
    ops = _bn_ops()
    if residual_bn:
        residual, _ = ops.bn_add_relu_forward_eval(residual, None, res_weight, res_bias, res_mean, _as_var(res_invstd),
                                                   0.0, False, False)
    out, mask = ops.bn_add_relu_forward_eval(y, residual, weight, bias, mean, _as_var(invstd), 0.0, True, True)
    return out, mask


def tail_backward(grad_out: Tensor, mask: Tensor, y: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor,
                  residual: Tensor, res_mean: Optional[Tensor], res_invstd: Optional[Tensor],
                  res_weight: Optional[Tensor], residual_bn: bool, training: bool, res_training: bool,
                  need_y_grad: bool, need_affine_grad: bool, need_residual_grad: bool, need_res_affine_grad: bool):
    """See resfused.reference.conv_bn.tail_backward. Returns (grad_y, grad_weight, grad_bias, grad_residual,
    grad_res_weight, grad_res_bias)."""
    ops = _bn_ops()
    gy, gr, gw, gb = ops.bn_add_relu_backward(grad_out, y, mask, mean, invstd, weight, True, training, need_y_grad,
                                              need_residual_grad and not residual_bn, need_affine_grad)
    grw, grb = (torch.empty(0, dtype=mean.dtype, device=y.device) for _ in range(2))  # distinct: outputs must not alias
    if residual_bn:
        gr, _, grw, grb = ops.bn_add_relu_backward(grad_out, residual, mask, res_mean, res_invstd, res_weight, True,
                                                   res_training, need_residual_grad, False, need_res_affine_grad)
    return gy, gw, gb, gr, grw, grb
