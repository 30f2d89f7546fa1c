"""Drop-ins for timm's ResNet blocks with fused BN + (add +) ReLU, and timm pre-activation norms.

``TimmBasicBlock`` / ``TimmBottleneck`` replace ``timm.models.resnet.BasicBlock`` / ``Bottleneck`` in
their plain configuration (ReLU, BatchNorm2d or SyncBatchNorm norms, no attention, no anti-aliasing,
no active drop-block or drop-path). Submodule names and state_dict keys are timm's (conv1, bn1, ...,
downsample); the bn modules are BatchNormAddReLU2d and carry the ReLU, so there are no act*, aa,
drop_block, se or drop_path submodules (timm's are identities or None in that configuration).

timm's pre-activation ResNetV2 blocks keep their type: resfused.convert swaps their BatchNormAct2d
(ReLU) norms for BatchNormAddReLU2d (same state_dict keys), see ``fuse_norm_act`` / ``unfuse_norm_act``.

This module never imports timm at import time: only ``to_timm`` and ``unfuse_norm_act`` do.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .batchnorm import BatchNormAddReLU2d


def _check_plain(act_layer, norm_layer, attn_layer, aa_layer, drop_block, drop_path):
    if act_layer not in (None, nn.ReLU):
        raise ValueError(f"act_layer must be nn.ReLU (resfused fuses BN + ReLU), got {act_layer!r}")
    if norm_layer not in (None, nn.BatchNorm2d):
        raise ValueError(f"norm_layer must be nn.BatchNorm2d (resfused fuses BatchNorm2d), got {norm_layer!r}")
    for name, value in (("attn_layer", attn_layer), ("aa_layer", aa_layer), ("drop_block", drop_block),
                        ("drop_path", drop_path)):
        if value is not None:
            raise ValueError(f"{name} must be None in a fused block (use timm's block for it), got {value!r}")


def _blank(cls, block):
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.training = block.training
    return new


def _timm_blank(timm_cls, block):
    new = timm_cls.__new__(timm_cls)
    nn.Module.__init__(new)
    new.training = block.training
    return new


class TimmBasicBlock(nn.Module):
    """timm.models.resnet.BasicBlock: conv3x3 -> bn+relu -> conv3x3 -> bn+add+relu (fused bn ops).

    Constructor arguments as timm's; only the plain configuration is accepted (ValueError otherwise).
    """

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 cardinality: int = 1, base_width: int = 64, reduce_first: int = 1, dilation: int = 1,
                 first_dilation: Optional[int] = None, act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d,
                 attn_layer=None, aa_layer=None, drop_block=None, drop_path=None, device=None, dtype=None,
                 backend: Optional[str] = None):
        super().__init__()
        _check_plain(act_layer, norm_layer, attn_layer, aa_layer, drop_block, drop_path)
        if cardinality != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports cardinality=1 and base_width=64")
        dd = dict(device=device, dtype=dtype)
        first_planes = planes // reduce_first
        outplanes = planes * self.expansion
        first_dilation = first_dilation or dilation
        self.conv1 = nn.Conv2d(inplanes, first_planes, kernel_size=3, stride=stride, padding=first_dilation,
                               dilation=first_dilation, bias=False, **dd)
        self.bn1 = BatchNormAddReLU2d(first_planes, backend=backend, **dd)
        self.conv2 = nn.Conv2d(first_planes, outplanes, kernel_size=3, padding=dilation, dilation=dilation,
                               bias=False, **dd)
        self.bn2 = BatchNormAddReLU2d(outplanes, backend=backend, **dd)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation

    @classmethod
    def from_timm(cls, block: nn.Module, backend: Optional[str] = None) -> "TimmBasicBlock":
        """Convert a plain timm BasicBlock (see resfused.convert), sharing its parameters and buffers."""
        new = _blank(cls, block)
        new.conv1 = block.conv1
        new.bn1 = BatchNormAddReLU2d.from_batchnorm(block.bn1, relu=True, backend=backend)
        new.conv2 = block.conv2
        new.bn2 = BatchNormAddReLU2d.from_batchnorm(block.bn2, relu=True, backend=backend)
        new.downsample = block.downsample
        new.stride, new.dilation = block.stride, block.dilation
        return new

    def to_timm(self) -> nn.Module:
        """A timm BasicBlock sharing this block's parameters and buffers."""
        from timm.models.resnet import BasicBlock

        new = _timm_blank(BasicBlock, self)
        new.conv1, new.bn1 = self.conv1, self.bn1.to_batchnorm()
        new.drop_block, new.act1, new.aa = nn.Identity(), nn.ReLU(inplace=True), nn.Identity()
        new.conv2, new.bn2 = self.conv2, self.bn2.to_batchnorm()
        new.se = None
        new.act2 = nn.ReLU(inplace=True)
        new.downsample = self.downsample
        new.stride, new.dilation = self.stride, self.dilation
        new.drop_path = None
        return new

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x))
        return self.bn2(self.conv2(out), shortcut)


