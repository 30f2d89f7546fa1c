"""The correctness gate a benchmark row passes before it is timed, and what path a row actually ran.

The gate is the test suite's rule (tests/_oracle.py, imported from the checkout): an implementation's result
in dtype d passes when, at every element, its error against a float64 computation of the same inputs is
within twice stock PyTorch's own error there (eager, in d, on the same inputs), a few ulps of d, or float32's
noise floors. Whole-model logits are compared norm-relative, twice stock's own error in the same precision
regime, as the model tests do (one flipped ReLU deep in a network makes elementwise errors noise). A wrong kernel (a missing bias,
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


def _oracle():
    """tests/_oracle.py, the test suite's tolerance rule (bench/ runs from a checkout, where tests/ is)."""
    import importlib
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("tests._oracle")


def check_kernel(outs, refs64, eager_outs) -> float:
    """Raise AssertionError unless every output of ``outs`` is within the test suite's elementwise tolerance of
    the float64 ``refs64`` (tests/_oracle.py: twice eager's error at each element, a few ulps of each element,
    float32 noise floors; a 1 % error in one channel fails it in every dtype). Returns the largest
    error/tolerance ratio over the elements (<= 1), recorded in the row as ``gate``."""
    oracle = _oracle()
    outs, refs64, eager_outs = _as_tuple(outs), _as_tuple(refs64), _as_tuple(eager_outs)
    if not len(outs) == len(refs64) == len(eager_outs):
        raise AssertionError(f"{len(outs)} outputs, the float64 reference has {len(refs64)}, eager {len(eager_outs)}")
    worst = 0.0
    for i, (out, ref, eager) in enumerate(zip(outs, refs64, eager_outs)):
        why = oracle.check_close(out, ref, out.dtype, eager)
        if why is not None:
            raise AssertionError(f"output {i} against float64 (the test suite's bound): {why}; not timed")
        if ref.numel():
            err = (out.detach().double() - ref.detach().double()).abs()
            tol = oracle.elementwise_tolerance(out.dtype, ref, eager)
            worst = max(worst, float((err / tol.clamp_min(1e-300)).max()))
    return worst


def check_model(logits: torch.Tensor, ref64: torch.Tensor, stock_logits: torch.Tensor) -> float:
    """Norm-relative error of ``logits`` against the float64 stock model at most twice the stock model's own
    (same precision regime; whole-model comparisons are norm-relative in the tests too), floor 4 ulp of the
    logits' dtype. Returns the error/tolerance ratio."""
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


class ResfusedMessages:
    """Collects what resfused says while a row warms up: warnings (the cuda conv ops' "no fused cuDNN engine ...;
    using the unfused path", once per process) and the resfused logger's lines (auto skipping a backend, a
    shortcut conv run separately). They go into the row's path, so a fallback is visible in the results."""

    def __enter__(self):
        import logging
        import warnings

        self.messages: list[str] = []
        self._warnings = warnings.catch_warnings(record=True)
        self._caught = self._warnings.__enter__()
        warnings.simplefilter("always")
        self._logger = logging.getLogger("resfused")
        self._handler = logging.Handler(logging.INFO)
        self._handler.emit = lambda record: self.messages.append(record.getMessage())
        self._level = self._logger.level
        self._logger.addHandler(self._handler)
        self._logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._level)
        self._warnings.__exit__(*exc)
        self.messages += [str(w.message) for w in self._caught if "resfused" in str(w.message)]
        self.messages = list(dict.fromkeys(self.messages))
        return False

    def suffix(self) -> str:
        return "".join(f"; said: {m[:300]}" for m in self.messages)


def cuda_bn_path(x: torch.Tensor, training: bool) -> str:
    """The CUDA BN kernels' scheme for x (persistent or two-pass, grid, cache), from the planner itself."""
    if not x.is_cuda:
        return "not on a CUDA device"
    ops = torch.ops.resfused_cuda
    if not training:
        return "eval: one elementwise pass"
    return f"forward: {ops.bn_add_relu_plan(x, 'forward_train')}; backward: {ops.bn_add_relu_plan(x, 'backward')}"
