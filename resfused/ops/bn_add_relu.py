"""Fused BatchNorm + residual add + ReLU: custom ops, fake implementations, autograd Function, dispatch.

Three custom ops, each taking an optional per-sample scale ``sample_scale`` (Tensor?, (N,), statistics
dtype: y = relu(s[n] * bn(x) + residual), stochastic depth) and then the concrete backend name as its
last arguments:
  resfused::bn_add_relu_forward_train  -> (y, mask, mean, invstd); mutates running_mean/running_var
  resfused::bn_add_relu_forward_eval   -> (y, mask)
  resfused::bn_add_relu_backward       -> (grad_input, grad_residual, grad_weight, grad_bias)
The backend functions they call share one contract, documented in resfused/reference/bn_add_relu.py.
The cuda backend (torch.ops.resfused_cuda.*) has no sample_scale: calls with one never resolve to it.
``batch_norm_add_relu`` validates arguments (clear errors, no state change on bad input), picks the
backend and runs ``BatchNormAddReLUFunction``.

On CPU float32/float64 tensors ``auto`` resolves to "native" (resfused._backend.NATIVE): ``native_forward``
runs aten's own batch norm (F.batch_norm: the same kernel, running-stats update and autograd as
nn.BatchNorm2d) and then in-place mul_/add_/relu_, which is what the stock torchvision block does, so a
converted model on CPU costs what the stock one does. It bypasses the custom ops and the autograd
Function (aten's autograd saves what stock saves). An explicit backend="reference" runs the float64-exact
composite, the test oracle.
"""

from __future__ import annotations

import importlib
import types
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _backend, _layout
from ..reference import bn_add_relu as _reference

Tensor = torch.Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _backend_impl(name: str):
    """The module (or namespace) holding forward_train / forward_eval / backward for ``name``."""
    if name == "reference":
        return _reference
    if name == "triton":
        return importlib.import_module("resfused.triton_kernels.bn_add_relu")
    if name == "cuda":
        ops = torch.ops.resfused_cuda
        return types.SimpleNamespace(forward_train=ops.bn_add_relu_forward_train,
                                     forward_eval=ops.bn_add_relu_forward_eval,
                                     backward=ops.bn_add_relu_backward)
    if name == "cuda_sim":
        return importlib.import_module("resfused._cuda_sim")
    raise ValueError(f"unknown resfused backend {name!r}")


def _sample_scale_args(backend: str, sample_scale: Optional[Tensor]) -> tuple:
    """The trailing backend-function arguments for ``sample_scale``: none without one (the cuda backend's
    ops have no such argument, and cannot run a call with one)."""
    if sample_scale is None:
        return ()
    if backend in ("cuda", "cuda_sim"):
        raise RuntimeError(f"resfused backend {backend!r} does not implement sample_scale (the per-sample drop-path "
                           "scale) yet; use backend 'triton' or 'reference' (auto picks triton on CUDA tensors)")
    return (sample_scale,)


# ---------------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------------

