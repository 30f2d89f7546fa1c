"""Convolutions with BatchNorm fused in for training: custom ops, fake implementations, autograd, dispatch.

The fused training path of a ResNet block (issue 6): each conv computes the batch statistics of its own
output in its epilogue, and applies the previous BN's normalize + ReLU to its input tiles in its prologue,
so the normalized activations are never written (not in forward, not for backward). Four custom ops, each
taking the concrete backend name as its last argument:

  resfused::conv_bn_forward        (x, weight, prologue BN, running stats, conv geometry, ...) -> (y, mean, invstd);
                                   mutates running_mean/running_var
  resfused::conv_bn_backward       -> (grad_x, grad_weight, grad_in_weight, grad_in_bias); recomputes the prologue
  resfused::conv_bn_tail_forward   relu(bn(y) + residual or bn_d(y_d)) -> (out, 1-bit mask)
  resfused::conv_bn_tail_backward  -> (grad_y, grad_weight, grad_bias, grad_residual, grad_res_weight, grad_res_bias)

Contracts in resfused/reference/conv_bn.py. ``ConvBNFunction`` and ``ConvBNTailFunction`` compose them.
Saved for backward: each conv's input (the previous conv's pre-BN output, or the block input), the per-channel
statistics, and the tail's packed ReLU mask; never a normalized activation.

How gradients reach the statistics: ``mean``/``invstd`` returned by conv_bn_forward are marked
non-differentiable, and the op consuming them (the next conv's prologue, or the tail) differentiates its BN in
training mode, i.e. through the statistics as functions of its input. That is exact because each BN's
statistics have exactly one consumer, the op that normalizes the tensor they describe.

Backends:
  reference  plain PyTorch (F.conv2d + torch ops); any device; fp64 too.
  triton     triton_kernels/conv_bn.py: forward (implicit-GEMM conv, BN + ReLU prologue on each loaded tile,
             per-tile (count, mean, M2) epilogue, deterministic Chan-merge finalize), backward (wgrad and dgrad
             recomputing the prologue from x, dReLU + dBN partial sums in the dgrad epilogue, an elementwise
             input-gradient kernel) and the tail (one elementwise kernel writing out + packed mask; backward:
             a reduction kernel and an elementwise kernel).
  cuda       resfused/ops/conv_bn_cuda.py over csrc/conv_bn.cpp: cuDNN graph-API convs with the BN + ReLU
             prologue fused into the mainloop and the statistics (sum, sum of squares) into the epilogue, the
             prologue recomputed inside cuDNN's wgrad; cuDNN dgrad followed by dReLU + dBN on the foundation's
             CUDA BN + add + ReLU kernels, which also run the tail. An unfused path (one warning) where cuDNN has no
             fused engine.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple, Optional

import torch

from .. import _backend, _layout
from ..reference import conv_bn as _reference
from .conv_bias_act import _pair, output_shape
from . import bn_add_relu as _bn_op

Tensor = torch.Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _backend_impl(name: str):
    if name == "reference":
        return _reference
    if name == "triton":
        return importlib.import_module("resfused.triton_kernels.conv_bn")
    if name == "cuda":
        return importlib.import_module("resfused.ops.conv_bn_cuda")
    raise ValueError(f"resfused backend {name!r} has no conv_bn implementation")


# ---------------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------------

@torch.library.custom_op("resfused::conv_bn_forward", mutates_args=("running_mean", "running_var"))
def conv_bn_forward(x: Tensor, weight: Tensor, in_mean: Optional[Tensor], in_invstd: Optional[Tensor],
                    in_weight: Optional[Tensor], in_bias: Optional[Tensor], running_mean: Optional[Tensor],
                    running_var: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int],
                    groups: int, prologue: bool, stats: bool, momentum: float, eps: float,
                    backend: str) -> tuple[Tensor, Tensor, Tensor]:
    with _backend.autocast_off(x):
        return tuple(_backend_impl(backend).forward(x, weight, in_mean, in_invstd, in_weight, in_bias, running_mean,
                                                    running_var, list(stride), list(padding), list(dilation), groups,
                                                    prologue, stats, momentum, eps))


@conv_bn_forward.register_fake
def _(x, weight, in_mean, in_invstd, in_weight, in_bias, running_mean, running_var, stride, padding, dilation, groups,
      prologue, stats, momentum, eps, backend):
    shape = output_shape(x.shape, weight.shape, stride, padding, dilation)
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_layout.memory_format(_layout.layout_of(x)))
    st = _layout.stats_dtype(x.dtype)
    c = shape[1] if stats else 0
    return y, x.new_empty((c,), dtype=st), x.new_empty((c,), dtype=st)


@torch.library.custom_op("resfused::conv_bn_backward", mutates_args=())
def conv_bn_backward(grad_y: Tensor, x: Tensor, weight: Tensor, in_mean: Optional[Tensor],
                     in_invstd: Optional[Tensor], in_weight: Optional[Tensor], in_bias: Optional[Tensor],
                     stride: list[int], padding: list[int], dilation: list[int], groups: int, prologue: bool,
                     in_training: bool, need_input_grad: bool, need_weight_grad: bool, need_in_affine_grad: bool,
                     backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with _backend.autocast_off(x):
        return tuple(_backend_impl(backend).backward(grad_y, x, weight, in_mean, in_invstd, in_weight, in_bias,
                                                     list(stride), list(padding), list(dilation), groups, prologue,
                                                     in_training, need_input_grad, need_weight_grad,
                                                     need_in_affine_grad))


@conv_bn_backward.register_fake
def _(grad_y, x, weight, in_mean, in_invstd, in_weight, in_bias, stride, padding, dilation, groups, prologue,
      in_training, need_input_grad, need_weight_grad, need_in_affine_grad, backend):
    st = _layout.stats_dtype(x.dtype)
    c = x.shape[1] if (prologue and need_in_affine_grad) else 0
    return (torch.empty_like(x) if need_input_grad else x.new_empty((0,)),
            torch.empty_like(weight) if need_weight_grad else weight.new_empty((0,)),
            x.new_empty((c,), dtype=st), x.new_empty((c,), dtype=st))


@torch.library.custom_op("resfused::conv_bn_tail_forward", mutates_args=())
def conv_bn_tail_forward(y: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor, residual: Tensor,
                         res_mean: Optional[Tensor], res_invstd: Optional[Tensor], res_weight: Optional[Tensor],
                         res_bias: Optional[Tensor], residual_bn: bool, backend: str) -> tuple[Tensor, Tensor]:
    with _backend.autocast_off(y):
        return tuple(_backend_impl(backend).tail_forward(y, mean, invstd, weight, bias, residual, res_mean,
                                                         res_invstd, res_weight, res_bias, residual_bn))


@conv_bn_tail_forward.register_fake
def _(y, mean, invstd, weight, bias, residual, res_mean, res_invstd, res_weight, res_bias, residual_bn, backend):
    mask = y.new_empty(_layout.mask_shape(y.shape, _layout.layout_of(y)), dtype=torch.uint8)
    return torch.empty_like(y), mask


@torch.library.custom_op("resfused::conv_bn_tail_backward", mutates_args=())
def conv_bn_tail_backward(grad_out: Tensor, mask: Tensor, y: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor,
                          residual: Tensor, res_mean: Optional[Tensor], res_invstd: Optional[Tensor],
                          res_weight: Optional[Tensor], residual_bn: bool, training: bool, res_training: bool,
                          need_y_grad: bool, need_affine_grad: bool, need_residual_grad: bool,
                          need_res_affine_grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                             Tensor]:
    with _backend.autocast_off(y):
        return tuple(_backend_impl(backend).tail_backward(grad_out, mask, y, mean, invstd, weight, residual,
                                                          res_mean, res_invstd, res_weight, residual_bn, training,
                                                          res_training, need_y_grad, need_affine_grad,
                                                          need_residual_grad, need_res_affine_grad))


@conv_bn_tail_backward.register_fake
def _(grad_out, mask, y, mean, invstd, weight, residual, res_mean, res_invstd, res_weight, residual_bn, training,
      res_training, need_y_grad, need_affine_grad, need_residual_grad, need_res_affine_grad, backend):
    c = mean.shape[0]
    cr = residual.shape[1] if (residual_bn and need_res_affine_grad) else 0
    ca = c if need_affine_grad else 0
    return (torch.empty_like(y) if need_y_grad else y.new_empty((0,)),
            mean.new_empty((ca,)), mean.new_empty((ca,)),
            torch.empty_like(residual) if need_residual_grad else y.new_empty((0,)),
            mean.new_empty((cr,)), mean.new_empty((cr,)))


# ---------------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------------

class ConvBNFunction(torch.autograd.Function):
    """(y, mean, invstd) = conv(relu(bn_in(x))) with y's batch statistics; arguments already validated.

    Saves x (not the activation), the weight and the prologue's per-channel vectors; mean and invstd are
    non-differentiable (see the module docstring).
    """

    @staticmethod
    def forward(ctx, x, weight, in_mean, in_invstd, in_weight, in_bias, running_mean, running_var, stride, padding,
                dilation, groups, prologue, in_training, stats, momentum, eps, backend):
        y, mean, invstd = torch.ops.resfused.conv_bn_forward(
            x, weight, in_mean, in_invstd, in_weight, in_bias, running_mean, running_var, stride, padding, dilation,
            groups, prologue, stats, momentum, eps, backend)
        ctx.mark_non_differentiable(mean, invstd)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, in_mean, in_invstd, in_weight, in_bias)
        ctx.conf = (stride, padding, dilation, groups, prologue, in_training, backend)
        return y, mean, invstd

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_invstd):
        nones = (None,) * 12
        if grad_y is None:
            return (None, None, None, None, None, None) + nones
        x, weight, in_mean, in_invstd, in_weight, in_bias = ctx.saved_tensors
        stride, padding, dilation, groups, prologue, in_training, backend = ctx.conf
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_aff = prologue and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5])
        grad_y = grad_y.contiguous(memory_format=_layout.memory_format(_layout.layout_of(x)))
        gx, gw, giw, gib = torch.ops.resfused.conv_bn_backward(
            grad_y, x, weight, in_mean, in_invstd, in_weight, in_bias, stride, padding, dilation, groups, prologue,
            in_training, need_x, need_w, need_aff, backend)
        return (gx if need_x else None, gw if need_w else None, None, None,
                giw if need_aff and ctx.needs_input_grad[4] else None,
                gib if need_aff and ctx.needs_input_grad[5] else None) + nones


class ConvBNTailFunction(torch.autograd.Function):
    """relu(bn(y) + residual) or relu(bn(y) + bn_d(residual)); arguments already validated.

    Saves y, the residual only when its BN is fused here (the shortcut conv's pre-BN output), the statistics
    and the packed 1-bit ReLU mask. With ``recompute`` (the conv that produced y: its input, weight, prologue
    vectors and (stride, padding, dilation, groups, prologue, stats)) y is not saved: backward recomputes it
    with that conv (same op, same kernel; no statistics kept, no running stats touched). The conv's input and
    weight are saved by the conv's own node already, so this saves an activation of y's size.
    """

    @staticmethod
    def forward(ctx, y, mean, invstd, weight, bias, residual, res_mean, res_invstd, res_weight, res_bias, residual_bn,
                training, res_training, backend, rc_x, rc_weight, rc_in_mean, rc_in_invstd, rc_in_weight, rc_in_bias,
                recompute):
        out, mask = torch.ops.resfused.conv_bn_tail_forward(y, mean, invstd, weight, bias, residual, res_mean,
                                                            res_invstd, res_weight, res_bias, residual_bn, backend)
        ctx.set_materialize_grads(False)
        # Without a BN on the residual, backward needs only its shape: save an empty stand-in, not the tensor.
        saved_res = residual if residual_bn else residual.new_empty((0,))
        saved_y = y if recompute is None else y.new_empty((0,))
        ctx.save_for_backward(saved_y, mean, invstd, weight, saved_res, res_mean, res_invstd, res_weight, mask,
                              rc_x, rc_weight, rc_in_mean, rc_in_invstd, rc_in_weight, rc_in_bias)
        ctx.conf = (residual_bn, training, res_training, backend, residual.shape, residual.stride(), recompute)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return (None,) * 21
        (y, mean, invstd, weight, residual, res_mean, res_invstd, res_weight, mask,
         rc_x, rc_weight, rc_in_mean, rc_in_invstd, rc_in_weight, rc_in_bias) = ctx.saved_tensors
        residual_bn, training, res_training, backend, res_shape, res_stride, recompute = ctx.conf
        if recompute is not None:
            stride, padding, dilation, groups, prologue, stats = recompute
            with torch.no_grad():
                y = torch.ops.resfused.conv_bn_forward(rc_x, rc_weight, rc_in_mean, rc_in_invstd, rc_in_weight,
                                                       rc_in_bias, None, None, stride, padding, dilation, groups,
                                                       prologue, stats, 0.0, 1e-5, backend)[0]
        if not residual_bn:
            residual = torch.empty_strided(res_shape, res_stride, dtype=y.dtype, device=y.device)
        nig = ctx.needs_input_grad
        need_y, need_aff, need_res = nig[0], nig[3] or nig[4], nig[5]
        need_raff = residual_bn and (nig[8] or nig[9])
        grad_out = grad_out.contiguous(memory_format=_layout.memory_format(_layout.layout_of(y)))
        gy, gw, gb, gr, grw, grb = torch.ops.resfused.conv_bn_tail_backward(
            grad_out, mask, y, mean, invstd, weight, residual, res_mean, res_invstd, res_weight, residual_bn, training,
            res_training, need_y, need_aff, need_res, need_raff, backend)
        return (gy if need_y else None, None, None, gw if nig[3] else None, gb if nig[4] else None,
                gr if need_res else None, None, None, grw if residual_bn and nig[8] else None,
                grb if residual_bn and nig[9] else None) + (None,) * 11


# ---------------------------------------------------------------------------------------------------
# validation, backend choice, public entry points
# ---------------------------------------------------------------------------------------------------

class ConvSpec(NamedTuple):
    """How a tensor was produced by ``conv_bn``: its input, weight, geometry and prologue, as passed to it.

    ``bn_add_relu_tail(..., recompute_from=spec)`` saves these (already saved by the conv itself) instead of
    the tail's input, and recomputes the input in backward. ``stats``: whether that conv_bn call had stats=True
    (the recompute runs the same kernel).
    """
    x: Tensor
    weight: Tensor
    stride: object
    padding: object
    dilation: object
    groups: int
    prologue: Optional["BNParams"]
    stats: bool


class BNParams(NamedTuple):
    """A BatchNorm as applied by a fused prologue or tail: ``(x - mean) * weight * invstd + bias``.

    ``training`` True means mean/invstd are the batch statistics of the normalized tensor (as returned by
    ``conv_bn(stats=True)``), so backward differentiates through them; False means constants (running stats).
    All four are (C,) float tensors.
    """
    mean: Tensor
    invstd: Tensor
    weight: Tensor
    bias: Tensor
    training: bool


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None if backend ``name`` can run the conv_bn ops on (device, dtype), else why not."""
    if name == "reference":
        return None
    if name == "triton":
        why = _backend.triton_unavailable_reason("resfused.triton_kernels.conv_bn", device)
        if why is None and dtype == torch.float64:
            why = "the triton conv_bn supports fp32/fp16/bf16, not float64"
        return why
    if name == "cuda":
        return _backend.unavailable_reason("cuda", device, dtype) or cuda_op_reason()
    raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {name!r}")


@torch.compiler.assume_constant_result  # fixed once _C is loaded; keeps dispatcher queries out of traces
def cuda_op_reason() -> Optional[str]:
    """None when resfused._C carries the CUDA C++ conv_bn ops, else why not."""
    return _backend.cuda_op_missing("resfused_cuda_conv_bn::conv_bn_forward", "csrc/conv_bn.cpp")


def resolve(backend: Optional[str], x: Tensor) -> str:
    """The concrete backend for the conv_bn ops on ``x`` (rules of resfused._backend.resolve_with): ``auto``
    picks cuda > triton for CUDA tensors and reference otherwise."""
    return _backend.resolve_with(unavailable_reason, backend, x, "conv_bn")


def _check_vector(name: str, v, c: int, device: torch.device) -> None:
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(v).__name__}")
    if v.dim() != 1 or v.shape[0] != c:
        raise ValueError(f"{name} must have shape ({c},), got {tuple(v.shape)}")
    if not v.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device} but x is on {device}")


