"""Modules: fused BatchNorm and drop-in ResNet blocks (torchvision's and timm's)."""

from .batchnorm import BatchNormAddReLU2d
from .blocks import BasicBlock, Bottleneck
from .timm_blocks import TimmBasicBlock, TimmBottleneck

__all__ = ["BatchNormAddReLU2d", "BasicBlock", "Bottleneck", "TimmBasicBlock", "TimmBottleneck"]