@torch.library.custom_op("resfused::bn_add_relu_forward_train", mutates_args=("running_mean", "running_var"))
def bn_add_relu_forward_train(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                              bias: Optional[Tensor], running_mean: Optional[Tensor],
                              running_var: Optional[Tensor], momentum: float, eps: float, relu: bool,
                              sample_scale: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    extra = _sample_scale_args(backend, sample_scale)
    return tuple(_backend_impl(backend).forward_train(x, residual, weight, bias, running_mean, running_var,
                                                      momentum, eps, relu, *extra))


@bn_add_relu_forward_train.register_fake
def _(x, residual, weight, bias, running_mean, running_var, momentum, eps, relu, sample_scale, backend):
    stats = _layout.stats_dtype(x.dtype)
    c = x.shape[1]
    return (torch.empty_like(x), _fake_mask(x, relu),
            x.new_empty((c,), dtype=stats), x.new_empty((c,), dtype=stats))


@torch.library.custom_op("resfused::bn_add_relu_forward_eval", mutates_args=())
def bn_add_relu_forward_eval(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                             bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor, eps: float,
                             relu: bool, save_mask: bool, sample_scale: Optional[Tensor],
                             backend: str) -> tuple[Tensor, Tensor]:
    extra = _sample_scale_args(backend, sample_scale)
    return tuple(_backend_impl(backend).forward_eval(x, residual, weight, bias, running_mean, running_var,
                                                     eps, relu, save_mask, *extra))


@bn_add_relu_forward_eval.register_fake
def _(x, residual, weight, bias, running_mean, running_var, eps, relu, save_mask, sample_scale, backend):
    return torch.empty_like(x), _fake_mask(x, relu and save_mask)


@torch.library.custom_op("resfused::bn_add_relu_backward", mutates_args=())
def bn_add_relu_backward(grad_out: Tensor, x: Tensor, mask: Tensor, mean: Tensor, invstd: Tensor,
                         weight: Optional[Tensor], relu: bool, training: bool, need_input_grad: bool,
                         need_residual_grad: bool, need_weight_grad: bool, sample_scale: Optional[Tensor],
                         backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    extra = _sample_scale_args(backend, sample_scale)
    return tuple(_backend_impl(backend).backward(grad_out, x, mask, mean, invstd, weight, relu, training,
                                                 need_input_grad, need_residual_grad, need_weight_grad, *extra))


@bn_add_relu_backward.register_fake
def _(grad_out, x, mask, mean, invstd, weight, relu, training, need_input_grad, need_residual_grad,
      need_weight_grad, sample_scale, backend):
    c = x.shape[1]
    empty_x = x.new_empty((0,))
    stats = mean.new_empty((c,)) if need_weight_grad else mean.new_empty((0,))
    return (torch.empty_like(x) if need_input_grad else empty_x,
            torch.empty_like(x) if need_residual_grad else empty_x,
            stats, stats.clone())


def _fake_mask(x: Tensor, relu: bool) -> Tensor:
    if not relu:
        return _layout.empty_mask(x.device)
    return x.new_empty(_layout.mask_shape(x.shape, _layout.layout_of(x)), dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------------

class BatchNormAddReLUFunction(torch.autograd.Function):
    """y = relu(s[n] * bn(x) + residual) composed from the custom ops above (s = 1 without sample_scale).

    Arguments must already be validated and normalised (see ``batch_norm_add_relu``). Saves x, the
    packed ReLU mask, the (C,) mean/invstd and the (N,) sample_scale if any; never the pre-activation or
    the residual. sample_scale is not differentiable: its gradient is None.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, running_mean, running_var, training, momentum, eps, relu,
                needs_grad, backend, sample_scale):
        if training:
            y, mask, mean, invstd = torch.ops.resfused.bn_add_relu_forward_train(
                x, residual, weight, bias, running_mean, running_var, momentum, eps, relu, sample_scale, backend)
        else:
            y, mask = torch.ops.resfused.bn_add_relu_forward_eval(
                x, residual, weight, bias, running_mean, running_var, eps, relu, needs_grad, sample_scale, backend)
            mean = running_mean
            invstd = torch.rsqrt(running_var + eps) if needs_grad else running_var
        if needs_grad:
            ctx.save_for_backward(x, mask, mean, invstd, weight, sample_scale)
        ctx.training, ctx.relu, ctx.backend = training, relu, backend
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, mask, mean, invstd, weight, sample_scale = ctx.saved_tensors
        need_x, need_res, need_w, need_b = ctx.needs_input_grad[:4]
        grad_y = grad_y.contiguous(memory_format=_layout.memory_format(_layout.layout_of(x)))
        # Without a ReLU the residual's gradient is grad_y itself: no kernel writes it.
        op_res = need_res and ctx.relu
        grad_x, grad_res, grad_w, grad_b = torch.ops.resfused.bn_add_relu_backward(
            grad_y, x, mask, mean, invstd, weight, ctx.relu, ctx.training, need_x, op_res, need_w or need_b,
            sample_scale, ctx.backend)
        if need_res and not ctx.relu:
            grad_res = grad_y
        return (grad_x if need_x else None, grad_res if need_res else None,
                grad_w if need_w else None, grad_b if need_b else None,
                None, None, None, None, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------------

def _check_channel_vector(name: str, v: Optional[Tensor], c: int, device: torch.device) -> None:
    if v is None:
        return
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(v).__name__}")
    if v.dim() != 1 or v.shape[0] != c:
        raise ValueError(f"{name} must have shape ({c},) to match input's {c} channels, got {tuple(v.shape)}")
    if not v.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device} but input is on {device}")


def _check_sample_scale(sample_scale, input: Tensor) -> None:
    if sample_scale is None:
        return
    if not isinstance(sample_scale, Tensor):
        raise TypeError(f"sample_scale must be a Tensor or None, got {type(sample_scale).__name__}")
    n = input.shape[0]
    if sample_scale.dim() != 1 or sample_scale.shape[0] != n:
        raise ValueError(f"sample_scale must have shape ({n},) to match input's batch of {n}, "
                         f"got {tuple(sample_scale.shape)}")
    stats = _layout.stats_dtype(input.dtype)
    if sample_scale.dtype != stats:
        raise ValueError(f"sample_scale must have the statistics dtype {stats} for {input.dtype} input, "
                         f"got {sample_scale.dtype}")
    if sample_scale.device != input.device:
        raise ValueError(f"sample_scale is on {sample_scale.device} but input is on {input.device}")
    if sample_scale.requires_grad and torch.is_grad_enabled():
        raise ValueError("sample_scale must not require grad: it is not differentiable (pass a detached tensor)")


def _eval_accepts_zero_eps() -> bool:
    """Whether the installed torch's F.batch_norm takes eps=0 with running statistics (torch >= 2.13 does;
    earlier releases reject eps <= 0 in every mode). Asked of F.batch_norm itself, once, at import."""
    try:
        torch.nn.functional.batch_norm(torch.zeros(2, 1), torch.zeros(1), torch.ones(1), training=False, eps=0.0)
    except ValueError:
        return False
    return True


_EVAL_ACCEPTS_ZERO_EPS = _eval_accepts_zero_eps()


def check_eps(eps, training: bool) -> None:
    """Reject the eps F.batch_norm rejects, with its error type (ValueError): eps <= 0 when normalising with
    batch statistics (``training``: F.batch_norm's training flag), eps < 0 with running statistics, and there
    eps = 0 too where the installed torch rejects it (before 2.13). A NaN eps passes, as in F.batch_norm.
    Unlike nn.BatchNorm2d, the modules check before counting the batch: a rejected call changes no state.
    (resfused.fuse_for_inference folds a BN with eps=0 into its conv: see resfused/fuse.py.)"""
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise ValueError(f"eps must be a float, got {eps!r}")
    if training and eps <= 0:
        raise ValueError(f"eps must be positive when normalising with batch statistics (training), got {eps!r}")
    if eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps!r}")
    if eps == 0 and not _EVAL_ACCEPTS_ZERO_EPS:
        raise ValueError(f"eps must be positive (this torch {torch.__version__}'s F.batch_norm rejects eps=0 in "
                         f"every mode), got {eps!r}")


def validate_args(input, residual, running_mean, running_var, weight, bias, training, momentum, eps,
                  sample_scale=None):
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got {input.dim()}-D input of shape {tuple(input.shape)}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    c = input.shape[1]
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"residual must be a Tensor or None, got {type(residual).__name__}")
        if residual.shape != input.shape:
            raise ValueError(f"residual must have input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != input.dtype:
            raise TypeError(f"residual must have input's dtype {input.dtype}, got {residual.dtype}")
        if residual.device != input.device:
            raise ValueError(f"residual is on {residual.device} but input is on {input.device}")
    for name, v in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        _check_channel_vector(name, v, c, input.device)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var must be given when training=False")
    _check_sample_scale(sample_scale, input)
    if not isinstance(momentum, (int, float)) or isinstance(momentum, bool):
        raise TypeError(f"momentum must be a float, got {type(momentum).__name__}")
    check_eps(eps, training)
    if training and input.numel() // max(c, 1) <= 1 and input.numel() > 0:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")


def batch_norm_add_relu(input: Tensor, residual: Optional[Tensor], running_mean: Optional[Tensor],
                        running_var: Optional[Tensor], weight: Optional[Tensor] = None,
                        bias: Optional[Tensor] = None, training: bool = False, momentum: float = 0.1,
                        eps: float = 1e-5, relu: bool = True, backend: Optional[str] = None, *,
                        sample_scale: Optional[Tensor] = None) -> Tensor:
    """``relu(F.batch_norm(input, ...) + residual)`` in one fused pass, with F.batch_norm's side effects.

    With ``sample_scale`` s: ``relu(s[n] * F.batch_norm(input, ...) + residual)``, timm's drop-path
    (stochastic depth) on the BN output before the residual add.

    Args:
        input: (N, C, H, W), float16/bfloat16/float32 (float64 on the reference and triton backends),
            contiguous or channels_last. Other strides are copied to contiguous first.
        residual: None or a tensor of input's shape, dtype and device; it is copied to input's memory
            format if it is in the other one.
        running_mean, running_var: None (batch statistics only) or (C,) tensors, updated in place when
            ``training`` (unbiased variance, as torch). Required when ``training`` is False.
        weight, bias: None or (C,) tensors. Statistics and affine math run in float32 (float64 for
            float64 input); other parameter dtypes are cast, and running stats written back in their dtype.
        relu: apply the ReLU (False gives ``bn(input) + residual``).
        backend: "auto", "cuda", "triton", "reference", "cuda_sim" (a test tool: the CUDA kernels on CPU
            tensors, resfused/_cuda_sim.py), or None for resfused.get_backend(). ``auto`` on CPU
            float32/float64 tensors runs aten's batch norm + in-place add/ReLU ("native", see above).
        sample_scale: None or an (N,) tensor in the statistics dtype (float32; float64 for float64
            input) on input's device: per-sample factors on the normalised branch (0 for a dropped
            sample, 1/keep_prob for a kept one). Batch statistics are still those of ``input``. Not
            differentiable (it must not require grad). The cuda backend does not implement it yet:
            ``auto`` then picks triton on CUDA tensors, an explicit "cuda" raises.

    Returns:
        A tensor of input's shape, dtype and memory format.
    """
    validate_args(input, residual, running_mean, running_var, weight, bias, training, momentum, eps, sample_scale)
    return run_validated(input, residual, running_mean, running_var, weight, bias, training, momentum, eps, relu,
                         _backend.resolve(backend, input, sample_scale=sample_scale is not None), sample_scale)


def normalise_args(input, residual, running_mean, running_var, weight, bias, sample_scale):
    """Validated arguments in the form the autograd Functions take: a dense input (other strides copied to
    contiguous), the residual in its layout, statistics-dtype vectors (running stats cast on a copy when
    their dtype differs; ``write_back_running_stats`` copies the update back) and whether a gradient is needed.

    Returns (input, residual, weight, bias, run_mean, run_var, needs_grad, sample_scale)."""
    try:
        layout = _layout.layout_of(input)
    except ValueError:
        input = input.contiguous()
        layout = _layout.NCHW
    if residual is not None:
        residual = residual.contiguous(memory_format=_layout.memory_format(layout))
    stats = _layout.stats_dtype(input.dtype)
    weight = None if weight is None else weight.to(stats)
    bias = None if bias is None else bias.to(stats)
    run_mean = None if running_mean is None else running_mean.to(stats)
    run_var = None if running_var is None else running_var.to(stats)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, residual, weight, bias))
    sample_scale = None if sample_scale is None else sample_scale.contiguous()
    return input, residual, weight, bias, run_mean, run_var, needs_grad, sample_scale


def write_back_running_stats(running_mean, running_var, run_mean, run_var) -> None:
    """Copy an update made on cast copies (normalise_args) back into the caller's running stats."""
    for given, used in ((running_mean, run_mean), (running_var, run_var)):
        if used is not given:
            given.copy_(used)


def native_forward(input: Tensor, residual: Optional[Tensor], running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                   momentum: float, eps: float, relu: bool, sample_scale: Optional[Tensor] = None) -> Tensor:
    """The "native" backend (CPU float32/float64): ``relu_(F.batch_norm(...).mul_(s[n]).add_(residual))``.

    Arguments as normalise_args returns them. aten's batch norm updates the running stats (unbiased
    variance, ``momentum`` already the module's factor) and its backward reads the saved input, mean and
    invstd, never its output, so the in-place tail is safe for autograd; relu_ saves its output as the ReLU
    mask, as stock's ``relu(inplace=True)`` does."""
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if sample_scale is not None:
        y = y.mul_(sample_scale.view(-1, 1, 1, 1))
    if residual is not None:
        y = y.add_(residual)
    return y.relu_() if relu else y


def run_validated(input, residual, running_mean, running_var, weight, bias, training, momentum, eps, relu,
                  backend, sample_scale=None):
    """batch_norm_add_relu after validate_args and with a resolved backend name (for modules); a
    sample_scale needs a backend resolved with ``sample_scale=True``."""
    input, residual, weight, bias, run_mean, run_var, needs_grad, sample_scale = normalise_args(
        input, residual, running_mean, running_var, weight, bias, sample_scale)
    if backend == _backend.NATIVE:
        y = native_forward(input, residual, run_mean, run_var, weight, bias, bool(training), float(momentum),
                           float(eps), bool(relu), sample_scale)
        if training:
            write_back_running_stats(running_mean, running_var, run_mean, run_var)
        return y
    y = BatchNormAddReLUFunction.apply(input, residual, weight, bias, run_mean, run_var, bool(training),
                                       float(momentum), float(eps), bool(relu), needs_grad, backend, sample_scale)
    if training:
        write_back_running_stats(running_mean, running_var, run_mean, run_var)
    return y
