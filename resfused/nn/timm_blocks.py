"""Drop-ins for timm's ResNet blocks with fused BN + (add +) ReLU, and timm pre-activation norms.

``TimmBasicBlock`` / ``TimmBottleneck`` replace ``timm.models.resnet.BasicBlock`` / ``Bottleneck`` in
their plain configuration (ReLU, BatchNorm2d or SyncBatchNorm norms, no attention, no anti-aliasing,
no active drop-block), with or without drop-path (stochastic depth). Submodule names and state_dict keys
are timm's (conv1, bn1, ..., downsample); the bn modules are BatchNormAddReLU2d and carry the ReLU, so
there are no act*, aa, drop_block or se submodules (timm's are identities or None in that configuration).
timm's ``drop_path`` module (timm.layers.DropPath, or None) is kept, holding no state: in training the
block draws its per-sample keep mask exactly as timm's drop_path does and passes it to the last fused BN
as ``sample_scale``, so y = relu(s[n] * bn(conv(x)) + shortcut) runs in the fused op.

timm's pre-activation ResNetV2 blocks keep their type: resfused.convert swaps their BatchNormAct2d
(ReLU) norms for BatchNormAddReLU2d (same state_dict keys), see ``fuse_norm_act`` / ``unfuse_norm_act``.

This module never imports timm at import time: only ``to_timm`` and ``unfuse_norm_act`` do.
"""

from __future__ import annotations

import math
import sys
from typing import Optional

import torch
from torch import nn

from .. import _layout
from .batchnorm import BatchNormAddReLU2d


def _is_timm_drop_path(module) -> bool:
    layers = sys.modules.get("timm.layers")  # a timm DropPath exists only once timm is imported
    return layers is not None and type(module) is getattr(layers, "DropPath", None)


def _check_plain(act_layer, norm_layer, attn_layer, aa_layer, drop_block, drop_path):
    if act_layer not in (None, nn.ReLU):
        raise ValueError(f"act_layer must be nn.ReLU (resfused fuses BN + ReLU), got {act_layer!r}")
    if norm_layer not in (None, nn.BatchNorm2d):
        raise ValueError(f"norm_layer must be nn.BatchNorm2d (resfused fuses BatchNorm2d), got {norm_layer!r}")
    for name, value in (("attn_layer", attn_layer), ("aa_layer", aa_layer), ("drop_block", drop_block)):
        if value is not None:
            raise ValueError(f"{name} must be None in a fused block (use timm's block for it), got {value!r}")
    if drop_path is not None and not _is_timm_drop_path(drop_path):
        raise ValueError(f"drop_path must be None or a timm.layers.DropPath in a fused block, got {drop_path!r}")


def drop_path_sample_scale(drop_path: Optional[nn.Module], x: torch.Tensor) -> Optional[torch.Tensor]:
    """timm's drop_path(x) as the per-sample factor the fused op takes (``sample_scale``), or None.

    None when ``drop_path`` is None, has no (or a zero) ``drop_prob`` or is in eval mode (then timm's is
    the identity). Otherwise draws the keep mask exactly as timm.layers.drop_path does, so the same RNG
    state gives the same mask: ``x.new_empty((N, 1, 1, 1)).bernoulli_(keep_prob)``, divided by keep_prob
    (in x's dtype) when ``scale_by_keep`` and keep_prob > 0. ``x`` is the tensor timm would scale (or one
    of its dtype, device and batch size). Returns (N,) in the statistics dtype (float32; float64 for
    float64 x).
    """
    if drop_path is None or not drop_path.training:
        return None
    drop_prob = float(getattr(drop_path, "drop_prob", 0.0))
    if drop_prob == 0.0:
        return None
    keep_prob = 1 - drop_prob
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0 and getattr(drop_path, "scale_by_keep", True):
        keep.div_(keep_prob)
    return keep.view(-1).to(_layout.stats_dtype(x.dtype))


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

    Constructor arguments as timm's; only the plain configuration is accepted (ValueError otherwise);
    ``drop_path`` may be None or a timm DropPath (fused as bn2's per-sample scale, see
    ``drop_path_sample_scale``).
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
        self.drop_path = drop_path
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
        new.drop_path = block.drop_path
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
        new.drop_path = self.drop_path
        return new

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.bn1(self.conv1(x)))
        # Drawn where timm draws it (after the last BN, before the shortcut), so seeds line up with timm.
        sample_scale = drop_path_sample_scale(self.drop_path, out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.bn2(out, shortcut, sample_scale=sample_scale)


class TimmBottleneck(nn.Module):
    """timm.models.resnet.Bottleneck: 1x1 -> bn+relu -> 3x3 -> bn+relu -> 1x1 -> bn+add+relu (fused bn ops).

    Constructor arguments as timm's; only the plain configuration is accepted (ValueError otherwise);
    ``drop_path`` may be None or a timm DropPath (fused as bn3's per-sample scale, see
    ``drop_path_sample_scale``).
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
        self.drop_path = drop_path
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
        new.drop_path = block.drop_path
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
        new.drop_path = self.drop_path
        return new

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x))
        out = self.conv3(self.bn2(self.conv2(out)))
        # Drawn where timm draws it (after the last BN, before the shortcut), so seeds line up with timm.
        sample_scale = drop_path_sample_scale(self.drop_path, out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.bn3(out, shortcut, sample_scale=sample_scale)


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
