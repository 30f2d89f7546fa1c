"""Autocast: a converted model behaves like stock (fp32 parameters and statistics, low-precision
activations, outputs and gradients within twice stock autocast's error against fp32)."""

from __future__ import annotations

import pytest
import torch

import resfused

from conftest import DEVICE, HAS_CUDA

torchvision = pytest.importorskip("torchvision")

AMP_DTYPES = [torch.bfloat16] + ([torch.float16] if HAS_CUDA else [])  # CPU autocast is bf16


def _nrel(a, b):
    b = b.detach().double()
    return ((a.detach().double() - b).norm() / b.norm()).item()


def _step(model, x, dtype):
    with torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype != torch.float32):
        y = model(x)
    y.float().square().mean().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return y, grads


@pytest.mark.parametrize("fuse_convs", [False, True], ids=["convert", "fuse_convs"])
@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=str)
def test_autocast_resnet18_matches_stock(dtype, fuse_convs):
    torch.manual_seed(0)
    make = lambda: torchvision.models.resnet18(num_classes=10).to(DEVICE).to(memory_format=torch.channels_last)
    ref, stock, ours = make(), make(), make()
    stock.load_state_dict(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    resfused.convert(ours, fuse_convs=fuse_convs)
    x = torch.randn(4, 3, 64, 64, device=DEVICE).to(memory_format=torch.channels_last)
    y_ref, g_ref = _step(ref, x, torch.float32)
    y_stock, g_stock = _step(stock, x, dtype)
    y_ours, g_ours = _step(ours, x, dtype)
    assert y_ours.dtype == y_stock.dtype == dtype
    bn = ours.layer1[0].bn1
    assert bn.weight.dtype == bn.running_mean.dtype == torch.float32 and bn.weight.grad.dtype == torch.float32
    assert _nrel(y_ours, y_ref) <= 2 * _nrel(y_stock, y_ref)
    assert _nrel(g_ours, g_ref) <= 2 * _nrel(g_stock, g_ref)
    for (name, a), b, c in zip(ours.named_buffers(), stock.buffers(), ref.buffers()):
        if a.is_floating_point():
            assert _nrel(a, c) <= 2 * _nrel(b, c) + 1e-6, name
