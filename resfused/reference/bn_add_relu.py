"""Reference backend of the fused BatchNorm + residual add + ReLU op, in plain PyTorch.

Every backend (reference, triton, cuda) implements these three functions with the same contract;
resfused.ops.bn_add_relu validates and normalises arguments before calling them:
  * ``x`` is a dense (N, C, H, W) tensor (fp32/fp16/bf16, fp64 for gradcheck), layout per
    resfused._layout.layout_of; ``residual`` is None or has x's shape, dtype and layout.
  * weight, bias, running_mean, running_var are None or length-C tensors of the statistics dtype
    (fp64 for fp64 input, else fp32); running stats are updated in place.
  * mean/invstd are statistics-dtype (C,) tensors; the ReLU mask is packed as in resfused._layout.
  * Normalisation is applied centred, (x - mean) * a + b with a = weight * invstd: folding the mean
    into the shift cancels catastrophically for inputs far from zero (tests/test_bn_add_relu.py
    test_large_mean catches it).
  * ``sample_scale`` (optional trailing argument, default None) is a contiguous (N,) tensor of the
    statistics dtype: a per-sample factor on the normalised branch, y = relu(s[n] * ((x - mean)*a + b) + z)
    (stochastic depth / drop-path as timm applies it: after the BN, before the residual add). Batch
    statistics are still those of x. In backward g = dy * mask is the residual's gradient and the BN
    branch receives s[n] * g. The cuda backend does not take it (resfused.ops.bn_add_relu never passes it
    there).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _layout

Tensor = torch.Tensor


def _per_channel(v: Optional[Tensor], like: Tensor, default: float) -> Tensor:
    if v is None:
        return torch.full_like(like, default)
    return v.to(like.dtype)


def _bcast(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def _per_sample(s: Tensor) -> Tensor:
    return s.view(-1, 1, 1, 1)


def _apply(x: Tensor, residual: Optional[Tensor], mean: Tensor, scale: Tensor, shift: Tensor, relu: bool,
           want_mask: bool, sample_scale: Optional[Tensor] = None):
    # (x - mean) * scale + shift, never x * scale + (shift - mean * scale): for inputs far from zero
    # (mean 1e4, unit spread) the folded form cancels catastrophically, the centred one is exact-ish.
    layout = _layout.layout_of(x)
    acc = (x.to(scale.dtype) - _bcast(mean)) * _bcast(scale) + _bcast(shift)
    if sample_scale is not None:
        acc = acc * _per_sample(sample_scale.to(acc.dtype))
    if residual is not None:
        acc = acc + residual.to(acc.dtype)
    mask = _layout.empty_mask(x.device)
    if relu:
        positive = acc > 0
        if want_mask:
            mask = _layout.pack_mask(positive, layout)
        acc = torch.where(positive, acc, torch.zeros((), dtype=acc.dtype, device=acc.device))
    return torch.empty_like(x).copy_(acc), mask


def forward_train(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float, eps: float,
                  relu: bool, sample_scale: Optional[Tensor] = None):
    """Batch statistics (of x), running-stats update, y = relu(s[n]*((x - mean)*a + b) + residual)
    (s = 1 without sample_scale).

    Returns (y, mask, mean, invstd)."""
    xf = x.to(_layout.stats_dtype(x.dtype))
    n = x.numel() // x.shape[1]
    mean = xf.mean(dim=(0, 2, 3))
    var = (xf - _bcast(mean)).square().sum(dim=(0, 2, 3)) / n
    invstd = torch.rsqrt(var + eps)
    # An empty batch has no statistics (mean and invstd come out NaN, as in torch) and, as in torch,
    # leaves the running statistics untouched.
    if running_mean is not None and n > 0:
        running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
    if running_var is not None and n > 0:
        running_var.mul_(1 - momentum).add_(var * (n / max(n - 1, 1)), alpha=momentum)
    w = _per_channel(weight, mean, 1.0)
    b = _per_channel(bias, mean, 0.0)
    y, mask = _apply(x, residual, mean, w * invstd, b, relu, want_mask=True, sample_scale=sample_scale)
    return y, mask, mean, invstd


def forward_eval(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                 running_mean: Tensor, running_var: Tensor, eps: float, relu: bool, save_mask: bool,
                 sample_scale: Optional[Tensor] = None):
    """y = relu(s[n]*((x - running_mean)*a + b) + residual), a = weight*rsqrt(running_var + eps).

    Returns (y, mask)."""
    invstd = torch.rsqrt(running_var + eps)
    w = _per_channel(weight, invstd, 1.0)
    b = _per_channel(bias, invstd, 0.0)
    return _apply(x, residual, running_mean, w * invstd, b, relu, want_mask=save_mask, sample_scale=sample_scale)


def backward(grad_out: Tensor, x: Tensor, mask: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
             relu: bool, training: bool, need_input_grad: bool, need_residual_grad: bool, need_weight_grad: bool,
             sample_scale: Optional[Tensor] = None):
    """Gradients of y = relu(s[n]*(w*(x-mean)*invstd + b) + residual) (s = 1 without sample_scale).

    Returns (grad_input, grad_residual, grad_weight, grad_bias); each is an empty tensor when not asked
    for (grad_weight and grad_bias come together). g = dy*mask is grad_residual; the BN branch gets
    s[n]*g. ``training`` False means mean/invstd are constants (running statistics), so
    grad_input = w*invstd*s[n]*g.
    """
    layout = _layout.layout_of(x)
    stats_dtype = mean.dtype
    g = grad_out.to(stats_dtype)
    if relu:
        g = torch.where(_layout.unpack_mask(mask, x.shape, layout), g, torch.zeros((), dtype=g.dtype, device=g.device))
    def empty(dtype):  # a fresh empty tensor for each output not asked for: outputs may not alias
        return torch.empty(0, dtype=dtype, device=x.device)

    grad_residual = torch.empty_like(x).copy_(g) if need_residual_grad else empty(x.dtype)
    grad_input, grad_weight, grad_bias = empty(x.dtype), empty(stats_dtype), empty(stats_dtype)
    if sample_scale is not None:
        g = g * _per_sample(sample_scale.to(stats_dtype))
    if need_input_grad or need_weight_grad:
        xhat = (x.to(stats_dtype) - _bcast(mean)) * _bcast(invstd)
        sum_g = g.sum(dim=(0, 2, 3))
        sum_gx = (g * xhat).sum(dim=(0, 2, 3))
        if need_weight_grad:
            grad_weight, grad_bias = sum_gx, sum_g
        if need_input_grad:
            w = _per_channel(weight, mean, 1.0)
            k = _bcast(w * invstd)
            if training:
                n = x.numel() // x.shape[1]
                dx = k * (g - _bcast(sum_g / n) - xhat * _bcast(sum_gx / n))
            else:
                dx = k * g
            grad_input = torch.empty_like(x).copy_(dx)
    return grad_input, grad_residual, grad_weight, grad_bias
