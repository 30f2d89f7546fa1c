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
