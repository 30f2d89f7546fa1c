"""Reference backend of the fused convolution + BatchNorm training path, in plain PyTorch.

Every backend implements these functions with the same contract; resfused.ops.conv_bn validates and
normalises arguments before calling them. Notation: ``x`` is a dense (N, C_in, H, W) tensor (contiguous or
channels_last), ``weight`` a (C_out, C_in / groups, KH, KW) conv weight of x's dtype; per-channel vectors
(means, invstds, BN weights and biases, running stats) have the statistics dtype (fp64 for fp64, else fp32).

forward(x, weight, in_mean, in_invstd, in_weight, in_bias, running_mean, running_var, stride, padding,
        dilation, groups, prologue, stats, momentum, eps) -> (y, mean, invstd)
    a = relu((x - in_mean) * (in_weight * in_invstd) + in_bias)   when ``prologue`` (else a = x)
    y = conv2d(a, weight)   (zero padding is applied to ``a``: padded positions contribute 0, not relu(in_bias))
    when ``stats``: mean, invstd = batch mean and 1/sqrt(biased var + eps) of y per output channel (from the
    accumulator, before y is rounded to its dtype), and running_mean/running_var (when given) updated in place
    as nn.BatchNorm2d does (momentum, unbiased variance); otherwise mean and invstd are empty.
    y has x's dtype and memory format.

backward(grad_y, x, weight, in_mean, in_invstd, in_weight, in_bias, stride, padding, dilation, groups,
         prologue, in_training, need_input_grad, need_weight_grad, need_in_affine_grad)
    -> (grad_x, grad_weight, grad_in_weight, grad_in_bias)
    The prologue activation ``a`` and its ReLU mask are recomputed from x (nothing but x is saved). With
    ``in_training`` the prologue's BN used x's batch statistics (in_mean/in_invstd are functions of x) and
    grad_x is the full training-mode BN backward; otherwise they are constants. Outputs not asked for are
    empty tensors.

tail_forward(y, mean, invstd, weight, bias, residual, res_mean, res_invstd, res_weight, res_bias, residual_bn)
    -> (out, mask)
    out = relu((y - mean) * weight * invstd + bias + r), r = (residual - res_mean) * res_weight * res_invstd
    + res_bias when ``residual_bn`` (the projection shortcut's BN fused into the tail), else residual.
    mask is the packed 1-bit ReLU mask (resfused._layout).

tail_backward(grad_out, mask, y, mean, invstd, weight, residual, res_mean, res_invstd, res_weight, residual_bn,
              training, res_training, need_y_grad, need_affine_grad, need_residual_grad, need_res_affine_grad)
    -> (grad_y, grad_weight, grad_bias, grad_residual, grad_res_weight, grad_res_bias)

Normalisation is applied centred, (x - mean) * a + b, as in resfused.reference.bn_add_relu.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import _layout

Tensor = torch.Tensor


def _bcast(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def _empty(dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(0, dtype=dtype, device=device)


def prologue_preact(x: Tensor, in_mean: Tensor, in_invstd: Tensor, in_weight: Tensor, in_bias: Tensor) -> Tensor:
    """(x - in_mean) * in_weight * in_invstd + in_bias in the statistics dtype (before the ReLU)."""
    return (x.to(in_mean.dtype) - _bcast(in_mean)) * _bcast(in_weight * in_invstd) + _bcast(in_bias)


def _activation(x, in_mean, in_invstd, in_weight, in_bias, prologue):
    """The conv's input: relu(bn(x)) in x's dtype when ``prologue``, else x; plus the bool ReLU mask."""
    if not prologue:
        return x, None
    z = prologue_preact(x, in_mean, in_invstd, in_weight, in_bias)
    positive = z > 0
    a = torch.where(positive, z, torch.zeros((), dtype=z.dtype, device=z.device))
    return a.to(x.dtype), positive


def batch_stats(y_acc: Tensor, eps: float):
    """(mean, biased var, invstd) per channel of an (N, C, H, W) tensor in the statistics dtype (centred)."""
    mean = y_acc.mean(dim=(0, 2, 3))
    var = (y_acc - _bcast(mean)).square().mean(dim=(0, 2, 3))
    return mean, var, torch.rsqrt(var + eps)


def update_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor], mean: Tensor, var: Tensor,
                         n: int, momentum: float) -> None:
    """nn.BatchNorm2d's update: running = (1 - momentum) * running + momentum * batch (unbiased variance)."""
    if n == 0:
        return
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
    if running_var is not None:
        running_var.mul_(1 - momentum).add_(var * (n / max(n - 1, 1)), alpha=momentum)


