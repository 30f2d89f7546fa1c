"""BatchNormAddReLU2d: nn.BatchNorm2d whose forward also adds a residual and applies a ReLU, fused."""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn

from .. import _backend
from ..ops import bn_add_relu as _op
from ..ops import sync_bn_add_relu as _sync_op


# nn.BatchNorm2d's constructor differs between torch releases (``bias: bool``, keyword-only, since torch 2.14):
# BatchNormAddReLU2d takes exactly the installed torch's, detected rather than assumed.
STOCK_HAS_BIAS = "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters
_UNSET = object()


class BatchNormAddReLU2d(nn.BatchNorm2d):
    """``relu(BatchNorm2d(input) + residual)`` in one fused kernel.

    Same parameters, buffers, state_dict keys and running-stats semantics as ``nn.BatchNorm2d``
    (momentum=None is the cumulative average over ``num_batches_tracked``).

    Args:
        relu: apply the ReLU (False gives ``bn(input) + residual``).
        backend: None (resfused.get_backend()), "auto", "cuda", "triton" or "reference".
        process_group: None (never synchronised), a torch.distributed.ProcessGroup, or "world" (the
            default group at each call, as nn.SyncBatchNorm's process_group=None). When set, training
            forwards synchronise batch statistics across the group's ranks, as nn.SyncBatchNorm: only
            while torch.distributed is initialised and the group has more than one rank; eval
            forwards never do. Each rank's input needs more than one value per channel, or none.
            See resfused.ops.sync_bn_add_relu.

    Shape: input (N, C, H, W), contiguous or channels_last, float16/bfloat16/float32; residual None or
    the same shape, dtype and device; output like input. ``forward(input, residual, sample_scale=s)``
    computes ``relu(s[n] * bn(input) + residual)`` (s: (N,) float32, not differentiable; timm's
    drop-path, see resfused.nn.TimmBasicBlock), with the batch statistics of ``input``.
    """

    # Class default: modules pickled before process_group existed load as unsynchronised.
    process_group = None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = _UNSET,
                 relu: bool = True, backend: Optional[str] = None, process_group=None):
        # nn.BatchNorm2d's own signature first (positional and keyword, in its order), then ours, keyword-only.
        _sync_op.check_process_group(process_group)
        stock_kw = {}
        if bias is not _UNSET:
            if not STOCK_HAS_BIAS:
                raise TypeError("BatchNormAddReLU2d.__init__() got an unexpected keyword argument 'bias' (this "
                                f"torch {torch.__version__}'s nn.BatchNorm2d has no bias argument)")
            stock_kw["bias"] = bias
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **stock_kw)
        self.relu = relu
        self.backend = None if backend is None else _backend._check_name(backend)
        self.process_group = process_group

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, relu: bool = True, backend: Optional[str] = None):
        """A BatchNormAddReLU2d sharing ``bn``'s parameters and buffers (same tensor objects).

        ``bn`` may be an nn.SyncBatchNorm: the new module synchronises over the same group ("world"
        where bn.process_group is None).
        """
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            setattr(new, attr, getattr(bn, attr))
        for name in ("weight", "bias"):
            new.register_parameter(name, getattr(bn, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            new.register_buffer(name, getattr(bn, name))
        new.relu = relu
        new.backend = None if backend is None else _backend._check_name(backend)
        if isinstance(bn, nn.SyncBatchNorm):
            new.process_group = _sync_op.WORLD if bn.process_group is None else bn.process_group
        new.train(bn.training)
        return new

    def to_batchnorm(self) -> nn.BatchNorm2d:
        """A plain nn.BatchNorm2d sharing this module's parameters and buffers; an nn.SyncBatchNorm over the
        same group when this module has a process_group."""
        cls = nn.BatchNorm2d if self.process_group is None else nn.SyncBatchNorm
        bn = cls.__new__(cls)
        nn.Module.__init__(bn)
        if self.process_group is not None:
            bn.process_group = None if isinstance(self.process_group, str) else self.process_group
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            setattr(bn, attr, getattr(self, attr))
        for name in ("weight", "bias"):
            bn.register_parameter(name, getattr(self, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            bn.register_buffer(name, getattr(self, name))
        bn.train(self.training)
        return bn

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", relu={self.relu}"
        if self.process_group is not None:
            s += f", process_group={self.process_group!r}"
        return s if self.backend is None else s + f", backend={self.backend!r}"

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None,
                sample_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.process_group is not None and self.training:
            resolved = _sync_op.resolve_group(self.process_group)
            if resolved is not None:
                return self._forward_synchronized(input, residual, *resolved, sample_scale=sample_scale)
        self._check_input_dim(input)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        # Validate and resolve the backend before touching num_batches_tracked: bad input changes no state.
        _op.validate_args(input, residual, running_mean, running_var, self.weight, self.bias, bn_training,
                          0.0, self.eps, sample_scale)
        backend = _backend.resolve(self.backend, input, sample_scale=sample_scale is not None)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return _op.run_validated(input, residual, running_mean, running_var, self.weight, self.bias, bn_training,
                                 factor, self.eps, self.relu, backend, sample_scale)

    def _forward_synchronized(self, input, residual, group, world_size, sample_scale=None):
        """Training forward with batch statistics over ``group`` (resfused.ops.sync_bn_add_relu)."""
        self._check_input_dim(input)
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        # Validate (on this rank, before any collective) and resolve the backend before touching
        # num_batches_tracked: bad input changes no state.
        _op.validate_args(input, residual, running_mean, running_var, self.weight, self.bias, True, 0.0, self.eps,
                          sample_scale)
        # The synchronised op composes the custom ops: no "native" CPU path (resolve(native=False)).
        backend = _backend.resolve(self.backend, input, sample_scale=sample_scale is not None, native=False)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return _sync_op.run_validated(input, residual, running_mean, running_var, self.weight, self.bias, factor,
                                      self.eps, self.relu, backend, group, world_size, sample_scale)
