"""Modules: fused BatchNorm and drop-in ResNet blocks."""

from .batchnorm import BatchNormAddReLU2d
from .blocks import BasicBlock, Bottleneck

__all__ = ["BatchNormAddReLU2d", "BasicBlock", "Bottleneck"]
