"""BatchNormAddReLU2d: nn.BatchNorm2d whose forward also adds a residual and applies a ReLU, fused."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import _backend
from ..ops import bn_add_relu as _op


class BatchNormAddReLU2d(nn.BatchNorm2d):
    """``relu(BatchNorm2d(input) + residual)`` in one fused kernel.

    Same parameters, buffers, state_dict keys and running-stats semantics as ``nn.BatchNorm2d``
    (momentum=None is the cumulative average over ``num_batches_tracked``).

    Args:
        relu: apply the ReLU (False gives ``bn(input) + residual``).
        backend: None (resfused.get_backend()), "auto", "cuda", "triton" or "reference".

    Shape: input (N, C, H, W), contiguous or channels_last, float16/bfloat16/float32; residual None or
    the same shape, dtype and device; output like input.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, relu: bool = True, device=None, dtype=None,
                 backend: Optional[str] = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.relu = relu
        self.backend = None if backend is None else _backend._check_name(backend)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, relu: bool = True, backend: Optional[str] = None):
        """A BatchNormAddReLU2d sharing ``bn``'s parameters and buffers (same tensor objects)."""
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
        new.train(bn.training)
        return new

    def to_batchnorm(self) -> nn.BatchNorm2d:
        """A plain nn.BatchNorm2d sharing this module's parameters and buffers."""
        bn = nn.BatchNorm2d.__new__(nn.BatchNorm2d)
        nn.Module.__init__(bn)
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
        return s if self.backend is None else s + f", backend={self.backend!r}"

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_input_dim(input)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        # Validate and resolve the backend before touching num_batches_tracked: bad input changes no state.
        _op.validate_args(input, residual, running_mean, running_var, self.weight, self.bias, bn_training,
                          0.0, self.eps)
        backend = _backend.resolve(self.backend, input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return _op.run_validated(input, residual, running_mean, running_var, self.weight, self.bias, bn_training,
                                 factor, self.eps, self.relu, backend)
