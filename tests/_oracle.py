"""The test oracle: stock PyTorch composites in float64, and dtype-aware comparisons.

Tolerance rule (flash-attention style): a result in dtype d passes when its max error against the
float64 composite is at most twice the error of stock PyTorch computing the same thing in d (plus a
floor of a few ulps of d, for results that PyTorch happens to get exact).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def composite(x, residual, running_mean, running_var, weight, bias, training, momentum, eps, relu, sample_scale=None):
    """Stock PyTorch: F.batch_norm, (* sample_scale per sample, as timm's drop_path), + residual, relu.
    Mutates running stats like F.batch_norm."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if sample_scale is not None:
        y = y * sample_scale.to(y.dtype).view(-1, 1, 1, 1)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.detach().double() - ref.detach().double()).abs().max().item() if ref.numel() else 0.0


def tolerance(dtype: torch.dtype, ref: torch.Tensor, torch_out: torch.Tensor | None) -> float:
    scale = max(1.0, ref.detach().double().abs().max().item()) if ref.numel() else 1.0
    floor = 4 * torch.finfo(dtype).eps * scale
    if torch_out is None:
        return floor
    return max(2 * max_err(torch_out, ref), floor)


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, torch_out=None) -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err, tol = max_err(out, ref), tolerance(dtype, ref, torch_out)
    assert err <= tol, f"{name}: max error {err:.3e} > tolerance {tol:.3e}"


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
