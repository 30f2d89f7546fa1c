"""The correctness gate a benchmark row passes before it is timed, and what path a row actually ran.

The gate is the test suite's rule (tests/_oracle.py): an implementation's result in dtype d passes when its
error against a float64 computation of the same inputs is at most twice stock PyTorch's own error (eager, in
d, on the same inputs), with a floor of a few ulp of d for results that eager happens to get exact. Kernel
outputs are compared by their largest elementwise error; whole-model logits by norm-relative error, as the
model tests do (one flipped ReLU deep in a network makes max errors noise). A wrong kernel (a missing bias,
a bad tile, a 1 % error in one channel) fails it, where the old norm-relative 5e-2 (kernels) and 1e-1
(models) bounds let it be timed as if it were right.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.detach().double() - ref.detach().double()).abs().max().item() if ref.numel() else 0.0


def nrel(a: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().double()
    return ((a.detach().double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _floor(dtype: torch.dtype, ref: torch.Tensor) -> float:
    scale = max(1.0, ref.detach().double().abs().max().item()) if ref.numel() else 1.0
    return 4 * torch.finfo(dtype).eps * scale


def _channel_nrel(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Norm-relative error of each channel (dim 1) of a 4-D tensor."""
    d = (a.detach().double() - ref.detach().double()).transpose(0, 1).reshape(ref.shape[1], -1)
    r = ref.detach().double().transpose(0, 1).reshape(ref.shape[1], -1)
    return d.norm(dim=1) / r.norm(dim=1).clamp_min(1e-30)


def check_kernel(outs, refs64, eager_outs) -> float:
    """Raise AssertionError unless every output of ``outs`` is within twice eager's error of the float64
    ``refs64``: its largest elementwise error (floor 4 ulp of the output's dtype at the output's scale) and, for
    activations (4-D), its worst channel's norm-relative error against eager's worst channel (floor half an ulp
    of the dtype, one correct rounding being ~0.3 ulp RMS, plus 4 fp32 ulp for the statistics). The per-channel bound is what catches
    a 1 % error in one channel in bf16, where 1 % is 1.3 to 2.6 ulp and hides under any max-error bound.
    Returns the largest error/tolerance ratio (<= 1), recorded in the row."""
    outs, refs64, eager_outs = _as_tuple(outs), _as_tuple(refs64), _as_tuple(eager_outs)
    if not len(outs) == len(refs64) == len(eager_outs):
        raise AssertionError(f"{len(outs)} outputs, the float64 reference has {len(refs64)}, eager {len(eager_outs)}")
    worst = 0.0
    for i, (out, ref, eager) in enumerate(zip(outs, refs64, eager_outs)):
        if out.shape != ref.shape:
            raise AssertionError(f"output {i}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
        if not bool(torch.isfinite(out).all()):
            raise AssertionError(f"output {i}: non-finite values")
        err = max_err(out, ref)
        tol = max(2 * max_err(eager, ref), _floor(out.dtype, ref))
        if not err <= tol:
            raise AssertionError(f"output {i}: max error {err:.3e} against float64 > {tol:.3e} (twice eager's "
                                 f"{max_err(eager, ref):.3e}); not timed")
        worst = max(worst, err / tol if tol > 0 else 0.0)
        if ref.dim() == 4 and ref.numel():
            got, own = _channel_nrel(out, ref), _channel_nrel(eager, ref)
            # floor: one rounding of the output (half an ulp of its dtype) plus fp32 statistics that differ from
            # eager's by a few fp32 ulp, a per-channel scale error that no averaging removes
            ctol = max(2 * float(own.max()), 0.5 * torch.finfo(out.dtype).eps + 4 * torch.finfo(torch.float32).eps)
            c = int(got.argmax())
            if not got[c] <= ctol:
                raise AssertionError(f"output {i}, channel {c}: norm-relative error {got[c]:.3e} against float64 > "
                                     f"{ctol:.3e} (twice eager's worst channel, {float(own.max()):.3e}); not timed")
            worst = max(worst, float(got[c]) / ctol)
    return worst


def check_model(logits: torch.Tensor, ref64: torch.Tensor, stock_logits: torch.Tensor) -> float:
    """Norm-relative error of ``logits`` against the float64 stock model at most twice the stock model's own
    (same precision regime), floor 4 ulp of the logits' dtype. Returns the error/tolerance ratio."""
    err, own = nrel(logits, ref64), nrel(stock_logits, ref64)
    tol = max(2 * own, 4 * torch.finfo(logits.dtype).eps)
    if not err <= tol:
        raise AssertionError(f"logits: norm-relative error {err:.3e} against the float64 stock model > {tol:.3e} "
                             f"(twice stock's {own:.3e}); not timed")
    return err / tol


def to_float64(tensors: Sequence) -> list:
    """float64 copies (requires_grad as the originals) of tensors, None kept."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        c = t.detach().to(torch.float64).clone()
        out.append(c.requires_grad_(t.requires_grad))
    return out


# ---------------------------------------------------------------------------------------------------
# which path ran
# ---------------------------------------------------------------------------------------------------

def _triton_autotuners() -> list:
    import sys

    try:
        from triton.runtime.autotuner import Autotuner
    except Exception:
        return []
    found = []
    for name, mod in list(sys.modules.items()):
        if mod is None or "triton_kernels" not in name:
            continue
        for attr, value in vars(mod).items():
            if isinstance(value, Autotuner):
                found.append((f"{name.rsplit('.', 1)[-1]}.{attr}", value))
    return found


def reset_triton_choices() -> None:
    """Forget each autotuner's last choice, so triton_path() names only what the next call picks."""
    for _, at in _triton_autotuners():
        at.best_config = None


def triton_path() -> str:
    """The configs the Triton autotuners picked since reset_triton_choices(), or the fixed config."""
    if os.environ.get("RESFUSED_TRITON_AUTOTUNE", "1") in ("", "0"):
        return "fixed configs (RESFUSED_TRITON_AUTOTUNE=0)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter (one fixed config)"
    used = [f"{name}: {at.best_config}" for name, at in _triton_autotuners() if getattr(at, "best_config", None)]
    return "; ".join(used) if used else "no autotuned kernel ran (fixed configs)"


def cuda_bn_path(x: torch.Tensor, training: bool) -> str:
    """The CUDA BN kernels' scheme for x (persistent or two-pass, grid, cache), from the planner itself."""
    if not x.is_cuda:
        return "not on a CUDA device"
    ops = torch.ops.resfused_cuda
    if not training:
        return "eval: one elementwise pass"
    return f"forward: {ops.bn_add_relu_plan(x, 'forward_train')}; backward: {ops.bn_add_relu_plan(x, 'backward')}"
