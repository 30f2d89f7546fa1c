"""Drop-in ResNet blocks: torchvision's BasicBlock and Bottleneck with fused BN + (add +) ReLU.

Submodule names and state_dict keys are torchvision's (conv1, bn1, ..., downsample); the bn modules
are BatchNormAddReLU2d, which carry the ReLU (there is no separate ``relu`` submodule) and, for the
last bn of the block, the residual add.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .batchnorm import BatchNormAddReLU2d


def _conv3x3(in_planes, out_planes, stride=1, groups=1, dilation=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def _conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _check_norm_layer(norm_layer):
    if norm_layer is not None and norm_layer is not nn.BatchNorm2d:
        raise ValueError(f"norm_layer must be None or nn.BatchNorm2d (resfused fuses BatchNorm2d), got {norm_layer!r}")


def _blank(cls, block):
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.stride = block.stride
    new.training = block.training
    return new


class BasicBlock(nn.Module):
    """torchvision BasicBlock: conv3x3 -> bn+relu -> conv3x3 -> bn+add+relu (fused bn ops)."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, norm_layer=None,
                 backend: Optional[str] = None):
        super().__init__()
        _check_norm_layer(norm_layer)
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = BatchNormAddReLU2d(planes, backend=backend)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = BatchNormAddReLU2d(planes, backend=backend)
        self.downsample = downsample
        self.stride = stride

    @classmethod
    def from_torchvision(cls, block: nn.Module, backend: Optional[str] = None) -> "BasicBlock":
        """Convert a torchvision BasicBlock, sharing its parameters and buffers."""
        new = _blank(cls, block)
        new.conv1 = block.conv1
        new.bn1 = BatchNormAddReLU2d.from_batchnorm(block.bn1, relu=True, backend=backend)
        new.conv2 = block.conv2
        new.bn2 = BatchNormAddReLU2d.from_batchnorm(block.bn2, relu=True, backend=backend)
        new.downsample = block.downsample
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x))
        return self.bn2(self.conv2(out), identity)


class Bottleneck(nn.Module):
    """torchvision Bottleneck: 1x1 -> bn+relu -> 3x3 -> bn+relu -> 1x1 -> bn+add+relu (fused bn ops)."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, norm_layer=None,
                 backend: Optional[str] = None):
        super().__init__()
        _check_norm_layer(norm_layer)
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = BatchNormAddReLU2d(width, backend=backend)
        self.conv2 = _conv3x3(width, width, stride, groups, dilation)
        self.bn2 = BatchNormAddReLU2d(width, backend=backend)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = BatchNormAddReLU2d(planes * self.expansion, backend=backend)
        self.downsample = downsample
        self.stride = stride

    @classmethod
    def from_torchvision(cls, block: nn.Module, backend: Optional[str] = None) -> "Bottleneck":
        """Convert a torchvision Bottleneck, sharing its parameters and buffers."""
        new = _blank(cls, block)
        for i in (1, 2, 3):
            setattr(new, f"conv{i}", getattr(block, f"conv{i}"))
            setattr(new, f"bn{i}", BatchNormAddReLU2d.from_batchnorm(getattr(block, f"bn{i}"), relu=True,
                                                                    backend=backend))
        new.downsample = block.downsample
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        return self.bn3(self.conv3(out), identity)
