"""ResNet blocks whose BatchNorms are fused into the convolutions (resfused.convert(fuse_convs=True)).

``ConvBNBasicBlock`` and ``ConvBNBottleneck`` hold torchvision's own submodules (conv1, bn1, ..., relu,
downsample: plain nn.Conv2d / nn.BatchNorm2d, same state_dict keys) and run them through the fused ops of
resfused.ops.conv_bn:

  Bottleneck:  y1, s1 = conv1(x)                      + stats epilogue (bn1's batch statistics)
               y2, s2 = conv2(relu(bn1(y1)))          prologue bn1 + ReLU, stats epilogue for bn2
               y3, s3 = conv3(relu(bn2(y2)))          prologue bn2 + ReLU, stats epilogue for bn3
               [yd, sd = downsample conv(x)           stats epilogue for the downsample BN]
               out = relu(bn3(y3) + (bn_d(yd) or x))  the tail (both BNs applied in one op)
  BasicBlock:  the same with two 3x3 convs.

With ``recompute`` (resfused.convert(..., recompute=True)) the tail does not save the last conv's output (y3,
y2 in a BasicBlock) for backward: it recomputes it there with the same conv from that conv's saved input,
trading one more conv forward per block for an activation of the block's output size.

Each BN's mode follows its own ``training`` flag, as nn.BatchNorm2d: training BNs use batch statistics and
update running_mean/running_var/num_batches_tracked exactly as nn.BatchNorm2d (momentum, or the cumulative
average when momentum is None; unbiased running variance); BNs in eval mode apply their running statistics
in the consuming op's prologue (or the tail) and the producing conv skips its statistics epilogue.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import _backend
from ..ops import bn_add_relu as _bn_op
from ..ops import conv_bn as _op


def _producer_args(bn: nn.BatchNorm2d):
    """(stats, running_mean, running_var, momentum, bump) for the conv whose output ``bn`` normalizes.

    ``bump``: the caller adds 1 to num_batches_tracked after the op succeeded (nn.BatchNorm2d.forward bumps
    it too; bumping only after the op validated its input keeps a bad call from changing any state).
    """
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    if not batch_stats:
        return False, None, None, 0.0, False
    factor = 0.0 if bn.momentum is None else bn.momentum
    bump = bn.training and bn.track_running_stats and bn.num_batches_tracked is not None
    if bump:
        factor = 1.0 / float(bn.num_batches_tracked + 1) if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats:
        return True, bn.running_mean, bn.running_var, factor, bump
    return True, None, None, factor, bump


def _consumer_params(bn: nn.BatchNorm2d, mean: torch.Tensor, invstd: torch.Tensor) -> _op.BNParams:
    """The BNParams the consuming op applies: batch statistics when the producer computed them, else running."""
    c = bn.num_features
    ref = mean if mean.numel() else bn.running_mean
    weight = bn.weight if bn.weight is not None else torch.ones(c, dtype=ref.dtype, device=ref.device)
    bias = bn.bias if bn.bias is not None else torch.zeros(c, dtype=ref.dtype, device=ref.device)
    if mean.numel():
        return _op.BNParams(mean, invstd, weight, bias, True)
    return _op.BNParams(bn.running_mean, torch.rsqrt(bn.running_var + bn.eps), weight, bias, False)


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype for x's device when autocast is on there (and x is floating point), else None."""
    device_type = x.device.type
    if not x.is_floating_point() or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def fusable_downsample(ds: Optional[nn.Module]) -> bool:
    """True for torchvision's projection shortcut, nn.Sequential(nn.Conv2d (no bias, zero padding), nn.BatchNorm2d)."""
    return (type(ds) is nn.Sequential and len(ds) == 2 and type(ds[0]) is nn.Conv2d and ds[0].bias is None
            and ds[0].padding_mode == "zeros" and isinstance(ds[0].padding, tuple)
            and type(ds[1]) is nn.BatchNorm2d)


def to_kernel_layout(x: torch.Tensor, backend: Optional[str]) -> torch.Tensor:
    """x as the fused conv kernels read it: channels_last on every backend but the reference.

    NCHW input would take the Triton kernels' gather paths (bf16: 16-bit loads where channels_last loads 128-bit
    vectors, the `_conv_bn_*` rows of bench/results/static/sm90.json) and, in fp32, the cuda backend's unfused
    path (cuDNN has no fused NCHW engine). A block's output keeps its input's layout, so a model's first fused block takes the one
    copy (its backward the one copy back) and the rest of the network stays channels_last; the reference keeps
    x's layout (it is the oracle, and on a CPU what a CPU user runs)."""
    if x.is_contiguous(memory_format=torch.channels_last) or _op.resolve(backend, x) == "reference":
        return x
    return x.contiguous(memory_format=torch.channels_last)


