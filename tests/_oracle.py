"""The test oracle: stock PyTorch composites in float64, and dtype-aware elementwise comparisons.

Tolerance rule (flash-attention style, elementwise): a result ``out`` in dtype d passes when, at every element i,

    |out_i - ref_i| <= max(FACTOR * |stock_i - ref_i|,          stock PyTorch's own error in d at that element,
                           ULPS * ulp_d(ref_i),                 a few ulps of d at that element,
                           COMPUTE_ULPS * eps32 * S_c,          float32 accumulation noise,
                           FACTOR * eps32 / eps_d * E)          float32 conditioning,

with ref the float64 composite, stock the same composite run in d, ulp_d(v) the spacing of d at |v|, S_c the
largest |ref| in element i's channel (dim 1; the whole tensor for vectors), or the largest operand of the
channel's arithmetic where the caller names it (``operand_scale``: a BN input gradient of a channel with two
values is pure cancellation, every element far below the invstd * weight * grad terms it is made of), and E
stock's largest error in the tensor. The last two terms are what float32 arithmetic can promise at all: cancellation leaves elements
far smaller than their operands, and a statistic rounded once to float32 (the mean of values near 1e4, to
half an ulp) shifts its whole channel by an amount that stock, rounding differently, may happen to avoid in
that channel but not in every channel. For float32 results the last term is twice stock's worst error
(the rule before elementwise bounds); in half precision both are 2^-13 or less of the ulp-scale terms, so
a 1 % error anywhere above 1e-4 of a channel's largest value fails (tests/test_mutations.py checks that it
does for every op family).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

FACTOR = 2.0
ULPS = 2.0
COMPUTE_ULPS = 16.0


def batch_norm64(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """F.batch_norm in exact composite form (any eps >= 0: torch < 2.13 rejects eps=0 even in eval), with
    its running-stats update (unbiased variance) and its error for one value per channel."""
    c = x.shape[1]
    view = (1, c) + (1,) * (x.dim() - 2)
    if training:
        n = x.numel() // max(c, 1)
        if n == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dims)
        var = (x - mean.view(view)).square().mean(dims)
        if running_mean is not None:
            with torch.no_grad():
                unbiased = var * (n / (n - 1))
                running_mean.mul_(1 - momentum).add_(momentum * mean.detach().to(running_mean.dtype))
                running_var.mul_(1 - momentum).add_(momentum * unbiased.detach().to(running_var.dtype))
    else:
        mean, var = running_mean, running_var
    y = (x - mean.view(view)) * torch.rsqrt(var.view(view) + eps)
    if weight is not None:
        y = y * weight.view(view)
    if bias is not None:
        y = y + bias.view(view)
    return y


def _exact_bn_forward(self, x):
    bn_training = self.training or (self.running_mean is None and self.running_var is None)
    track = self.training and self.track_running_stats
    factor = 0.0 if self.momentum is None else self.momentum
    if track and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
    use_running = not self.training or self.track_running_stats
    return batch_norm64(x, self.running_mean if use_running else None, self.running_var if use_running else None,
                        self.weight, self.bias, bn_training, factor, self.eps)


def exact_zero_eps(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (in place) with every BatchNorm whose eps is 0 computing through ``batch_norm64``: stock
    F.batch_norm rejects eps=0 in training and, before torch 2.13, in eval too (so a stock oracle for folding a
    BN with eps=0 cannot call it)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.eps == 0:
            m.forward = types.MethodType(_exact_bn_forward, m)
    return model


def composite(x, residual, running_mean, running_var, weight, bias, training, momentum, eps, relu, sample_scale=None):
    """Stock PyTorch: F.batch_norm, (* sample_scale per sample, as timm's drop_path), + residual, relu.
    Mutates running stats like F.batch_norm. eps=0 (which F.batch_norm rejects in training, and in every mode
    before torch 2.13) runs the exact composite ``batch_norm64`` instead, in x's dtype."""
    if eps > 0:
        y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    else:
        y = batch_norm64(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if sample_scale is not None:
        y = y * sample_scale.to(y.dtype).view(-1, 1, 1, 1)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.detach().double() - ref.detach().double()).abs().max().item() if ref.numel() else 0.0


def ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at |v| (float64): eps * 2^floor(log2 |v|), never below the smallest subnormal."""
    fi = torch.finfo(dtype)
    a = v.detach().double().abs().clamp_min(fi.tiny)
    return (torch.floor(torch.log2(a)).exp2() * fi.eps).clamp_min(fi.tiny * fi.eps)


def _channel_max(a: torch.Tensor) -> torch.Tensor:
    """Largest value of ``a`` (float64, >= 0) in each element's channel (dim 1), broadcastable to ``a``; the
    tensor's largest for vectors."""
    if a.dim() < 2 or a.shape[1] == 0 or a.numel() == 0:
        return a.max() if a.numel() else a.new_zeros(())
    dims = [d for d in range(a.dim()) if d != 1]
    return a.amax(dim=dims, keepdim=True)


def elementwise_tolerance(dtype: torch.dtype, ref: torch.Tensor, torch_out: torch.Tensor | None = None,
                          factor: float = FACTOR, ulps: float = ULPS, pointwise: bool = True,
                          operand_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The per-element tolerance of the module docstring (float64, ref's shape).

    ``pointwise=False`` (whole models): stock's error term is ``factor`` times stock's largest error in the
    tensor rather than at each element. The output of a deep network carries the rounding of every layer
    before it, so stock's error at one logit says nothing about what a different, equally correct rounding
    gives there; the ulp floor stays elementwise."""
    ref = ref.detach().double()
    tol = ulps * ulp(ref, dtype)
    eps32 = torch.finfo(torch.float32).eps
    scale = _channel_max(ref.abs())
    if operand_scale is not None:
        scale = torch.maximum(scale, operand_scale.detach().double())
    tol = torch.maximum(tol, COMPUTE_ULPS * eps32 * scale)
    if torch_out is not None:
        stock_err = (torch_out.detach().double() - ref).abs()
        tol = torch.maximum(tol, factor * (stock_err if pointwise else stock_err.max()))
        tol = torch.maximum(tol, factor * eps32 / torch.finfo(dtype).eps * stock_err.max())
    return tol


def tolerance(dtype: torch.dtype, ref: torch.Tensor, torch_out: torch.Tensor | None) -> torch.Tensor:
    return elementwise_tolerance(dtype, ref, torch_out)


def check_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, torch_out=None, factor: float = FACTOR,
                ulps: float = ULPS, pointwise: bool = True, operand_scale=None) -> str | None:
    """None when ``out`` is within the elementwise tolerance of ``ref``, else what is wrong (worst element)."""
    if out.shape != ref.shape:
        return f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return None
    if not torch.isfinite(out).all():
        return "non-finite values"
    err = (out.detach().double() - ref.detach().double()).abs()
    tol = elementwise_tolerance(dtype, ref, torch_out, factor, ulps, pointwise, operand_scale)
    bad = err > tol
    if not bad.any():
        return None
    ratio = torch.where(bad, err / tol.clamp_min(1e-300), torch.zeros_like(err))
    i = int(ratio.flatten().argmax())
    idx = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), err.shape)) if err.dim() else ()
    return (f"{int(bad.sum())} of {err.numel()} elements out of tolerance; worst at {idx}: got "
            f"{out.detach().double().flatten()[i].item():.6e}, want {ref.detach().double().flatten()[i].item():.6e}, "
            f"error {err.flatten()[i].item():.3e} > tolerance {tol.flatten()[i].item():.3e}"
            + ("" if torch_out is None else
               f" (stock {dtype} error there {(torch_out.detach().double() - ref.detach().double()).abs().flatten()[i].item():.3e})"))


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, torch_out=None,
                 factor: float = FACTOR, ulps: float = ULPS, pointwise: bool = True, operand_scale=None) -> None:
    why = check_close(out, ref, dtype, torch_out, factor, ulps, pointwise, operand_scale)
    assert why is None, f"{name}: {why}"


def nrel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-relative error of a against b (whole-model comparisons, where max errors are too noisy)."""
    b = b.detach().double()
    return ((a.detach().double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def randomize_batchnorms(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN parameters and running stats (a fresh model's 1/0 would hide folding and stats bugs)."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return model


def sgd_steps(model, x, target, steps=2, seed=None):
    """``steps`` SGD steps on cross-entropy; returns (outputs, the last step's gradients by parameter name).
    ``seed`` seeds torch's RNG first (drop-path masks drawn in the forward then line up between models)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outs = []
    if seed is not None:
        torch.manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        F.cross_entropy(out.float(), target).backward()
        outs.append(out.detach())
        opt.step()
    return outs, {n: p.grad.clone() for n, p in model.named_parameters()}
