"""Fused BatchNorm + residual add + ReLU with batch statistics synchronised across a process group.

The distributed counterpart of resfused.ops.bn_add_relu, used by BatchNormAddReLU2d in training when it
has a process group (as nn.SyncBatchNorm). The fused apply and the backward reductions run through the
existing custom ops, so they stay fused on every backend; only the statistics exchange is new:

Forward:
  1. per-channel local partials (count, mean, M2) in one pass over x (torch.var_mean);
  2. ONE collective: all_gather of the packed (2C + 1) partials of every rank (gloo and NCCL alike);
  3. a deterministic merge in rank order, centred (no E[x^2] - E[x]^2):
       mean = sum_r n_r mean_r / N,   M2 = sum_r M2_r + sum_r n_r (mean_r - mean)^2;
  4. running stats updated with the global unbiased variance M2 / (N - 1);
  5. y = relu(bn(x) + residual) by ``bn_add_relu_forward_eval`` given the global mean and biased
     variance in place of the running stats, saving the packed ReLU mask.
Backward:
  1. ``bn_add_relu_backward`` with training=False gives the local sums of g and g*xhat (as grad_bias and
     grad_weight) and the ReLU-masked g (as grad_residual);
  2. ONE all_reduce of the two (C,) sums;
  3. dx = w*invstd*(g - sum(g)/N - xhat*sum(g*xhat)/N) with N the global count.
With a per-sample scale s (sample_scale, drop-path) the apply is relu(s[n] * bn(x) + residual): the ops
take s, their sums are those of the BN branch's gradient s[n]*g, and step 3 uses s[n]*g for g.
weight/bias gradients are the local sums, as nn.SyncBatchNorm: DistributedDataParallel averages them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .. import _layout
from . import bn_add_relu as _op

Tensor = torch.Tensor

#: ``process_group`` value meaning "the default (WORLD) group, looked up at each call", as
#: nn.SyncBatchNorm's process_group=None.
WORLD = "world"


def check_process_group(process_group) -> None:
    """Raise TypeError unless ``process_group`` is None, WORLD ("world") or a torch.distributed.ProcessGroup."""
    if process_group is None or (isinstance(process_group, str) and process_group == WORLD):
        return
    if dist.is_available() and isinstance(process_group, dist.ProcessGroup):
        return
    raise TypeError(f"process_group must be None, {WORLD!r} or a torch.distributed.ProcessGroup, "
                    f"got {type(process_group).__name__}: {process_group!r}")


def resolve_group(process_group) -> Optional[tuple[object, int]]:
    """(group, world_size) when a call must synchronise over ``process_group``, else None.

    As nn.SyncBatchNorm: no synchronisation unless torch.distributed is initialised and the group has
    more than one rank. WORLD means torch.distributed.group.WORLD at call time.
    """
    if process_group is None or not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if isinstance(process_group, str) else process_group
    world_size = dist.get_world_size(group)
    if world_size <= 1:
        return None
    return group, world_size


def _bcast(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def _local_partials(x: Tensor, stats_dtype: torch.dtype) -> Tensor:
    """Packed (2C + 1,) tensor [count, mean (C), M2 (C)] of this rank's batch, in the statistics dtype."""
    c = x.shape[1]
    count = x.numel() // c if c else 0
    packed = torch.zeros(2 * c + 1, dtype=stats_dtype, device=x.device)
    if count == 0:
        return packed  # an empty rank still joins the collective; its zero count drops it from the merge
    # fp16/bf16 inputs are upcast first (one extra pass) so the statistics accumulate in fp32.
    var, mean = torch.var_mean(x.to(stats_dtype), dim=(0, 2, 3), correction=0)
    packed[0] = count
    packed[1:c + 1] = mean
    packed[c + 1:] = var * count
    return packed


def _all_gather(packed: Tensor, group, world_size: int) -> Tensor:
    """(world_size, K) partials of every rank, rows in rank order; one collective."""
    out = packed.new_empty(world_size * packed.numel())
    # all_gather_single is the newer name; all_gather_into_tensor the one older torch (2.11) has.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, packed, group=group)
    return out.view(world_size, packed.numel())


def _merge(gathered: Tensor, c: int) -> tuple[Tensor, Tensor, Tensor]:
    """Global (count, mean, M2) from per-rank partials; fixed-order reductions over ranks (deterministic)."""
    counts = gathered[:, :1]                          # (W, 1)
    means, m2s = gathered[:, 1:c + 1], gathered[:, c + 1:]
    total = counts.sum(dim=0)                          # (1,)
    weights = counts / total.clamp_min(1)
    mean = (weights * means).sum(dim=0)
    m2 = m2s.sum(dim=0) + (counts * (means - mean).square()).sum(dim=0)
    return total, mean, m2


