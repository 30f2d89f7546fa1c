"""BatchNormAddReLU2d as a drop-in nn.BatchNorm2d: the installed torch's constructor (positional and keyword,
device, dtype, and ``bias`` where that torch has it), the same parameters, buffers, state_dict and repr, the
same results on PyTorch's own edge inputs (empty batch, momentum None, not affine, not tracking, bias-free),
the same errors for the same bad arguments (with no state change), and convert() of bias-free BNs.
"""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch
from torch import nn

import resfused
from resfused.nn import BatchNormAddReLU2d
from resfused.nn.batchnorm import STOCK_HAS_BIAS

from _oracle import assert_close
from conftest import CPU_EXTRA_BACKENDS, DEVICE, prepare_backend, usable_backends

BACKENDS = usable_backends()
needs_bias_kw = pytest.mark.skipif(not STOCK_HAS_BIAS, reason="this torch's nn.BatchNorm2d has no bias argument")

# Every constructor combination: affine x bias x track_running_stats x momentum x dtype (bias only where the
# installed torch takes it).
_BIAS = (True, False) if STOCK_HAS_BIAS else (None,)
COMBOS = [dict(affine=a, track_running_stats=t, momentum=m, dtype=d, **({} if b is None else {"bias": b}))
          for a, b, t, m, d in itertools.product((True, False), _BIAS, (True, False), (0.1, None),
                                                (None, torch.float64))]


def _combo_id(kw):
    return "-".join(f"{k}={v}".replace("torch.", "") for k, v in kw.items())


def _same_state(ours: nn.Module, stock: nn.Module) -> None:
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in stock.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in stock.named_buffers()]
    sd_o, sd_s = ours.state_dict(), stock.state_dict()
    assert list(sd_o) == list(sd_s)
    for k in sd_s:
        a, b = sd_o[k], sd_s[k]
        assert (a.dtype, a.device, a.shape) == (b.dtype, b.device, b.shape), k
        assert torch.equal(a, b), k
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert (getattr(ours, name) is None) == (getattr(stock, name) is None), name
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, attr) == getattr(stock, attr), attr


def test_constructor_signature_is_stocks_then_ours():
    stock = inspect.signature(nn.BatchNorm2d.__init__).parameters
    ours = inspect.signature(BatchNormAddReLU2d.__init__).parameters
    assert list(ours)[:len(stock)] == list(stock), "stock's parameters first, in stock's order"
    for name, p in stock.items():
        assert ours[name].kind == p.kind, name
        if name != "bias":  # ours: a sentinel, so that bias= can be refused where stock has no such argument
            assert ours[name].default == p.default, name
    for name in list(ours)[len(stock):]:
        assert ours[name].kind is inspect.Parameter.KEYWORD_ONLY, f"{name} must be keyword-only"


@pytest.mark.parametrize("kw", COMBOS, ids=_combo_id)
def test_every_constructor_combination_matches_stock(kw):
    stock = nn.BatchNorm2d(5, eps=1e-3, **kw)
    ours = BatchNormAddReLU2d(5, eps=1e-3, **kw)
    _same_state(ours, stock)
    assert ours.extra_repr().startswith(stock.extra_repr() + ", "), (ours.extra_repr(), stock.extra_repr())
    ours.load_state_dict(stock.state_dict())  # strict: same keys both ways
    stock.load_state_dict(ours.state_dict())


def test_positional_arguments_mean_what_they_mean_for_stock():
    args = (6, 1e-3, 0.2, True, False, "cpu", torch.float64)
    _same_state(BatchNormAddReLU2d(*args), nn.BatchNorm2d(*args))
    ours = BatchNormAddReLU2d(4, 1e-5, None, False, True, torch.device("cpu"))
    assert ours.momentum is None and not ours.affine and ours.track_running_stats and ours.running_mean.device.type == "cpu"
    assert ours.relu is True and ours.backend is None


def test_factory_kwargs_on_device():
    ours = BatchNormAddReLU2d(3, device=DEVICE, dtype=torch.float64)
    stock = nn.BatchNorm2d(3, device=DEVICE, dtype=torch.float64)
    _same_state(ours, stock)
    assert ours.num_batches_tracked.dtype == torch.long and ours.num_batches_tracked.device == stock.weight.device


def test_constructor_rejects_what_stock_rejects():
    for bad_args, bad_kw in [((4, 1e-5, 0.1, True, True, None, None, False), {}),  # bias is keyword-only
                             ((4,), {"unknown": 1})]:
        with pytest.raises(TypeError):
            nn.BatchNorm2d(*bad_args, **bad_kw)
        with pytest.raises(TypeError):
            BatchNormAddReLU2d(*bad_args, **bad_kw)


@pytest.mark.skipif(STOCK_HAS_BIAS, reason="this torch's nn.BatchNorm2d takes bias")
def test_bias_keyword_refused_where_stock_has_none():
    with pytest.raises(TypeError):
        nn.BatchNorm2d(4, bias=False)
    with pytest.raises(TypeError, match="bias"):
        BatchNormAddReLU2d(4, bias=False)


def _stock_forward(bn, x, residual, relu):
    y = bn(x)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


