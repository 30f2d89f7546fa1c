"""BatchNormAddReLU2d against nn.BatchNorm2d + add + ReLU: state, running stats, modes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from resfused.nn import BatchNormAddReLU2d

from conftest import DEVICE, usable_backends

BACKENDS = usable_backends()


def _stock_forward(bn, x, residual, relu):
    y = bn(x)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def _pair(backend, **kw):
    relu = kw.pop("relu", True)
    torch.manual_seed(0)
    stock = nn.BatchNorm2d(6, **kw).to(DEVICE)
    if stock.affine:
        with torch.no_grad():
            stock.weight.uniform_(0.5, 1.5)
            stock.bias.uniform_(-0.5, 0.5)
    ours = BatchNormAddReLU2d(6, relu=relu, backend=backend, **kw).to(DEVICE)
    ours.load_state_dict(stock.state_dict())
    return stock, ours, relu


CONFIGS = {
    "default": dict(),
    "momentum_none": dict(momentum=None),
    "no_affine": dict(affine=False),
    "no_running_stats": dict(track_running_stats=False),
    "no_relu": dict(relu=False),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_stock_over_steps(backend, config):
    stock, ours, relu = _pair(backend, **dict(config))
    for step in range(3):
        for mode in ("train", "eval"):
            stock.train(mode == "train")
            ours.train(mode == "train")
            x = torch.randn(3, 6, 4, 5, device=DEVICE) * (step + 1) + step
            z = torch.randn(3, 6, 4, 5, device=DEVICE)
            xs, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
            ys, yo = _stock_forward(stock, xs, z, relu), ours(xo, z)
            torch.testing.assert_close(yo, ys, rtol=1e-5, atol=1e-5)
            dy = torch.randn_like(ys)
            ys.backward(dy)
            yo.backward(dy)
            torch.testing.assert_close(xo.grad, xs.grad, rtol=1e-4, atol=1e-5)
            for (name, a), b in zip(ours.named_parameters(), stock.parameters()):
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=name)
                a.grad, b.grad = None, None
            for (name, a), b in zip(ours.named_buffers(), stock.buffers()):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_same_state_dict_keys_and_subclass():
    ours, stock = BatchNormAddReLU2d(5), nn.BatchNorm2d(5)
    assert isinstance(ours, nn.BatchNorm2d)
    assert list(ours.state_dict()) == list(stock.state_dict())
    assert "relu=True" in repr(ours)


def test_from_batchnorm_shares_tensors():
    bn = nn.BatchNorm2d(4).train(False)
    fused = BatchNormAddReLU2d.from_batchnorm(bn, relu=False)
    assert fused.weight is bn.weight and fused.bias is bn.bias
    assert fused.running_mean is bn.running_mean and fused.num_batches_tracked is bn.num_batches_tracked
    assert not fused.training and fused.relu is False
    back = fused.to_batchnorm()
    assert type(back) is nn.BatchNorm2d and back.weight is bn.weight


def test_num_batches_tracked_and_cumulative_average():
    ours = BatchNormAddReLU2d(2, momentum=None).to(DEVICE)
    xs = [torch.randn(4, 2, 3, 3, device=DEVICE) + i for i in range(3)]
    for x in xs:
        ours(x)
    assert int(ours.num_batches_tracked) == 3
    expected = torch.stack([x.mean(dim=(0, 2, 3)) for x in xs]).mean(0)
    torch.testing.assert_close(ours.running_mean, expected)


def test_deepcopy_and_pickle(tmp_path):
    ours = BatchNormAddReLU2d(3, relu=False, backend="reference")
    ours(torch.randn(2, 3, 2, 2))
    twin = copy.deepcopy(ours)
    assert twin.relu is False and twin.backend == "reference"
    assert torch.equal(twin.running_mean, ours.running_mean)
    torch.save(ours, tmp_path / "bn.pt")
    loaded = torch.load(tmp_path / "bn.pt", weights_only=False)
    assert isinstance(loaded, BatchNormAddReLU2d) and torch.equal(loaded.running_var, ours.running_var)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_module(backend):
    stock, ours, relu = _pair(backend)
    x = torch.randn(2, 6, 3, 3, device=DEVICE).to(memory_format=torch.channels_last)
    z = torch.randn(2, 6, 3, 3, device=DEVICE)  # NCHW residual: copied to x's format, result unchanged
    y = ours(x, z)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, _stock_forward(stock, x, z, relu), rtol=1e-5, atol=1e-5)
