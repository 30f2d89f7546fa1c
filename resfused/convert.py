"""Model surgery: convert() swaps ResNet blocks for fused ones in place; revert() undoes it.

Recognised blocks (exact types; a subclass may change forward):
  * torchvision.models.resnet.BasicBlock / Bottleneck          -> resfused.nn.BasicBlock / Bottleneck
  * timm.models.resnet.BasicBlock / Bottleneck (plain ones)    -> resfused.nn.TimmBasicBlock / TimmBottleneck
  * timm.models.resnetv2.PreActBasic / PreActBottleneck        -> same block, its BatchNormAct2d (ReLU)
    pre-activation norms swapped for BatchNormAddReLU2d
timm is never imported here: its blocks are looked for only when the program has imported timm already
(a model cannot hold timm blocks otherwise).
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

from torch import nn

from . import _backend
from .nn import BasicBlock, Bottleneck, conv_bn_blocks
from .nn.batchnorm import BatchNormAddReLU2d
from .nn.timm_blocks import TimmBasicBlock, TimmBottleneck, _is_timm_drop_path, fuse_norm_act, unfuse_norm_act

logger = logging.getLogger("resfused")

_BATCHNORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)  # exact types a fused block's BN may come from


def _torchvision_resnet():
    try:
        from torchvision.models import resnet
    except ImportError:
        return None
    return resnet


def _timm_modules():
    """(timm.models.resnet, timm.models.resnetv2, timm.layers) when timm is already imported, else None."""
    if "timm" not in sys.modules:
        return None
    try:
        import timm.layers
        from timm.models import resnet, resnetv2
    except ImportError:
        return None
    return resnet, resnetv2, timm.layers


def _why_not_convertible(block: nn.Module) -> Optional[str]:
    """torchvision blocks: why ``block`` cannot be fused, or None."""
    bns = [m for name, m in block.named_children() if name.startswith("bn")]
    for bn in bns:
        if type(bn) not in _BATCHNORMS:
            return f"its norm layer is {type(bn).__name__}, not BatchNorm2d or SyncBatchNorm"
    relu = getattr(block, "relu", None)
    if type(relu) is not nn.ReLU:
        return f"its activation is {type(relu).__name__}, not ReLU"
    return None


def _active_drop(module: Optional[nn.Module]) -> bool:
    return module is not None and type(module) is not nn.Identity and bool(getattr(module, "drop_prob", True))


def _why_not_timm(block: nn.Module, n_bns: int) -> Optional[str]:
    """timm.models.resnet blocks: why ``block`` cannot be fused, or None."""
    for i in range(1, n_bns + 1):
        bn = getattr(block, f"bn{i}")
        if type(bn) not in _BATCHNORMS:
            return f"its norm layer bn{i} is {type(bn).__name__}, not BatchNorm2d or SyncBatchNorm"
        act = getattr(block, f"act{i}")
        if type(act) is not nn.ReLU:
            return f"its activation act{i} is {type(act).__name__}, not ReLU"
    if block.se is not None:
        return f"it has an attention module (se: {type(block.se).__name__})"
    if type(block.aa) is not nn.Identity:
        return f"it uses anti-aliasing (aa: {type(block.aa).__name__})"
    if _active_drop(block.drop_block):
        return (f"it has drop_block ({type(block.drop_block).__name__}, "
                f"drop_prob={getattr(block.drop_block, 'drop_prob', '?')}), not fused")
    if _active_drop(block.drop_path) and not _is_timm_drop_path(block.drop_path):
        return (f"it has drop_path ({type(block.drop_path).__name__}, "
                f"drop_prob={getattr(block.drop_path, 'drop_prob', '?')}), not timm.layers.DropPath (the "
                f"drop-path resfused fuses)")
    return None


def _preact_norm_names(block: nn.Module) -> list[str]:
    return [name for name, _ in block.named_children() if name.startswith("norm")]


def _why_not_preact(block: nn.Module, layers) -> Optional[str]:
    """timm.models.resnetv2 pre-activation blocks: why their norms cannot be fused, or None."""
    for name in _preact_norm_names(block):
        norm = getattr(block, name)
        if type(norm) not in (layers.BatchNormAct2d, layers.SyncBatchNormAct):
            return f"its norm layer {name} is {type(norm).__name__}, not BatchNormAct2d or SyncBatchNormAct"
        if type(norm.act) is not nn.ReLU:
            return f"its norm layer {name}'s activation is {type(norm.act).__name__}, not ReLU"
        if type(norm.drop) is not nn.Identity:
            return f"its norm layer {name} has a drop layer ({type(norm.drop).__name__})"
    return None


def _swap_children(module: nn.Module, swap) -> None:
    for name, child in list(module.named_children()):
        new = swap(child)
        if new is not child:
            setattr(module, name, new)
        else:
            _swap_children(child, swap)


def _apply(model: nn.Module, swap) -> nn.Module:
    new = swap(model)
    if new is not model:
        return new
    _swap_children(model, swap)
    return model


def convert(model: nn.Module, backend: Optional[str] = None, fuse_convs: bool = False,
            recompute: bool = False) -> nn.Module:
    """Replace every recognised ResNet block in ``model`` with a fused one, in place.

    torchvision BasicBlock/Bottleneck become resfused.nn.BasicBlock/Bottleneck; timm's
    (timm.models.resnet) become resfused.nn.TimmBasicBlock/TimmBottleneck when plain (ReLU, BatchNorm2d
    or SyncBatchNorm, no attention, no anti-aliasing, no active drop-block; a timm DropPath is fused as a
    per-sample scale); timm's pre-activation ResNetV2 blocks keep their type and get fused BN + ReLU
    pre-activations. Norms that are nn.SyncBatchNorm become BatchNormAddReLU2d synchronised over the same
    group ("world" for process_group=None). Parameters and buffers are shared with the original blocks
    (optimizers built before the call keep working), state_dict keys and values are unchanged. Blocks
    that cannot be fused are left as they are, with one log line saying why. Returns ``model`` (or the
    new block, when ``model`` itself is a block).

    Args:
        backend: None (resfused.get_backend() at call time), "auto", "cuda", "triton" or "reference".
        fuse_convs: torchvision BasicBlock/Bottleneck become resfused.nn.ConvBNBasicBlock/ConvBNBottleneck,
            which fuse each BN into the convs (statistics in the producing conv's epilogue, normalize + ReLU
            in the consuming conv's prologue; resfused.ops.conv_bn) in training and eval. Blocks with
            SyncBatchNorm or unusual convs get the unfused conversion instead, logged once per reason.
            timm blocks are converted as without fuse_convs.
        recompute: with fuse_convs, each fused block recomputes its last conv's output in backward instead of
            saving it: less activation memory (an activation of the block output's size per block), one more
            conv forward (the last 1x1 of a bottleneck) per block in training.
    """
    if backend is not None:
        _backend._check_name(backend)
    if recompute and not fuse_convs:
        raise ValueError("recompute=True needs fuse_convs=True (it recomputes the fused blocks' last conv)")
    tv, timm = _torchvision_resnet(), _timm_modules()
    if tv is None and timm is None:
        raise ImportError("resfused.convert needs torchvision (or timm) to recognise ResNet blocks")
    table = {}  # exact type -> (why_not, make)
    if tv is not None:
        table[tv.BasicBlock] = (_why_not_convertible, lambda b: BasicBlock.from_torchvision(b, backend=backend))
        table[tv.Bottleneck] = (_why_not_convertible, lambda b: Bottleneck.from_torchvision(b, backend=backend))
        if fuse_convs:
            for cls in (tv.BasicBlock, tv.Bottleneck):
                why_not, unfused = table[cls]
                table[cls] = (why_not, lambda b, unfused=unfused: conv_bn_blocks.from_torchvision_or(
                    b, unfused, backend, recompute=recompute))
    if timm is not None:
        t_resnet, t_resnetv2, t_layers = timm
        table[t_resnet.BasicBlock] = (lambda b: _why_not_timm(b, 2),
                                      lambda b: TimmBasicBlock.from_timm(b, backend=backend))
        table[t_resnet.Bottleneck] = (lambda b: _why_not_timm(b, 3),
                                      lambda b: TimmBottleneck.from_timm(b, backend=backend))

        def fuse_preact(block):
            for name in _preact_norm_names(block):
                setattr(block, name, fuse_norm_act(getattr(block, name), backend=backend))
            return block

        for cls in (t_resnetv2.PreActBasic, t_resnetv2.PreActBottleneck):
            table[cls] = (lambda b: _why_not_preact(b, t_layers), fuse_preact)

    def swap(child: nn.Module) -> nn.Module:
        entry = table.get(type(child))
        if entry is None:
            return child
        why_not, make = entry
        why = why_not(child)
        if why is not None:
            logger.info("resfused.convert: leaving %s unfused: %s", type(child).__name__, why)
            return child
        return make(child)

    return _apply(model, swap)


def revert(model: nn.Module) -> nn.Module:
    """Turn resfused blocks back into torchvision/timm blocks with the same parameters, in place.

    BatchNormAddReLU2d with a process group go back to nn.SyncBatchNorm (timm SyncBatchNormAct in
    pre-activation blocks) over the same group.
    """
    timm = _timm_modules()
    preact = () if timm is None else (timm[1].PreActBasic, timm[1].PreActBottleneck)

    def to_torchvision(child: nn.Module) -> nn.Module:
        from torchvision.models import resnet

        target = resnet.BasicBlock if type(child) is BasicBlock else resnet.Bottleneck
        new = target.__new__(target)
        nn.Module.__init__(new)
        new.training = child.training
        for name, sub in child.named_children():
            setattr(new, name, sub.to_batchnorm() if isinstance(sub, BatchNormAddReLU2d) else sub)
        if child.downsample is None:
            new.downsample = None
        new.relu = nn.ReLU(inplace=True)
        new.stride = child.stride
        return new

    def swap(child: nn.Module) -> nn.Module:
        if type(child) in (BasicBlock, Bottleneck):
            return to_torchvision(child)
        if type(child) in (conv_bn_blocks.ConvBNBasicBlock, conv_bn_blocks.ConvBNBottleneck):
            return child.to_torchvision()
        if type(child) in (TimmBasicBlock, TimmBottleneck):
            return child.to_timm()
        if type(child) in preact:
            for name in _preact_norm_names(child):
                norm = getattr(child, name)
                if isinstance(norm, BatchNormAddReLU2d):
                    setattr(child, name, unfuse_norm_act(norm))
        return child

    return _apply(model, swap)
