"""resfused: fused BatchNorm + residual add + ReLU kernels for ResNets.

    model = resfused.convert(torchvision.models.resnet50())
"""

from . import _backend
from ._backend import BackendInfo, available_backends, backends, get_backend, set_backend
from . import functional, nn, ops
from .convert import convert, revert
from .fuse import fuse_for_inference

__version__ = "0.1.0"

__all__ = ["BackendInfo", "available_backends", "backends", "convert", "functional", "fuse_for_inference",
           "get_backend", "nn", "ops", "revert", "set_backend"]

_backend.warn_if_ext_missing()
