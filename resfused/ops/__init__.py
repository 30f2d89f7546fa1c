"""Custom ops (torch.ops.resfused.*) and the autograd Functions that compose them."""

from .bn_add_relu import BatchNormAddReLUFunction, batch_norm_add_relu

__all__ = ["BatchNormAddReLUFunction", "batch_norm_add_relu"]
