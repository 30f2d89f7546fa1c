"""Functional API: resfused.functional.batch_norm_add_relu."""

from .ops.bn_add_relu import batch_norm_add_relu

__all__ = ["batch_norm_add_relu"]