def _check_bn(name: str, bn: Optional[BNParams], c: int, device: torch.device) -> None:
    if bn is None:
        return
    if not isinstance(bn, BNParams):
        raise TypeError(f"{name} must be a resfused.ops.conv_bn.BNParams or None, got {type(bn).__name__}")
    for field in ("mean", "invstd", "weight", "bias"):
        _check_vector(f"{name}.{field}", getattr(bn, field), c, device)


def _dense(t: Tensor) -> Tensor:
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _stats_vec(v: Optional[Tensor], st: torch.dtype) -> Optional[Tensor]:
    return None if v is None else v.to(st)


def conv_bn(x: Tensor, weight: Tensor, stride=1, padding=0, dilation=1, groups: int = 1, *,
            prologue: Optional[BNParams] = None, stats: bool = False, running_mean: Optional[Tensor] = None,
            running_var: Optional[Tensor] = None, momentum: float = 0.1, eps: float = 1e-5,
            backend: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor]:
    """``y = conv2d(relu(bn_in(x)), weight)`` and, with ``stats``, y's per-channel batch mean and invstd.

    Args:
        x: (N, C_in, H, W), float32/float16/bfloat16 (float64 on the reference backend), contiguous or
            channels_last (other strides are copied to contiguous first).
        weight: (C_out, C_in / groups, KH, KW), x's dtype. No conv bias (a BN follows).
        stride, padding, dilation, groups: as F.conv2d (zero padding, applied after the prologue's ReLU).
        prologue: None (the conv reads x as is) or the BN applied, with a ReLU, to each input tile as it is
            loaded; see BNParams.
        stats: compute y's batch statistics (fp32; fp64 for fp64) and, when running_mean/running_var are
            given, update them in place as nn.BatchNorm2d(momentum=momentum) does (unbiased variance).
        eps: the BN epsilon of the statistics' invstd.
        backend: "auto", "cuda", "triton", "reference", or None for resfused.get_backend().

    Returns:
        (y, mean, invstd): y (N, C_out, Ho, Wo) in x's dtype and memory format; mean and invstd (C_out,) in
        the statistics dtype when ``stats``, else empty.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor (N, C, H, W), got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(f"weight must be a 4-D conv weight, got {getattr(weight, 'shape', type(weight).__name__)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    stride, padding, dilation = _pair("stride", stride, 1), _pair("padding", padding, 0), _pair("dilation", dilation, 1)
    if not isinstance(groups, int) or groups < 1 or x.shape[1] % groups or weight.shape[0] % groups \
            or weight.shape[1] * groups != x.shape[1]:
        raise ValueError(f"weight of shape {tuple(weight.shape)} with groups={groups} does not fit x's "
                         f"{x.shape[1]} channels")
    shape = output_shape(x.shape, weight.shape, stride, padding, dilation)
    if shape[2] < 1 or shape[3] < 1:
        raise ValueError(f"x of spatial size {tuple(x.shape[2:])} is too small for the conv")
    _check_bn("prologue", prologue, x.shape[1], x.device)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if running_mean is not None:
        if not stats:
            raise ValueError("running stats are updated only with stats=True")
        _check_vector("running_mean", running_mean, shape[1], x.device)
        _check_vector("running_var", running_var, shape[1], x.device)
    if stats:
        _bn_op.check_eps(eps, True)
    if stats and shape[0] * shape[2] * shape[3] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got output size {shape}")
    name = resolve(backend, x)
    st = _layout.stats_dtype(x.dtype)
    x = _dense(x)
    if prologue is not None:
        in_vecs = [v.to(st) for v in (prologue.mean, prologue.invstd, prologue.weight, prologue.bias)]
    else:
        in_vecs = [None] * 4
    run_mean, run_var = _stats_vec(running_mean, st), _stats_vec(running_var, st)
    y, mean, invstd = ConvBNFunction.apply(x, _dense(weight), *in_vecs, run_mean, run_var, stride, padding, dilation,
                                           groups, prologue is not None,
                                           bool(prologue.training) if prologue is not None else False, bool(stats),
                                           float(momentum), float(eps), name)
    for given, used in ((running_mean, run_mean), (running_var, run_var)):
        if given is not None and used is not given:
            given.copy_(used)
    return y, mean, invstd


def bn_add_relu_tail(y: Tensor, bn: BNParams, residual: Tensor, residual_bn: Optional[BNParams] = None,
                     backend: Optional[str] = None, recompute_from: Optional[ConvSpec] = None) -> Tensor:
    """``relu(bn(y) + residual)``, or ``relu(bn(y) + residual_bn(residual))`` (a projection shortcut's BN).

    y: (N, C, H, W) pre-BN conv output; residual: y's shape, dtype and device (copied to y's memory format);
    bn/residual_bn: BNParams of y / the residual (batch statistics from conv_bn(stats=True) in training,
    running statistics in eval). recompute_from: the ConvSpec of the conv_bn call that produced y; then y is
    not saved for backward but recomputed there (one more conv forward; y's activation memory saved).
    Returns a tensor like y.
    """
    if not isinstance(y, Tensor) or y.dim() != 4 or y.dtype not in _FLOAT_DTYPES:
        raise ValueError("y must be a 4-D floating-point tensor")
    if not isinstance(residual, Tensor) or residual.shape != y.shape or residual.dtype != y.dtype \
            or residual.device != y.device:
        raise ValueError(f"residual must be a tensor of y's shape {tuple(y.shape)}, dtype and device")
    if bn is None:
        raise ValueError("bn must be given")
    _check_bn("bn", bn, y.shape[1], y.device)
    _check_bn("residual_bn", residual_bn, y.shape[1], y.device)
    name = resolve(backend, y)
    st = _layout.stats_dtype(y.dtype)
    rc_tensors, recompute = [None] * 6, None
    if recompute_from is not None:
        rc_tensors, recompute = _recompute_args(recompute_from, y, st)
    y = _dense(y)
    residual = residual.contiguous(memory_format=_layout.memory_format(_layout.layout_of(y)))
    vecs = [v.to(st) for v in (bn.mean, bn.invstd, bn.weight, bn.bias)]
    if residual_bn is not None:
        rvecs = [v.to(st) for v in (residual_bn.mean, residual_bn.invstd, residual_bn.weight, residual_bn.bias)]
    else:
        rvecs = [None] * 4
    return ConvBNTailFunction.apply(y, *vecs, residual, *rvecs, residual_bn is not None, bool(bn.training),
                                    bool(residual_bn.training) if residual_bn is not None else False, name,
                                    *rc_tensors, recompute)


def _recompute_args(spec: ConvSpec, y: Tensor, st: torch.dtype):
    """(the six tensors, the conf tuple) ConvBNTailFunction recomputes y with; checks spec describes y."""
    if not isinstance(spec, ConvSpec):
        raise TypeError(f"recompute_from must be a resfused.ops.conv_bn.ConvSpec or None, got {type(spec).__name__}")
    x, weight = _dense(spec.x), _dense(spec.weight)
    stride, padding = _pair("stride", spec.stride, 1), _pair("padding", spec.padding, 0)
    dilation = _pair("dilation", spec.dilation, 1)
    if x.dim() != 4 or weight.dim() != 4 or x.dtype != y.dtype or weight.dtype != y.dtype \
            or output_shape(x.shape, weight.shape, stride, padding, dilation) != tuple(y.shape):
        raise ValueError("recompute_from does not describe the conv that produced y (shapes or dtypes differ)")
    _check_bn("recompute_from.prologue", spec.prologue, x.shape[1], x.device)
    if spec.prologue is not None:
        vecs = [v.to(st) for v in (spec.prologue.mean, spec.prologue.invstd, spec.prologue.weight,
                                   spec.prologue.bias)]
    else:
        vecs = [None] * 4
    conf = (stride, padding, dilation, int(spec.groups), spec.prologue is not None, bool(spec.stats))
    return [x, weight, *vecs], conf
