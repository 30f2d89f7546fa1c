"""fuse_for_inference: fold every BatchNorm into the convolution before it and run ResNet blocks on fused kernels.

    fused = resfused.fuse_for_inference(torchvision.models.resnet50().eval())
    with torch.inference_mode():
        logits = fused(images)          # NCHW or channels_last; the model's dtype (fp32, fp16 or bf16)

Per torchvision block (the projection shortcut is the block's ``downsample``: 1x1 conv, stride s, + BN):
  BasicBlock:  conv3x3+bias+ReLU -> conv3x3+bias (+ shortcut 1x1 conv, dual GEMM) + residual + ReLU
  Bottleneck:  conv1x1+bias+ReLU -> conv3x3(stride, groups)+bias+ReLU -> conv1x1+bias (+ shortcut) + residual + ReLU
  stem:        conv7x7/2 + bias + ReLU (the max-pool stays stock)
Each arrow is one resfused::conv_bias_act call (resfused/ops/conv_bias_act.py), so a conv's output is written
once and read once by the next conv: no BN pass, no separate add/ReLU pass, and with a projection shortcut
the downsample conv's output never reaches memory on the triton backend (on the cuda backend it is a
separate cuDNN conv feeding the fused conv's residual input).

Folding is done in fp32 (fp64 for fp64 models) and cast to the conv weight's dtype:
    scale = gamma / sqrt(running_var + eps);  W' = W * scale[co];  b' = beta + (b - running_mean) * scale
Anything else that holds a BatchNorm is folded where the structure makes the dataflow certain (a Conv2d
followed by a BatchNorm2d (and a ReLU) inside an nn.Sequential, or a torchvision block whose parts the fused
block cannot take, e.g. a non-zero padding mode): those keep a cuDNN conv with the folded BN as its bias and
their stock elementwise residual/ReLU, and say so once in the log. A BatchNorm that cannot be folded is an
error: the returned model holds no nn.BatchNorm2d.

Backend (``backend``: None = resfused.get_backend() at call time, or "auto"/"cuda"/"triton"/"reference") is
resolved on every call from the input: CUDA tensors run the cuda, then triton backend; CPU float32 tensors
under ``auto`` run oneDNN's fused convolutions ("mkldnn", resfused/_cpu/conv_bias_act.py: torch.ops.mkldnn,
bias + residual add + ReLU as post-ops, weights reordered once when the model is fused and again only if a
weight changes, the downsample's fresh output accumulated into in place); other CPU tensors, and an explicit
"reference", run the reference (the Triton interpreter when asked for explicitly under TRITON_INTERPRET=1).
On every backend but the reference, activations are moved to channels_last at the first fused conv (the
layout the GEMMs read; a torchvision ResNet's stem takes the one copy) and stay channels_last to the pooling.
TF32 for fp32 on a GPU follows torch.backends.cudnn.allow_tf32, like stock convolutions.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

import torch
from torch import nn

from . import _backend
from ._cpu import conv_bias_act as _mkldnn
from .convert import _torchvision_resnet, revert
from .ops import conv_bias_act as _conv_op

logger = logging.getLogger("resfused")

Tensor = torch.Tensor

_INFERENCE_ONLY = ("resfused.fuse_for_inference returned an inference-only model: its BatchNorms are folded into "
                   "the convolutions and the fused kernels have no backward. Call .train() on the original model "
                   "(it is unchanged) and fuse it again after training.")

_logged: set = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        logger.info(msg)


class _InferenceOnly:
    """Mixin: .train(True) raises; .eval() / .train(False) work."""

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(_INFERENCE_ONLY)
        return nn.Module.train(self, False)


# ---------------------------------------------------------------------------------------------------
# folding
# ---------------------------------------------------------------------------------------------------

def _is_batchnorm(m: nn.Module) -> bool:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return True
    return type(m).__name__ == "FrozenBatchNorm2d" and all(
        hasattr(m, a) for a in ("weight", "bias", "running_mean", "running_var", "eps"))


def _why_not_foldable(conv: nn.Module, bn: nn.Module) -> Optional[str]:
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not an nn.Conv2d"
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
        # Exact types: a subclass may do more than normalise (timm's BatchNormAct2d, resfused's
        # BatchNormAddReLU2d apply an activation), and folding it would silently drop that.
        if type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
            return f"{type(bn).__name__} is not an nn.BatchNorm2d or nn.SyncBatchNorm"
        if bn.running_mean is None or bn.running_var is None:
            return "the BatchNorm tracks no running statistics (eval mode would normalise with batch statistics)"
    elif not _is_batchnorm(bn):
        return f"{type(bn).__name__} is not a BatchNorm"
    if bn.running_mean.shape[0] != conv.out_channels:
        return f"the BatchNorm has {bn.running_mean.shape[0]} channels but the conv {conv.out_channels}"
    return None


def _fold(conv: nn.Conv2d, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """Folded (weight, bias) in the folding dtype (fp32, fp64 for fp64 weights), not yet cast."""
    why = _why_not_foldable(conv, bn)
    if why is not None:
        raise ValueError(f"cannot fold {type(bn).__name__} into {type(conv).__name__}: {why}")
    acc = torch.float64 if conv.weight.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        w = conv.weight.detach().to(acc)
        c_out = w.shape[0]
        b = conv.bias.detach().to(acc) if conv.bias is not None else w.new_zeros(c_out)
        mean = bn.running_mean.detach().to(device=w.device, dtype=acc)
        var = bn.running_var.detach().to(device=w.device, dtype=acc)
        gamma = bn.weight.detach().to(acc) if getattr(bn, "weight", None) is not None else w.new_ones(c_out)
        beta = bn.bias.detach().to(acc) if getattr(bn, "bias", None) is not None else w.new_zeros(c_out)
        scale = gamma * torch.rsqrt(var + float(bn.eps))
        return w * scale.view(-1, 1, 1, 1), beta + (b - mean) * scale


def fold_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """(weight, bias) of ``conv`` with the eval-mode ``bn`` after it folded in.

    Computed in fp32 (fp64 for fp64 weights) and cast to conv.weight's dtype:
    scale = gamma * rsqrt(running_var + eps), W' = W * scale per output channel,
    b' = beta + (b - running_mean) * scale. Returns fresh tensors (nothing is shared with the inputs).
    A BN with eps = 0 folds too, a documented exception to following F.batch_norm (which rejects eps = 0 in
    training, and before torch 2.13 in eval): folding needs only running_var + eps > 0.
    """
    weight, bias = _fold(conv, bn)
    return weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)


def _why_not_kernel_conv(conv: nn.Conv2d) -> Optional[str]:
    """None when resfused's fused conv takes ``conv`` (zero padding given as ints), else why not."""
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (the fused kernels pad with zeros)"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (the fused kernels take explicit padding)"
    return None