class _ConvBNBlock(nn.Module):
    _convs: tuple = ()
    _torchvision_name: str = ""

    recompute: bool = False

    @classmethod
    def from_torchvision(cls, block: nn.Module, backend: Optional[str] = None, recompute: bool = False):
        """Wrap a torchvision block's submodules (shared, same order and state_dict keys) in a fused block."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, child in block.named_children():
            setattr(new, name, child)
        if block.downsample is None:
            new.downsample = None
        new.stride = block.stride
        new.backend = None if backend is None else _backend._check_name(backend)
        new.recompute = bool(recompute)
        new.training = block.training
        return new

    def to_torchvision(self) -> nn.Module:
        """The torchvision block with the same submodules (parameters and buffers shared)."""
        from torchvision.models import resnet

        cls = getattr(resnet, self._torchvision_name)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, child in self.named_children():
            setattr(new, name, child)
        if self.downsample is None:
            new.downsample = None
        if not hasattr(new, "relu"):
            new.relu = nn.ReLU(inplace=True)
        new.stride = self.stride
        new.training = self.training
        return new

    def extra_repr(self) -> str:
        return ("fused conv + BN" + ("" if self.backend is None else f", backend={self.backend!r}")
                + (", recompute" if self.recompute else ""))

    def _conv(self, x, conv: nn.Conv2d, prologue: Optional[_op.BNParams], bn: nn.BatchNorm2d):
        """(y, mean, invstd, spec): the fused conv's outputs and the ConvSpec that recomputes y."""
        stats, running_mean, running_var, momentum, bump = _producer_args(bn)
        weight = conv.weight
        if weight.dtype != x.dtype and _autocast_dtype(x) == x.dtype:
            weight = weight.to(x.dtype)  # as autocast casts a stock conv's weight; the fp32 master gets the grad
        y, mean, invstd = _op.conv_bn(x, weight, conv.stride, conv.padding, conv.dilation, conv.groups,
                                      prologue=prologue, stats=stats, running_mean=running_mean,
                                      running_var=running_var, momentum=momentum, eps=bn.eps, backend=self.backend)
        if bump:
            bn.num_batches_tracked.add_(1)
        spec = _op.ConvSpec(x, weight, conv.stride, conv.padding, conv.dilation, conv.groups, prologue, stats)
        return y, mean, invstd, spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Check the block input before the first op updates bn1's running stats: bad input changes no state.
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"input must be a 4-D floating-point tensor (N, C, H, W), got "
                             f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
        if x.shape[1] != self.conv1.in_channels:
            raise ValueError(f"input has {x.shape[1]} channels, the block expects {self.conv1.in_channels}")
        for name, bn in self.named_modules():
            if isinstance(bn, nn.BatchNorm2d):  # each BN's eps as nn.BatchNorm2d would check it, before any update
                batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
                try:
                    _bn_op.check_eps(bn.eps, batch_stats)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
        amp = _autocast_dtype(x)
        if amp is not None:  # the custom ops have no autocast rule: cast as autocast would for the stock convs
            x = x.to(amp)
        x = to_kernel_layout(x, self.backend)
        y, mean, invstd, spec = self._conv(x, self.conv1, None, self.bn1)
        prev_bn = self.bn1
        for i in range(2, len(self._convs) + 1):
            conv, bn = getattr(self, f"conv{i}"), getattr(self, f"bn{i}")
            y, mean, invstd, spec = self._conv(y, conv, _consumer_params(prev_bn, mean, invstd), bn)
            prev_bn = bn
        last = _consumer_params(prev_bn, mean, invstd)
        recompute_from = spec if self.recompute and torch.is_grad_enabled() else None
        if fusable_downsample(self.downsample):
            conv_d, bn_d = self.downsample[0], self.downsample[1]
            yd, mean_d, invstd_d, _ = self._conv(x, conv_d, None, bn_d)
            return _op.bn_add_relu_tail(y, last, yd, _consumer_params(bn_d, mean_d, invstd_d), backend=self.backend,
                                        recompute_from=recompute_from)
        identity = x if self.downsample is None else self.downsample(x)
        return _op.bn_add_relu_tail(y, last, identity, backend=self.backend, recompute_from=recompute_from)


class ConvBNBasicBlock(_ConvBNBlock):
    """torchvision BasicBlock run with BN fused into the convs: conv1 (+ bn1 stats) -> conv2 (bn1 + ReLU
    prologue, bn2 stats) -> relu(bn2 + identity or bn_d(downsample conv)). Same submodules as torchvision."""

    expansion: int = 1
    _convs = ("conv1", "conv2")
    _torchvision_name = "BasicBlock"


class ConvBNBottleneck(_ConvBNBlock):
    """torchvision Bottleneck run with BN fused into the convs (see the module docstring). Same submodules."""

    expansion: int = 4
    _convs = ("conv1", "conv2", "conv3")
    _torchvision_name = "Bottleneck"


_BLOCK_TYPES = {"BasicBlock": ConvBNBasicBlock, "Bottleneck": ConvBNBottleneck}
_logged: set = set()


def why_not_fused(block: nn.Module) -> Optional[str]:
    """torchvision BasicBlock/Bottleneck: why its convs cannot run the fused conv + BN path, or None."""
    for name, child in block.named_children():
        if name.startswith("bn") and type(child) is not nn.BatchNorm2d:
            return f"{name} is {type(child).__name__} (the fused conv path takes plain BatchNorm2d)"
        if name.startswith("conv") and (type(child) is not nn.Conv2d or child.bias is not None
                                        or child.padding_mode != "zeros" or not isinstance(child.padding, tuple)):
            return f"{name} is not a bias-free zero-padded nn.Conv2d"
    return None


def from_torchvision_or(block: nn.Module, unfused, backend: Optional[str] = None,
                        recompute: bool = False) -> nn.Module:
    """ConvBNBasicBlock/ConvBNBottleneck for a torchvision block, else ``unfused(block)`` (the converted block
    without conv fusion), with one log line per reason."""
    why = why_not_fused(block)
    if why is None:
        return _BLOCK_TYPES[type(block).__name__].from_torchvision(block, backend=backend, recompute=recompute)
    msg = f"resfused.convert(fuse_convs=True): {type(block).__name__} runs without conv fusion: {why}"
    if msg not in _logged:
        _logged.add(msg)
        _backend.logger.info(msg)
    return unfused(block)