def forward(x: Tensor, weight: Tensor, in_mean: Optional[Tensor], in_invstd: Optional[Tensor],
            in_weight: Optional[Tensor], in_bias: Optional[Tensor], running_mean: Optional[Tensor],
            running_var: Optional[Tensor], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
            groups: int, prologue: bool, stats: bool, momentum: float, eps: float):
    """See the module docstring. Returns (y, mean, invstd)."""
    layout = _layout.layout_of(x)
    acc_t = _layout.stats_dtype(x.dtype)
    a, _ = _activation(x, in_mean, in_invstd, in_weight, in_bias, prologue)
    # The activation is rounded to x's dtype (what a fused kernel feeds its MMA), then convolved in fp32.
    acc = F.conv2d(a.to(acc_t), weight.to(acc_t), None, tuple(stride), tuple(padding), tuple(dilation), groups)
    y = acc.to(dtype=x.dtype, memory_format=_layout.memory_format(layout))
    if not stats:
        return y, _empty(acc_t, x.device), _empty(acc_t, x.device)
    mean, var, invstd = batch_stats(acc, eps)
    update_running_stats(running_mean, running_var, mean, var, acc.numel() // max(acc.shape[1], 1), momentum)
    return y, mean, invstd


def bn_backward(gz: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, training: bool,
                need_input_grad: bool, need_affine_grad: bool):
    """Backward of z = (x - mean) * weight * invstd + b given dL/dz (stats dtype).

    Returns (grad_x in x's dtype and layout, grad_weight, grad_bias); entries not asked for are empty.
    With ``training`` mean/invstd are x's batch statistics and are differentiated through.
    """
    st = mean.dtype
    grad_x, grad_w, grad_b = _empty(x.dtype, x.device), _empty(st, x.device), _empty(st, x.device)
    if not (need_input_grad or need_affine_grad):
        return grad_x, grad_w, grad_b
    xhat = (x.to(st) - _bcast(mean)) * _bcast(invstd)
    sum_g = gz.sum(dim=(0, 2, 3))
    sum_gx = (gz * xhat).sum(dim=(0, 2, 3))
    if need_affine_grad:
        grad_w, grad_b = sum_gx, sum_g
    if need_input_grad:
        k = _bcast(weight * invstd)
        if training:
            n = x.numel() // x.shape[1]
            dx = k * (gz - _bcast(sum_g / n) - xhat * _bcast(sum_gx / n))
        else:
            dx = k * gz
        grad_x = torch.empty_like(x).copy_(dx)
    return grad_x, grad_w, grad_b


def backward(grad_y: Tensor, x: Tensor, weight: Tensor, in_mean: Optional[Tensor], in_invstd: Optional[Tensor],
             in_weight: Optional[Tensor], in_bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
             dilation: Sequence[int], groups: int, prologue: bool, in_training: bool, need_input_grad: bool,
             need_weight_grad: bool, need_in_affine_grad: bool):
    """See the module docstring. Returns (grad_x, grad_weight, grad_in_weight, grad_in_bias)."""
    acc_t = _layout.stats_dtype(x.dtype)
    st = acc_t if in_mean is None else in_mean.dtype
    a, positive = _activation(x, in_mean, in_invstd, in_weight, in_bias, prologue)
    g = grad_y.to(acc_t)
    grad_weight = _empty(weight.dtype, x.device)
    if need_weight_grad:
        gw = torch.nn.grad.conv2d_weight(a.to(acc_t), weight.shape, g, tuple(stride), tuple(padding), tuple(dilation),
                                         groups)
        grad_weight = torch.empty_like(weight).copy_(gw)  # weight's dtype and strides
    grad_x, grad_in_w, grad_in_b = _empty(x.dtype, x.device), _empty(st, x.device), _empty(st, x.device)
    if not (need_input_grad or (prologue and need_in_affine_grad)):
        return grad_x, grad_weight, grad_in_w, grad_in_b
    grad_a = torch.nn.grad.conv2d_input(x.shape, weight.to(acc_t), g, tuple(stride), tuple(padding), tuple(dilation),
                                        groups)
    if not prologue:
        return torch.empty_like(x).copy_(grad_a), grad_weight, grad_in_w, grad_in_b
    gz = torch.where(positive, grad_a.to(st), torch.zeros((), dtype=st, device=x.device))
    grad_x, grad_in_w, grad_in_b = bn_backward(gz, x, in_mean, in_invstd, in_weight, in_training, need_input_grad,
                                               need_in_affine_grad)
    return grad_x, grad_weight, grad_in_w, grad_in_b


def tail_forward(y: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor, residual: Tensor,
                 res_mean: Optional[Tensor], res_invstd: Optional[Tensor], res_weight: Optional[Tensor],
                 res_bias: Optional[Tensor], residual_bn: bool):
    """See the module docstring. Returns (out, mask)."""
    layout = _layout.layout_of(y)
    acc = prologue_preact(y, mean, invstd, weight, bias)
    if residual_bn:
        acc = acc + prologue_preact(residual, res_mean, res_invstd, res_weight, res_bias)
    else:
        acc = acc + residual.to(acc.dtype)
    positive = acc > 0
    out = torch.where(positive, acc, torch.zeros((), dtype=acc.dtype, device=acc.device))
    return torch.empty_like(y).copy_(out), _layout.pack_mask(positive, layout)


def tail_backward(grad_out: Tensor, mask: Tensor, y: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor,
                  residual: Tensor, res_mean: Optional[Tensor], res_invstd: Optional[Tensor],
                  res_weight: Optional[Tensor], residual_bn: bool, training: bool, res_training: bool,
                  need_y_grad: bool, need_affine_grad: bool, need_residual_grad: bool, need_res_affine_grad: bool):
    """See the module docstring. Returns (grad_y, grad_weight, grad_bias, grad_residual, grad_res_weight,
    grad_res_bias)."""
    st = mean.dtype
    positive = _layout.unpack_mask(mask, y.shape, _layout.layout_of(y))
    gz = torch.where(positive, grad_out.to(st), torch.zeros((), dtype=st, device=y.device))
    grad_y, grad_w, grad_b = bn_backward(gz, y, mean, invstd, weight, training, need_y_grad, need_affine_grad)
    grad_r, grad_rw, grad_rb = _empty(y.dtype, y.device), _empty(st, y.device), _empty(st, y.device)
    if residual_bn:
        grad_r, grad_rw, grad_rb = bn_backward(gz, residual, res_mean, res_invstd, res_weight, res_training,
                                               need_residual_grad, need_res_affine_grad)
    elif need_residual_grad:
        grad_r = torch.empty_like(residual).copy_(gz)
    return grad_y, grad_w, grad_b, grad_r, grad_rw, grad_rb
