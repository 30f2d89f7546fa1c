"""Model surgery: convert() swaps torchvision ResNet blocks for fused ones in place; revert() undoes it."""

from __future__ import annotations

import logging
from typing import Optional

from torch import nn

from . import _backend
from .nn import BasicBlock, Bottleneck
from .nn.batchnorm import BatchNormAddReLU2d

logger = logging.getLogger("resfused")


def _torchvision_blocks():
    try:
        from torchvision.models import resnet
    except ImportError:
        return None
    return {resnet.BasicBlock: BasicBlock, resnet.Bottleneck: Bottleneck}


def _why_not_convertible(block: nn.Module) -> Optional[str]:
    bns = [m for name, m in block.named_children() if name.startswith("bn")]
    for bn in bns:
        if type(bn) is not nn.BatchNorm2d:
            return f"its norm layer is {type(bn).__name__}, not BatchNorm2d"
    relu = getattr(block, "relu", None)
    if type(relu) is not nn.ReLU:
        return f"its activation is {type(relu).__name__}, not ReLU"
    return None


def _swap_children(module: nn.Module, swap) -> None:
    for name, child in list(module.named_children()):
        new = swap(child)
        if new is not child:
            setattr(module, name, new)
        else:
            _swap_children(child, swap)


def convert(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Replace every torchvision BasicBlock/Bottleneck in ``model`` with resfused's fused blocks, in place.

    Parameters and buffers are shared with the original blocks (optimizers built before the call keep
    working), state_dict keys and values are unchanged. Blocks that cannot be fused (another norm layer
    or activation) are left as they are, with one log line saying why. Returns ``model`` (or the new
    block, when ``model`` itself is a block).

    Args:
        backend: None (resfused.get_backend() at call time), "auto", "cuda", "triton" or "reference".
    """
    if backend is not None:
        _backend._check_name(backend)
    table = _torchvision_blocks()
    if table is None:
        raise ImportError("resfused.convert needs torchvision to recognise ResNet blocks")

    def swap(child: nn.Module) -> nn.Module:
        target = table.get(type(child))  # exact types: a subclass may change forward
        if target is None:
            return child
        why = _why_not_convertible(child)
        if why is not None:
            logger.info("resfused.convert: leaving %s unfused: %s", type(child).__name__, why)
            return child
        return target.from_torchvision(child, backend=backend)

    new = swap(model)
    if new is not model:
        return new
    _swap_children(model, swap)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Turn resfused blocks back into torchvision blocks with the same parameters, in place."""
    from torchvision.models import resnet

    back = {BasicBlock: resnet.BasicBlock, Bottleneck: resnet.Bottleneck}

    def swap(child: nn.Module) -> nn.Module:
        target = back.get(type(child))
        if target is None:
            return child
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

    new = swap(model)
    if new is not model:
        return new
    _swap_children(model, swap)
    return model