class TimmBottleneck(nn.Module):
    """timm.models.resnet.Bottleneck: 1x1 -> bn+relu -> 3x3 -> bn+relu -> 1x1 -> bn+add+relu (fused bn ops).

    Constructor arguments as timm's; only the plain configuration is accepted (ValueError otherwise).
    """

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 cardinality: int = 1, base_width: int = 64, reduce_first: int = 1, dilation: int = 1,
                 first_dilation: Optional[int] = None, act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d,
                 attn_layer=None, aa_layer=None, drop_block=None, drop_path=None, device=None, dtype=None,
                 backend: Optional[str] = None):
        super().__init__()
        _check_plain(act_layer, norm_layer, attn_layer, aa_layer, drop_block, drop_path)
        dd = dict(device=device, dtype=dtype)
        width = int(math.floor(planes * (base_width / 64)) * cardinality)
        first_planes = width // reduce_first
        outplanes = planes * self.expansion
        first_dilation = first_dilation or dilation
        self.conv1 = nn.Conv2d(inplanes, first_planes, kernel_size=1, bias=False, **dd)
        self.bn1 = BatchNormAddReLU2d(first_planes, backend=backend, **dd)
        self.conv2 = nn.Conv2d(first_planes, width, kernel_size=3, stride=stride, padding=first_dilation,
                               dilation=first_dilation, groups=cardinality, bias=False, **dd)
        self.bn2 = BatchNormAddReLU2d(width, backend=backend, **dd)
        self.conv3 = nn.Conv2d(width, outplanes, kernel_size=1, bias=False, **dd)
        self.bn3 = BatchNormAddReLU2d(outplanes, backend=backend, **dd)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation

    @classmethod
    def from_timm(cls, block: nn.Module, backend: Optional[str] = None) -> "TimmBottleneck":
        """Convert a plain timm Bottleneck (see resfused.convert), sharing its parameters and buffers."""
        new = _blank(cls, block)
        for i in (1, 2, 3):
            setattr(new, f"conv{i}", getattr(block, f"conv{i}"))
            setattr(new, f"bn{i}", BatchNormAddReLU2d.from_batchnorm(getattr(block, f"bn{i}"), relu=True,
                                                                    backend=backend))
        new.downsample = block.downsample
        new.stride, new.dilation = block.stride, block.dilation
        return new

    def to_timm(self) -> nn.Module:
        """A timm Bottleneck sharing this block's parameters and buffers."""
        from timm.models.resnet import Bottleneck

        new = _timm_blank(Bottleneck, self)
        new.conv1, new.bn1, new.act1 = self.conv1, self.bn1.to_batchnorm(), nn.ReLU(inplace=True)
        new.conv2, new.bn2 = self.conv2, self.bn2.to_batchnorm()
        new.drop_block, new.act2, new.aa = nn.Identity(), nn.ReLU(inplace=True), nn.Identity()
        new.conv3, new.bn3 = self.conv3, self.bn3.to_batchnorm()
        new.se = None
        new.act3 = nn.ReLU(inplace=True)
        new.downsample = self.downsample
        new.stride, new.dilation = self.stride, self.dilation
        new.drop_path = None
        return new

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        return self.bn3(self.conv3(out), shortcut)


# ---------------------------------------------------------------------------------------------------
# pre-activation (ResNetV2) norms
# ---------------------------------------------------------------------------------------------------

def fuse_norm_act(norm: nn.Module, backend: Optional[str] = None) -> BatchNormAddReLU2d:
    """A BatchNormAddReLU2d (relu=True, no residual) sharing a timm BatchNormAct2d/SyncBatchNormAct's
    parameters and buffers; same state_dict keys (timm's act/drop submodules hold none)."""
    return BatchNormAddReLU2d.from_batchnorm(norm, relu=True, backend=backend)


def unfuse_norm_act(fused: BatchNormAddReLU2d) -> nn.Module:
    """A timm BatchNormAct2d (SyncBatchNormAct when ``fused`` has a process group) with a ReLU, sharing
    ``fused``'s parameters and buffers."""
    from timm.layers import BatchNormAct2d, SyncBatchNormAct

    bn = fused.to_batchnorm()  # BatchNorm2d, or SyncBatchNorm over the same group
    cls = SyncBatchNormAct if isinstance(bn, nn.SyncBatchNorm) else BatchNormAct2d
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, value in vars(bn).items():
        if not name.startswith("_"):
            setattr(new, name, value)
    for name in ("weight", "bias"):
        new.register_parameter(name, getattr(bn, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new.register_buffer(name, getattr(bn, name))
    new.drop = nn.Identity()
    new.act = nn.ReLU(inplace=True)
    return new
