"""Modules: fused BatchNorm and drop-in ResNet blocks (torchvision's and timm's)."""

from .batchnorm import BatchNormAddReLU2d
from .blocks import BasicBlock, Bottleneck
from .conv_bn_blocks import ConvBNBasicBlock, ConvBNBottleneck
from .timm_blocks import TimmBasicBlock, TimmBottleneck

__all__ = ["BatchNormAddReLU2d", "BasicBlock", "Bottleneck", "ConvBNBasicBlock", "ConvBNBottleneck", "TimmBasicBlock",
           "TimmBottleneck"]