def _folded_conv2d(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """``conv`` (a private copy) turned into bn(conv(x)) in place, run by cuDNN: the unfused fallback."""
    weight, bias = fold_conv_bn(conv, bn)
    conv.weight = nn.Parameter(weight, requires_grad=False)
    conv.bias = nn.Parameter(bias, requires_grad=False)
    return conv


# ---------------------------------------------------------------------------------------------------
# fused modules
# ---------------------------------------------------------------------------------------------------

def _channels_last_weight(w: Tensor) -> Tensor:
    # OHWI: the triton kernel's K axis (input channels) contiguous, and what cuDNN's NHWC kernels read.
    return w.contiguous(memory_format=torch.channels_last)


class FusedConv2d(_InferenceOnly, nn.Module):
    """Conv2d with a folded BatchNorm: ``relu?(conv(x) [+ shortcut conv(shortcut_x)] + bias [+ residual])``.

    One resfused::conv_bias_act call. ``weight`` (C_out, C_in/groups, KH, KW) and ``bias`` (C_out,) are
    inference-only parameters (requires_grad False) in the model's dtype; ``shortcut_weight`` (C_out, C_sc,
    1, 1) is the folded projection shortcut (its folded bias is already summed into ``bias``).
    """

    def __init__(self, weight: Tensor, bias: Tensor, stride, padding, dilation, groups: int, relu: bool,
                 backend: Optional[str] = None, shortcut_weight: Optional[Tensor] = None, shortcut_stride=(1, 1)):
        super().__init__()
        self.weight = nn.Parameter(_channels_last_weight(weight), requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        if shortcut_weight is not None:
            self.shortcut_weight = nn.Parameter(_channels_last_weight(shortcut_weight), requires_grad=False)
        else:
            self.shortcut_weight = None
        self.stride = tuple(stride)
        self.padding = tuple(padding)
        self.dilation = tuple(dilation)
        self.groups = int(groups)
        self.shortcut_stride = tuple(shortcut_stride)
        self.relu = bool(relu)
        self.backend = backend
        self.training = False
        self._mkldnn_cache = None  # (key, packed weight, packed shortcut weight): see _mkldnn_weights
        if (weight.device.type == "cpu" and weight.dtype == torch.float32
                and (_backend.get_backend() if backend is None else backend) == "auto"
                and _mkldnn.unavailable_reason() is None):
            self._mkldnn_weights()  # reordered once, ahead of the first forward

    def _mkldnn_key(self) -> tuple:
        ws = (self.weight,) if self.shortcut_weight is None else (self.weight, self.shortcut_weight)
        return tuple((w.data_ptr(), w._version, w.device, w.dtype) for w in ws)

    def _mkldnn_weights(self) -> tuple[Tensor, Optional[Tensor]]:
        """The weights reordered for oneDNN (resfused._cpu.conv_bias_act.pack_weight), repacked only when a
        weight was replaced or modified in place since (its data pointer or version changed)."""
        key = self._mkldnn_key()
        if self._mkldnn_cache is None or self._mkldnn_cache[0] != key:
            w = _mkldnn.pack_weight(self.weight, self.padding, self.stride, self.dilation, self.groups)
            sc = None if self.shortcut_weight is None else _mkldnn.pack_weight(
                self.shortcut_weight, (0, 0), self.shortcut_stride, (1, 1), 1)
            self._mkldnn_cache = (key, w, sc)
        return self._mkldnn_cache[1], self._mkldnn_cache[2]

    def __getstate__(self):  # copy.deepcopy / pickle: the opaque oneDNN weights are rebuilt on demand
        state = self.__dict__.copy()
        state["_mkldnn_cache"] = None
        return state

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .float(): the packed weights no longer apply
        self._mkldnn_cache = None
        return super()._apply(fn, recurse)

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv2d, bn: nn.Module, relu: bool, backend: Optional[str] = None,
                     shortcut: Optional[tuple[nn.Conv2d, nn.Module]] = None) -> "FusedConv2d":
        dtype = conv.weight.dtype
        weight, bias = _fold(conv, bn)
        sc_weight, sc_stride = None, (1, 1)
        if shortcut is not None:
            sc_weight, sc_bias = _fold(*shortcut)
            sc_weight = sc_weight.to(dtype)
            bias = bias + sc_bias  # summed in the folding dtype, rounded once below
            sc_stride = shortcut[0].stride
        weight, bias = weight.to(dtype), bias.to(dtype)
        return cls(weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups, relu, backend,
                   sc_weight, sc_stride)

    @property
    def has_shortcut(self) -> bool:
        return self.shortcut_weight is not None

    def extra_repr(self) -> str:
        c_out, c_in_g, kh, kw = self.weight.shape
        s = (f"{c_in_g * self.groups}, {c_out}, kernel_size=({kh}, {kw}), stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.has_shortcut:
            s += f", shortcut=1x1/{self.shortcut_stride[0]} from {self.shortcut_weight.shape[1]}"
        return s + (", relu" if self.relu else "")

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, shortcut_x: Optional[Tensor] = None,
                residual_inplace: bool = False) -> Tensor:
        """``residual_inplace``: the caller owns ``residual`` (e.g. a downsample's fresh output) and needs it no
        more; the mkldnn path then accumulates into it and returns it."""
        if self.has_shortcut and shortcut_x is None:
            raise ValueError("this FusedConv2d carries a projection shortcut: pass its input as shortcut_x")
        if shortcut_x is not None and not self.has_shortcut:
            raise ValueError("shortcut_x given to a FusedConv2d without a shortcut weight")
        name = _conv_op.resolve(self.backend, x) if isinstance(x, Tensor) and x.dim() == 4 else None
        if name is not None and name != "reference":
            x = x.contiguous(memory_format=torch.channels_last)
        if name == _conv_op.MKLDNN and self.weight.dtype == torch.float32 and self.weight.device.type == "cpu":
            return self._forward_mkldnn(x, residual, shortcut_x, residual_inplace)
        return _conv_op.conv_bias_act(
            x, self.weight, self.bias, residual, stride=self.stride, padding=self.padding, dilation=self.dilation,
            groups=self.groups, shortcut_x=shortcut_x, shortcut_weight=self.shortcut_weight,
            shortcut_stride=self.shortcut_stride, relu=self.relu, backend=self.backend)

    def _forward_mkldnn(self, x: Tensor, residual: Optional[Tensor], shortcut_x: Optional[Tensor],
                        residual_inplace: bool) -> Tensor:
        """CPU float32: oneDNN's fused conv with the pre-reordered weights (resfused/_cpu/conv_bias_act.py).
        The weights were checked when the module was built; the activations are checked here."""
        c_in = self.weight.shape[1] * self.groups
        for name, t, c in (("x", x, c_in), ("shortcut_x", shortcut_x, None if shortcut_x is None
                                                 else self.shortcut_weight.shape[1])):
            if t is not None and (t.dim() != 4 or t.dtype != torch.float32 or t.device.type != "cpu"
                                  or (c is not None and t.shape[1] != c)):
                raise ValueError(f"{name} must be a 4-D CPU float32 tensor with {c} channels for this FusedConv2d, "
                                 f"got {t.dtype} {t.device} of shape {tuple(t.shape)}")
        if residual is not None:
            shape = _conv_op.output_shape(x.shape, self.weight.shape, self.stride, self.padding, self.dilation)
            if tuple(residual.shape) != tuple(shape) or residual.dtype != x.dtype or residual.device != x.device:
                raise ValueError(f"residual must be a {x.dtype} {x.device} tensor of the output's shape {tuple(shape)}, "
                                 f"got {residual.dtype} {residual.device} of shape {tuple(residual.shape)}")
        weight, shortcut_weight = self._mkldnn_weights()
        if shortcut_x is not None:
            shortcut_x = shortcut_x.contiguous(memory_format=torch.channels_last)
        return _mkldnn.conv_bias_act(x, weight, self.bias, residual, shortcut_x, shortcut_weight, self.stride,
                                     self.padding, self.dilation, self.groups, self.shortcut_stride, self.relu,
                                     residual_inplace=residual_inplace)


def _fresh(residual: Tensor, x: Tensor) -> bool:
    """Whether a downsample's output may be overwritten: it does not share memory with the block input."""
    return isinstance(residual, Tensor) and residual.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


class FusedBasicBlock(_InferenceOnly, nn.Module):
    """torchvision BasicBlock, eval mode, BN folded: two fused convs; the second adds the residual and ReLUs.

    ``downsample`` is None when the shortcut is the identity or is fused into conv2 (dual GEMM), else a
    module computing the residual (a projection the dual GEMM cannot take, with its BN folded).
    """

    def __init__(self, conv1: FusedConv2d, conv2: FusedConv2d, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1, self.conv2, self.downsample = conv1, conv2, downsample
        self.training = False

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        if self.conv2.has_shortcut:
            return self.conv2(out, shortcut_x=x)
        if self.downsample is None:
            return self.conv2(out, residual=x)
        residual = self.downsample(x)
        return self.conv2(out, residual=residual, residual_inplace=_fresh(residual, x))


class FusedBottleneck(_InferenceOnly, nn.Module):
    """torchvision Bottleneck, eval mode, BN folded: three fused convs (1x1, 3x3 (stride, groups), 1x1 + residual).

    ``downsample`` as in FusedBasicBlock.
    """

    def __init__(self, conv1: FusedConv2d, conv2: FusedConv2d, conv3: FusedConv2d,
                 downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1, self.conv2, self.conv3, self.downsample = conv1, conv2, conv3, downsample
        self.training = False

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.conv1(x))
        if self.conv3.has_shortcut:
            return self.conv3(out, shortcut_x=x)
        if self.downsample is None:
            return self.conv3(out, residual=x)
        residual = self.downsample(x)
        return self.conv3(out, residual=residual, residual_inplace=_fresh(residual, x))


class FusedInferenceModel(_InferenceOnly, nn.Module):
    """What fuse_for_inference returns: the fused copy as ``.module``; forward delegates; .train() raises."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.training = False

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------
# surgery
# ---------------------------------------------------------------------------------------------------

def _dual_gemm_shortcut(downsample: Optional[nn.Module]) -> Optional[tuple[nn.Conv2d, nn.Module]]:
    """(conv, bn) when ``downsample`` is torchvision's Sequential(conv1x1 stride s, BatchNorm2d), else None."""
    if type(downsample) is not nn.Sequential or len(downsample) != 2:
        return None
    conv, bn = downsample[0], downsample[1]
    if type(conv) is not nn.Conv2d or _why_not_foldable(conv, bn) is not None:
        return None
    if conv.kernel_size != (1, 1) or conv.padding != (0, 0) or conv.groups != 1 or conv.padding_mode != "zeros":
        return None
    return conv, bn


def _why_not_fusable_block(block: nn.Module, n_convs: int) -> Optional[str]:
    if type(getattr(block, "relu", None)) is not nn.ReLU:
        return f"its activation is {type(getattr(block, 'relu', None)).__name__}, not nn.ReLU"
    for i in range(1, n_convs + 1):
        conv, bn = getattr(block, f"conv{i}"), getattr(block, f"bn{i}")
        why = _why_not_foldable(conv, bn)
        if why is None:
            why = _why_not_kernel_conv(conv)
        if why is not None:
            return f"conv{i}/bn{i}: {why}"
    return None


def _fold_block_in_place(block: nn.Module, n_convs: int, reason: str, backend: Optional[str]) -> nn.Module:
    """Fallback: keep the block's own forward; convs become cuDNN convs with the BN folded, BNs Identity."""
    folded = []
    for i in range(1, n_convs + 1):
        conv, bn = getattr(block, f"conv{i}"), getattr(block, f"bn{i}")
        if _why_not_foldable(conv, bn) is None:
            setattr(block, f"conv{i}", _folded_conv2d(conv, bn))
            setattr(block, f"bn{i}", nn.Identity())
            folded.append(i)
    if folded:
        _log_once(f"resfused.fuse_for_inference: {type(block).__name__} left on cuDNN convs with folded BN and stock "
                  f"residual/ReLU: {reason}")
    else:
        _log_once(f"resfused.fuse_for_inference: {type(block).__name__} left unfused: {reason}")
    if block.downsample is not None:
        block.downsample = _fold_tree(block.downsample, backend)
    return block


def _fuse_block(block: nn.Module, backend: Optional[str]) -> nn.Module:
    resnet = _torchvision_resnet()
    n_convs = 2 if type(block) is resnet.BasicBlock else 3
    why = _why_not_fusable_block(block, n_convs)
    if why is not None:
        return _fold_block_in_place(block, n_convs, why, backend)
    convs = [FusedConv2d.from_conv_bn(getattr(block, f"conv{i}"), getattr(block, f"bn{i}"), relu=True,
                                      backend=backend) for i in range(1, n_convs)]
    shortcut = _dual_gemm_shortcut(block.downsample)
    downsample = None
    if shortcut is None and block.downsample is not None:
        _log_once("resfused.fuse_for_inference: a downsample that is not Sequential(conv1x1, BatchNorm2d) runs "
                  "separately (BN folded) and feeds the last conv's residual input")
        downsample = _fold_tree(block.downsample, backend)
    convs.append(FusedConv2d.from_conv_bn(getattr(block, f"conv{n_convs}"), getattr(block, f"bn{n_convs}"),
                                          relu=True, backend=backend, shortcut=shortcut))
    if n_convs == 2:
        return FusedBasicBlock(*convs, downsample=downsample)
    return FusedBottleneck(*convs, downsample=downsample)


def _fuse_resnet_stem(model: nn.Module, backend: Optional[str]) -> None:
    """torchvision ResNet: conv1 -> bn1 -> relu becomes one fused conv; bn1 and relu become Identity."""
    if _why_not_foldable(model.conv1, model.bn1) is not None:
        return
    if type(model.relu) is nn.ReLU and _why_not_kernel_conv(model.conv1) is None:
        model.conv1 = FusedConv2d.from_conv_bn(model.conv1, model.bn1, relu=True, backend=backend)
        model.relu = nn.Identity()
    else:
        _log_once("resfused.fuse_for_inference: the stem keeps a cuDNN conv with folded BN")
        model.conv1 = _folded_conv2d(model.conv1, model.bn1)
    model.bn1 = nn.Identity()


def _fold_sequential(seq: nn.Sequential, backend: Optional[str]) -> None:
    """Inside an nn.Sequential: Conv2d, BN[, ReLU] -> FusedConv2d (the BN and ReLU slots become Identity)."""
    mods = list(seq._modules.items())
    for i in range(len(mods) - 1):
        (cname, conv), (bname, bn) = mods[i], mods[i + 1]
        if not (type(conv) is nn.Conv2d and _is_batchnorm(bn)) or _why_not_foldable(conv, bn) is not None:
            continue
        relu = i + 2 < len(mods) and type(mods[i + 2][1]) is nn.ReLU
        if _why_not_kernel_conv(conv) is None:
            seq._modules[cname] = FusedConv2d.from_conv_bn(conv, bn, relu=relu, backend=backend)
            if relu:
                seq._modules[mods[i + 2][0]] = nn.Identity()
        else:
            _log_once(f"resfused.fuse_for_inference: a Conv2d with {_why_not_kernel_conv(conv)} keeps cuDNN with "
                      "folded BN")
            seq._modules[cname] = _folded_conv2d(conv, bn)
        seq._modules[bname] = nn.Identity()
        mods = list(seq._modules.items())


def _fold_tree(module: nn.Module, backend: Optional[str]) -> nn.Module:
    """Fuse ``module`` and its descendants in place (it is already a private copy); returns its replacement."""
    resnet = _torchvision_resnet()
    if resnet is not None and type(module) in (resnet.BasicBlock, resnet.Bottleneck):
        return _fuse_block(module, backend)
    if resnet is not None and type(module) is resnet.ResNet:
        _fuse_resnet_stem(module, backend)
    if type(module) is nn.Sequential:
        _fold_sequential(module, backend)
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        new = _fold_tree(child, backend)
        if new is not child:
            module._modules[name] = new
    return module


def fuse_for_inference(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """A new inference-only module computing ``model``'s eval-mode forward with BN folded and fused kernels.

    ``model`` is not modified (it is deep-copied first; a model converted by resfused.convert, with or
    without fuse_convs, is reverted on the copy). Every Conv2d -> BatchNorm2d pair of a torchvision
    ResNet (stem, BasicBlock/Bottleneck convs, downsample) is folded in fp32 and cast to the conv's dtype,
    and the blocks run resfused::conv_bias_act (bias, residual, ReLU and the projection shortcut in the conv
    epilogue). The result holds no nn.BatchNorm2d; a BatchNorm it cannot fold raises ValueError.

    Args:
        model: typically torchvision.models.resnet18/34/50/101/152, resnext, wide_resnet, in fp32, fp16 or
            bf16 (inputs must match its dtype, as for the stock model).
        backend: None (resfused.get_backend() at call time), "auto", "cuda", "triton" or "reference".

    Returns:
        A FusedInferenceModel (the fused copy is its ``.module``). Its forward takes what ``model`` takes
        (NCHW or channels_last images); ``.train()`` raises RuntimeError, ``.eval()`` is a no-op.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if backend is not None:
        _backend._check_name(backend)
    # Blocks converted by resfused.convert (for training) go back to torchvision's first: their BNs fold the same.
    fused = revert(copy.deepcopy(model))
    fused.eval()
    fused = _fold_tree(fused, backend)
    leftover = [f"{name or '<model>'} ({type(m).__name__})" for name, m in fused.named_modules() if _is_batchnorm(m)]
    if leftover:
        raise ValueError(f"resfused.fuse_for_inference cannot fold the BatchNorm at {', '.join(leftover)}: only an "
                         "nn.BatchNorm2d, nn.SyncBatchNorm or FrozenBatchNorm2d directly after an nn.Conv2d in a "
                         "torchvision ResNet block, stem or nn.Sequential is folded (a BatchNorm subclass may apply "
                         "more than the affine map)")
    for p in fused.parameters():
        p.requires_grad_(False)
    return FusedInferenceModel(fused)