# PyTorch's own edge inputs for batch norm (test_nn / common_modules): an empty batch, momentum None (the
# cumulative average), no affine, no running stats (batch statistics in eval too), and a bias-free affine.
EDGES = {
    "default": dict(),
    "momentum_none": dict(momentum=None),
    "not_affine": dict(affine=False),
    "not_tracking": dict(track_running_stats=False),
    "not_tracking_momentum_none": dict(track_running_stats=False, momentum=None),
    **({"no_bias": dict(bias=False), "no_bias_not_tracking": dict(bias=False, track_running_stats=False)}
       if STOCK_HAS_BIAS else {}),
}


@pytest.mark.parametrize("edge", EDGES.values(), ids=EDGES.keys())
@pytest.mark.parametrize("backend", BACKENDS + CPU_EXTRA_BACKENDS)
def test_module_matches_stock_on_edge_configs(backend, edge):
    """Three train steps and an eval step of each config, with and without a residual/ReLU: outputs, input
    and parameter gradients, running stats and num_batches_tracked as stock's."""
    prepare_backend(backend)
    g = torch.Generator().manual_seed(0)
    stock = nn.BatchNorm2d(5, **edge).to(DEVICE)
    with torch.no_grad():
        for p in stock.parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    ours = BatchNormAddReLU2d(5, backend=backend, relu=True, **edge).to(DEVICE)
    ours.load_state_dict(stock.state_dict())
    ref = nn.BatchNorm2d(5, **edge).to(DEVICE, torch.float64)  # the float64 oracle, stepped alongside
    ref.load_state_dict(stock.state_dict())
    for step, mode in enumerate(("train", "train", "train", "eval")):
        for m in (stock, ours, ref):
            m.train(mode == "train")
        x = (torch.randn(3, 5, 4, 3, generator=g) * (step + 1) + step).to(DEVICE)
        z = torch.randn(3, 5, 4, 3, generator=g).to(DEVICE)
        dy = torch.randn(3, 5, 4, 3, generator=g).to(DEVICE)
        outs = []
        for m, dtype in ((ours, torch.float32), (stock, torch.float32), (ref, torch.float64)):
            xi = x.detach().to(dtype).clone().requires_grad_()
            y = m(xi, z.to(dtype)) if m is ours else _stock_forward(m, xi, z.to(dtype), True)
            y.backward(dy.to(dtype))
            outs.append((y.detach(), xi.grad, [p.grad for p in m.parameters()], list(m.buffers())))
            m.zero_grad(set_to_none=True)
        (yo, gxo, gpo, bo), (ys, gxs, gps, bs), (yr, gxr, gpr, br) = outs
        assert_close("output", yo, yr, torch.float32, ys)
        assert_close("grad_input", gxo, gxr, torch.float32, gxs)
        for name, a, b, r in zip([n for n, _ in ours.named_parameters()], gpo, gps, gpr):
            assert_close(f"grad {name}", a, r, torch.float32, b)
        for name, a, b, r in zip([n for n, _ in ours.named_buffers()], bo, bs, br):
            if a.is_floating_point():
                assert_close(name, a, r, torch.float32, b)
            else:
                assert torch.equal(a, b), name


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("edge", EDGES.values(), ids=EDGES.keys())
@pytest.mark.parametrize("backend", BACKENDS + CPU_EXTRA_BACKENDS)
def test_empty_batch_matches_stock(backend, edge, mode):
    """N=0: an empty output, the running stats untouched and num_batches_tracked counted, as stock."""
    prepare_backend(backend)
    stock = nn.BatchNorm2d(4, **edge).to(DEVICE).train(mode == "train")
    ours = BatchNormAddReLU2d(4, backend=backend, relu=False, **edge).to(DEVICE).train(mode == "train")
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(0, 4, 3, 3, device=DEVICE)
    ys, yo = stock(x), ours(x)
    assert yo.shape == ys.shape == x.shape
    for (name, a), b in zip(ours.named_buffers(), stock.buffers()):
        assert torch.equal(a, b), name


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("eps", [0.0, -1e-5, 1e-12, float("nan")], ids=str)
@pytest.mark.parametrize("mode", ["train", "eval", "eval_no_running_stats"])
def test_eps_accepted_and_rejected_as_stock(mode, eps):
    """What the installed torch's F.batch_norm rejects (eps <= 0 with batch statistics, eps < 0 with running
    ones, and there eps = 0 too before torch 2.13), BatchNormAddReLU2d rejects with the same error type, and
    changes no state (stock counts the batch first); what stock takes, ours takes and computes alike."""
    kw = dict(track_running_stats=(mode != "eval_no_running_stats"))
    stock = nn.BatchNorm2d(3, eps=eps, **kw).train(mode == "train")
    ours = BatchNormAddReLU2d(3, eps=eps, relu=False, backend="reference", **kw).train(mode == "train")
    x = torch.randn(2, 3, 4, 4)
    before = _state(ours)
    try:
        want = stock(x)
    except Exception as e:  # noqa: BLE001 - whatever stock raises, ours must raise the same type
        with pytest.raises(type(e), match="eps"):
            ours(x)
        after = _state(ours)
        assert all(torch.equal(before[k], after[k]) for k in before), "a rejected call changed the module's state"
        return
    got = ours(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_functional_rejects_eps_as_f_batch_norm():
    """resfused.functional.batch_norm_add_relu follows F.batch_norm's eps rule too, with no state change."""
    from resfused.functional import batch_norm_add_relu

    x = torch.randn(2, 3, 4, 4)
    for training, eps in itertools.product((True, False), (0.0, -1.0)):
        rm, rv = torch.zeros(3), torch.ones(3)
        try:
            torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), None, None, training, 0.1, eps)
            stock_error = None
        except ValueError as e:
            stock_error = e
        if stock_error is None:
            batch_norm_add_relu(x, None, rm, rv, training=training, eps=eps, relu=False, backend="reference")
            continue
        with pytest.raises(ValueError, match="eps"):
            batch_norm_add_relu(x, None, rm, rv, training=training, eps=eps, relu=False, backend="reference")
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_single_value_per_channel_rejected_as_stock():
    stock, ours = nn.BatchNorm2d(3), BatchNormAddReLU2d(3, backend="reference")
    x = torch.randn(1, 3, 1, 1)
    with pytest.raises(ValueError):
        stock(x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ours(x)
    assert int(ours.num_batches_tracked) == 0


def test_wrong_rank_rejected_as_stock():
    stock, ours = nn.BatchNorm2d(3), BatchNormAddReLU2d(3, backend="reference")
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError):
        stock(x)
    with pytest.raises(ValueError):
        ours(x)
    assert int(ours.num_batches_tracked) == 0