class SyncBatchNormAddReLUFunction(torch.autograd.Function):
    """y = relu(bn(x) + residual) with batch statistics over every rank of ``group`` (training only).

    Arguments as resfused.ops.bn_add_relu.BatchNormAddReLUFunction (validated, normalised, stats dtype),
    plus the process group and its size. Saves x, the packed mask, fp32 mean/invstd and the global count.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, running_mean, running_var, momentum, eps, relu, needs_grad,
                backend, group, world_size, sample_scale):
        c = x.shape[1]
        stats_dtype = _layout.stats_dtype(x.dtype)
        count, mean, m2 = _merge(_all_gather(_local_partials(x, stats_dtype), group, world_size), c)
        var = m2 / count.clamp_min(1)
        if running_mean is not None:
            # When every rank's batch is empty there are no statistics: the running stats stay as they are
            # (as in torch and the single-process op), decided on the device (no host sync).
            has_stats = count > 0
            running_mean.copy_(torch.where(has_stats, running_mean * (1 - momentum) + mean * momentum, running_mean))
            running_var.copy_(torch.where(has_stats, running_var * (1 - momentum)
                                          + m2 / (count - 1).clamp_min(1) * momentum, running_var))
        if x.numel() == 0:
            y, mask = torch.empty_like(x), _layout.empty_mask(x.device)
        else:
            # The eval op applies (x - mean) * w * rsqrt(var + eps) + b with the mean/var it is given:
            # exactly the training apply, with the group's statistics.
            y, mask = torch.ops.resfused.bn_add_relu_forward_eval(x, residual, weight, bias, mean, var, eps, relu,
                                                                 needs_grad, sample_scale, backend)
        if needs_grad:
            ctx.save_for_backward(x, mask, mean, torch.rsqrt(var + eps), weight, count, sample_scale)
        ctx.relu, ctx.backend, ctx.group = relu, backend, group
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, mask, mean, invstd, weight, count, sample_scale = ctx.saved_tensors
        need_x, need_res, need_w, need_b = ctx.needs_input_grad[:4]
        c = x.shape[1]
        grad_y = grad_y.contiguous(memory_format=_layout.memory_format(_layout.layout_of(x)))
        need_g = need_x or need_res
        if x.numel() == 0:
            g = grad_y
            sum_g = sum_gxhat = mean.new_zeros(c)
        else:
            _, grad_masked, sum_gxhat, sum_g = torch.ops.resfused.bn_add_relu_backward(
                grad_y, x, mask, mean, invstd, weight, ctx.relu, False, False, ctx.relu and need_g,
                need_x or need_w or need_b, sample_scale, ctx.backend)
            g = grad_masked if ctx.relu else grad_y
        grad_x = None
        if need_x:
            sums = torch.cat([sum_g, sum_gxhat])
            # Every rank reaches this all_reduce (needs_input_grad is the same on all of them), empty ones too.
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
            global_sum_g, global_sum_gxhat = sums[:c], sums[c:]
            # Elementwise tail in torch ops for now (two extra passes over x and g); a backend kernel taking
            # the global sums would fuse it as bn_add_relu_backward does for the single-process case.
            k = invstd if weight is None else weight * invstd
            xhat = (x.to(mean.dtype) - _bcast(mean)) * _bcast(invstd)
            g_bn = g.to(mean.dtype) if sample_scale is None else g.to(mean.dtype) * sample_scale.view(-1, 1, 1, 1)
            dx = _bcast(k) * (g_bn - _bcast(global_sum_g / count) - xhat * _bcast(global_sum_gxhat / count))
            grad_x = torch.empty_like(x).copy_(dx)
        return (grad_x, g if need_res else None,
                sum_gxhat if need_w else None, sum_g if need_b else None,
                None, None, None, None, None, None, None, None, None, None)


def run_validated(input, residual, running_mean, running_var, weight, bias, momentum, eps, relu, backend, group,
                  world_size, sample_scale=None):
    """Synchronised training forward after bn_add_relu.validate_args(training=True), with a resolved backend
    and a group from resolve_group. Layout and dtype handling as bn_add_relu.run_validated."""
    input, residual, weight, bias, run_mean, run_var, needs_grad, sample_scale = _op.normalise_args(
        input, residual, running_mean, running_var, weight, bias, sample_scale)
    y = SyncBatchNormAddReLUFunction.apply(input, residual, weight, bias, run_mean, run_var, float(momentum),
                                           float(eps), bool(relu), needs_grad, backend, group, world_size,
                                           sample_scale)
    _op.write_back_running_stats(running_mean, running_var, run_mean, run_var)
    return y
