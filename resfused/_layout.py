"""Memory layouts shared by every backend: which dense order a 4-D tensor is in, and the packed ReLU mask.

A dense (N, C, H, W) tensor is read either as NCHW planes ("nchw": C planes of H*W per sample) or as
channels_last rows ("cl": N*H*W rows of C channels). Shapes where both orders coincide (C == 1, or
H == W == 1) are treated as "nchw"; the memory is the same either way.

The ReLU mask saved for backward holds one bit per element, packed along the contiguous axis:
  nchw: uint8 (N*C, ceil(H*W/8)); bit j of byte k is spatial position 8k+j of that plane.
  cl:   uint8 (N*H*W, ceil(C/8));  bit j of byte k is channel 8k+j of that row.
Bits past the end of the axis are zero. Without a ReLU the mask is an empty uint8 tensor.
"""

from __future__ import annotations

import torch

NCHW = "nchw"
CL = "cl"


def layout_of(x: torch.Tensor) -> str:
    """The layout of a dense 4-D tensor; raises if it is neither NCHW- nor channels_last-contiguous."""
    if x.is_contiguous():
        return NCHW
    if x.is_contiguous(memory_format=torch.channels_last):
        return CL
    raise ValueError(f"tensor with strides {tuple(x.stride())} is neither contiguous nor channels_last")


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of statistics, weight, bias and accumulation for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == CL else torch.contiguous_format


def mask_shape(shape: torch.Size, layout: str) -> tuple[int, int]:
    n, c, h, w = shape
    if layout == CL:
        return (n * h * w, (c + 7) // 8)
    return (n * c, (h * w + 7) // 8)


def empty_mask(device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=device)


def _as_rows(t: torch.Tensor, layout: str) -> torch.Tensor:
    """View a dense 4-D tensor as 2-D (outer, inner) in memory order."""
    n, c, h, w = t.shape
    if layout == CL:
        return t.permute(0, 2, 3, 1).reshape(n * h * w, c)
    return t.reshape(n * c, h * w)


_BIT_WEIGHTS = [1 << j for j in range(8)]


def pack_mask(positive: torch.Tensor, layout: str) -> torch.Tensor:
    """Pack a bool (N, C, H, W) tensor into the uint8 mask layout above."""
    rows = _as_rows(positive, layout)
    outer, inner = rows.shape
    nbytes = (inner + 7) // 8
    padded = torch.zeros(outer, nbytes * 8, dtype=torch.uint8, device=rows.device)
    padded[:, :inner] = rows
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=rows.device)
    return (padded.view(outer, nbytes, 8) * weights).sum(dim=2, dtype=torch.uint8)


def unpack_mask(mask: torch.Tensor, shape: torch.Size, layout: str) -> torch.Tensor:
    """Inverse of pack_mask: a bool tensor of ``shape`` (N, C, H, W), dense in ``layout``."""
    n, c, h, w = shape
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    bits = (mask.unsqueeze(-1) & weights) != 0
    bits = bits.reshape(mask.shape[0], mask.shape[1] * 8)
    if layout == CL:
        return bits[:, :c].reshape(n, h, w, c).permute(0, 3, 1, 2)
    return bits[:, : h * w].reshape(n, c, h, w)