@needs_bias_kw
def test_from_batchnorm_and_back_without_bias():
    bn = nn.BatchNorm2d(4, bias=False)
    fused = BatchNormAddReLU2d.from_batchnorm(bn, relu=False)
    assert fused.bias is None and fused.weight is bn.weight
    assert list(fused.state_dict()) == list(bn.state_dict())
    assert "bias=False" in repr(fused)
    back = fused.to_batchnorm()
    assert back.bias is None and list(back.state_dict()) == list(bn.state_dict())


# ---------------------------------------------------------------------------------------------------
# convert() of models whose BNs were built with bias=False
# ---------------------------------------------------------------------------------------------------

def _without_bn_bias(model: nn.Module, seed: int = 1) -> nn.Module:
    """Every nn.BatchNorm2d of ``model`` replaced by a bias-free one (torch >= 2.14's bias=False) with random
    weight and running stats (torchvision's and timm's constructors zero-init the BN bias, so they cannot
    build bias-free BNs themselves)."""
    g = torch.Generator().manual_seed(seed)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                bn = nn.BatchNorm2d(child.num_features, bias=False)
                with torch.no_grad():
                    bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
                    bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
                    bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
                setattr(parent, name, bn)
    return model


def _bias_free_resnet(block="basic"):
    from torchvision.models import resnet

    cls = resnet.BasicBlock if block == "basic" else resnet.Bottleneck
    torch.manual_seed(0)
    return _without_bn_bias(resnet.ResNet(cls, [1, 1, 1, 1], num_classes=10))


@needs_bias_kw
@pytest.mark.parametrize("fuse_convs", [False, True], ids=["bn_fused", "conv_fused"])
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_convert_bias_free_torchvision_resnet(block, fuse_convs):
    pytest.importorskip("torchvision")
    stock = _bias_free_resnet(block).double()
    model = _bias_free_resnet(block).double()
    keys = list(model.state_dict())
    resfused.convert(model, backend="reference", fuse_convs=fuse_convs)
    fused_types = {type(m).__name__ for m in model.modules()}
    assert fused_types & {"BasicBlock", "Bottleneck", "ConvBNBasicBlock", "ConvBNBottleneck"}
    assert not any(type(m).__module__.startswith("torchvision") and type(m).__name__ in ("BasicBlock", "Bottleneck")
                   for m in model.modules()), "a bias-free block was left unconverted"
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for mode in ("train", "eval"):
        stock.train(mode == "train")
        model.train(mode == "train")
        torch.testing.assert_close(model(x), stock(x), rtol=1e-9, atol=1e-9)
    for (k, a), b in zip(model.state_dict().items(), stock.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=k)


@needs_bias_kw
def test_convert_bias_free_timm_resnet():
    timm = pytest.importorskip("timm")
    from timm.models.resnet import BasicBlock as TimmBasic
    from timm.models.resnet import ResNet

    def build():
        torch.manual_seed(0)
        return _without_bn_bias(ResNet(TimmBasic, [1, 1, 1, 1], num_classes=10)).double()

    assert timm is not None
    stock, model = build(), build()
    resfused.convert(model, backend="reference")
    assert not any(type(m) is TimmBasic for m in model.modules()), "a bias-free timm block was left unconverted"
    assert list(model.state_dict()) == list(stock.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for mode in ("train", "eval"):
        stock.train(mode == "train")
        model.train(mode == "train")
        torch.testing.assert_close(model(x), stock(x), rtol=1e-9, atol=1e-9)
