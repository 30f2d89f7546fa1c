"""The CPU fast paths ``auto`` picks for CPU tensors (resfused/_backend.py): "native" BN + add + ReLU (aten's batch
norm, in-place add_/relu_) and "mkldnn" fused convs for fuse_for_inference (torch.ops.mkldnn).

Against the float64 oracle (tests/_oracle.py: twice stock PyTorch's own fp32 error) and stock models; a dispatch
mode records the aten ops each path runs, so a silent fall back to the reference composite (where/gt/mul
elementwise ops, resfused custom ops, unfused convolutions, layout copies) fails.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import resfused
from resfused import _backend
from resfused._cpu import conv_bias_act as _mkldnn
from resfused.nn import BatchNormAddReLU2d
from resfused.ops import bn_add_relu as _op
from resfused.ops import conv_bias_act as _conv_op

from _oracle import assert_close, composite, nrel, randomize_batchnorms

CPU = torch.device("cpu")
needs_mkldnn = pytest.mark.skipif(_mkldnn.unavailable_reason() is not None,
                                  reason=f"{_mkldnn.unavailable_reason()}")


class OpLog(TorchDispatchMode):
    """Records the name of every aten/custom op dispatched while active ("aten::native_batch_norm", ...)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))

    def count(self, fragment: str) -> int:
        return sum(fragment in name for name in self.ops)


def _bn_pair(c, momentum=0.1, seed=0):
    torch.manual_seed(seed)
    stock = nn.BatchNorm2d(c, momentum=momentum)
    with torch.no_grad():
        stock.weight.uniform_(0.5, 1.5)
        stock.bias.uniform_(-0.5, 0.5)
        stock.running_mean.uniform_(-0.2, 0.2)
        stock.running_var.uniform_(0.5, 1.5)
    ours = BatchNormAddReLU2d.from_batchnorm(copy.deepcopy(stock))  # backend None: auto
    return stock, ours


# ---------------------------------------------------------------------------------------------------
# native BN + add + ReLU
# ---------------------------------------------------------------------------------------------------

def test_auto_resolves_native_on_cpu_and_reference_stays_the_oracle():
    x = torch.randn(2, 3, 4, 4)
    assert _backend.resolve(None, x) == "native"
    assert _backend.resolve("auto", x.double()) == "native"
    assert _backend.resolve("auto", x, sample_scale=True) == "native"
    assert _backend.resolve("reference", x) == "reference"
    assert _backend.resolve("auto", x.bfloat16()) == "reference"  # aten would round bn(x) before the add
    assert _backend.resolve("auto", x, native=False) == "reference"  # the synchronised op
    resfused.set_backend("reference")
    assert _backend.resolve(None, x) == "reference"


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("with_residual", [True, False], ids=["add", "noadd"])
def test_native_training_matches_oracle(memory_format, momentum, with_residual):
    c = 5
    stock, ours = _bn_pair(c, momentum)
    x = torch.randn(3, c, 6, 7).contiguous(memory_format=memory_format).requires_grad_()
    res = torch.randn(3, c, 6, 7).contiguous(memory_format=memory_format).requires_grad_() if with_residual else None
    g = torch.randn(3, c, 6, 7)
    ref64 = copy.deepcopy(stock).double()
    leaves64 = [x.detach().double().requires_grad_()] + ([res.detach().double().requires_grad_()] if res is not None
                                                          else [])
    leaves32 = [x.detach().clone().requires_grad_()] + ([res.detach().clone().requires_grad_()] if res is not None
                                                        else [])
    for step in range(2):  # two steps: momentum None averages over num_batches_tracked
        y = ours(x, res)
        assert y.is_contiguous(memory_format=memory_format)
        y64 = ref64(leaves64[0]) + (leaves64[1] if res is not None else 0)
        y64 = torch.relu(y64)
        y32 = torch.relu(stock(leaves32[0]) + (leaves32[1] if res is not None else 0))
        assert_close(f"y step {step}", y, y64, torch.float32, y32)
        grads = torch.autograd.grad(y, [x] + ([res] if res is not None else []) + [ours.weight, ours.bias], g)
        g64 = torch.autograd.grad(y64, leaves64 + [ref64.weight, ref64.bias], g.double())
        g32 = torch.autograd.grad(y32, leaves32 + [stock.weight, stock.bias], g)
        for name, a, b, s in zip(("x", "residual", "weight", "bias")[-len(grads):] if res is None else
                                 ("x", "residual", "weight", "bias"), grads, g64, g32):
            assert_close(f"grad {name} step {step}", a, b, torch.float32, s)
        for buf in ("running_mean", "running_var"):
            assert_close(buf, getattr(ours, buf), getattr(ref64, buf), torch.float32, getattr(stock, buf))
        assert int(ours.num_batches_tracked) == int(stock.num_batches_tracked) == step + 1


def test_native_eval_and_sample_scale_match_oracle():
    c = 4
    _, ours = _bn_pair(c)
    x, res = torch.randn(2, c, 5, 5), torch.randn(2, c, 5, 5)
    s = torch.tensor([0.0, 2.0])
    args = (ours.running_mean, ours.running_var, ours.weight, ours.bias)
    for training in (False, True):
        ours.train(training)
        rm, rv = ours.running_mean.clone(), ours.running_var.clone()
        y = ours(x, res, sample_scale=s)
        rm64, rv64 = rm.double(), rv.double()
        y64 = composite(x.double(), res.double(), rm64, rv64, args[2].detach().double(), args[3].detach().double(),
                        training, 0.1, ours.eps, True, s.double())
        y32 = composite(x, res, rm.clone(), rv.clone(), args[2].detach(), args[3].detach(), training, 0.1, ours.eps,
                        True, s)
        assert_close(f"y training={training}", y, y64, torch.float32, y32)
        if training:
            assert_close("running_mean", ours.running_mean, rm64, torch.float32)
            assert_close("running_var", ours.running_var, rv64, torch.float32)


def test_native_runs_aten_batch_norm_not_the_composite():
    """Fails when the CPU path silently takes the reference composite or the custom ops."""
    _, ours = _bn_pair(8)
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    res = torch.randn(4, 8, 6, 6, requires_grad=True)
    with OpLog() as log:
        y = ours(x, res)
        y.backward(torch.ones_like(y))
    assert log.count("native_batch_norm") >= 2, log.ops          # forward and backward
    assert log.count("resfused") == 0, log.ops
    for composite_op in ("aten::where", "aten::gt", "aten::sub", "aten::rsqrt"):
        assert log.count(composite_op) == 0, (composite_op, log.ops)
    # In place, as stock (one more add_: num_batches_tracked); no out-of-place add or relu.
    assert log.ops.count("aten::add_") == 2 and log.ops.count("aten::relu_") == 1, log.ops
    assert log.ops.count("aten::add") == 0 and log.ops.count("aten::relu") == 0, log.ops


def test_native_mutation_is_caught(monkeypatch):
    """A deliberate 1 % error in one channel of the native path fails the oracle comparison."""
    real = F.batch_norm

    def off_by_one_percent(*a, **k):
        y = real(*a, **k)
        scale = torch.ones(y.shape[1], dtype=y.dtype)
        scale[1] = 1.01
        return y * scale.view(1, -1, 1, 1)

    monkeypatch.setattr(_op, "F", types.SimpleNamespace(batch_norm=off_by_one_percent))
    stock, ours = _bn_pair(3)
    x = torch.randn(2, 3, 4, 4)
    y = ours(x)
    y64 = torch.relu(copy.deepcopy(stock).double()(x.double()))
    with pytest.raises(AssertionError, match="out of tolerance"):
        assert_close("y", y, y64, torch.float32, torch.relu(stock(x)))


def test_converted_resnet_trains_like_stock_on_cpu():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    stock = randomize_batchnorms(tv.models.resnet18(num_classes=10))
    ours = resfused.convert(copy.deepcopy(stock))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    for m in (stock, ours):
        F.cross_entropy(m(x), t).backward()
    # The same aten ops in the same order as stock: equal up to fp32 summation-order noise (none expected).
    assert nrel(ours(x), stock(x)) <= 1e-6
    for (n, a), b in zip(ours.named_parameters(), stock.parameters()):
        assert nrel(a.grad, b.grad) <= 1e-5, n
    sd_o, sd_s = ours.state_dict(), stock.state_dict()
    for k in sd_s:
        assert nrel(sd_o[k].double(), sd_s[k].double()) <= 1e-6, k


# ---------------------------------------------------------------------------------------------------
# mkldnn fused convolutions
# ---------------------------------------------------------------------------------------------------

@needs_mkldnn
def test_conv_bias_act_auto_is_mkldnn_on_cpu_fp32():
    x = torch.randn(1, 4, 5, 5)
    assert _conv_op.resolve(None, x) == "mkldnn"
    assert _conv_op.resolve("reference", x) == "reference"
    assert _conv_op.resolve("auto", x.double()) == "reference"


@needs_mkldnn
@pytest.mark.parametrize("case", ["relu", "residual", "shortcut", "norelu-groups", "c1-1x1"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_conv_bias_act_mkldnn_matches_oracle(case, memory_format, monkeypatch):
    torch.manual_seed(0)
    c_in, c_out, groups, hw, k = (1, 3, 1, 1, 1) if case == "c1-1x1" else (8, 12, 4 if "groups" in case else 1, 9, 3)
    x = torch.randn(2, c_in, hw, hw).contiguous(memory_format=memory_format)
    w = torch.randn(c_out, c_in // groups, k, k) * 0.3
    b = torch.randn(c_out)
    pad = k // 2
    kw = dict(stride=1, padding=pad, groups=groups, relu="norelu" not in case)
    res = sc_x = sc_w = None
    if case == "residual":
        res = torch.randn(2, c_out, hw, hw).contiguous(memory_format=memory_format)
    if case == "shortcut":
        sc_x, sc_w = torch.randn(2, 6, 2 * hw - 1, 2 * hw - 1), torch.randn(c_out, 6, 1, 1) * 0.3
        kw.update(shortcut_x=sc_x, shortcut_weight=sc_w, shortcut_stride=2)
    calls = []
    real = _mkldnn.conv_bias_act
    monkeypatch.setattr(_mkldnn, "conv_bias_act", lambda *a, **k: calls.append(1) or real(*a, **k))
    y = _conv_op.conv_bias_act(x, w, b, res, **kw)
    assert len(calls) == 1  # the custom op ran the mkldnn backend
    ref64 = _conv_op.conv_bias_act(*(t.double() if t is not None else None for t in (x, w, b, res)),
                                   **{k_: (v.double() if isinstance(v, torch.Tensor) else v) for k_, v in kw.items()},
                                   backend="reference")
    acc = F.conv2d(x, w, b, 1, pad, 1, groups)
    if sc_x is not None:
        acc = acc + F.conv2d(sc_x, sc_w, None, 2)
    if res is not None:
        acc = acc + res
    stock = torch.relu(acc) if kw["relu"] else acc
    assert_close(case, y, ref64, torch.float32, stock)
    assert y.is_contiguous(memory_format=memory_format if c_in > 1 else torch.contiguous_format)
    if res is not None:
        assert not torch.equal(res, y)  # the functional op never overwrites its residual


def _fused_resnet(name="resnet50", size=32):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    stock = randomize_batchnorms(getattr(tv.models, name)(num_classes=10)).eval()
    return stock, resfused.fuse_for_inference(stock), torch.randn(2, 3, size, size)


def _one_pixel_residual_copies(fused, x):
    """The residual copies resfused/_cpu/conv_bias_act.py makes on a torch whose out-of-place fused binary conv
    rejects packed weights with a residual of ambiguous layout (torch 2.11): one per identity-residual conv with a
    1x1 output (C > 1 throughout these models)."""
    if _mkldnn._binary_both_layouts_ok():
        return 0
    hits = []

    def hook(m, args, kwargs, out):
        residual = kwargs.get("residual", args[1] if len(args) > 1 else None)
        if (residual is not None and not m.has_shortcut and not kwargs.get("residual_inplace", False)
                and out.shape[-1] * out.shape[-2] == 1):
            hits.append(m)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in fused.modules()
               if isinstance(m, resfused.fuse.FusedConv2d)]
    with torch.no_grad():
        fused(x)
    for h in handles:
        h.remove()
    assert hits  # the 32x32 models below reach layer4 at one pixel
    return len(hits)


@needs_mkldnn
@pytest.mark.parametrize("name", ["resnet50", "resnet18"])
def test_fuse_for_inference_mkldnn_matches_stock_eval(name):
    stock, fused, x = _fused_resnet(name)
    one_pixel = _one_pixel_residual_copies(fused, x)  # also runs conv_bias_act's one-time probe before the log
    with torch.no_grad():
        ref64 = copy.deepcopy(stock).double()(x.double())
        y32 = stock(x)
        with OpLog() as log:
            y = fused(x)
    assert nrel(y, ref64) <= 2 * nrel(y32, ref64), (nrel(y, ref64), nrel(y32, ref64))
    n_convs = sum(isinstance(m, nn.Conv2d) for m in stock.modules())
    n_shortcuts = sum(m.has_shortcut for m in fused.modules() if isinstance(m, resfused.fuse.FusedConv2d))
    # Every conv is one oneDNN fused conv; no unfused convolution, BN, add or ReLU; one layout copy (the stem's
    # NCHW input to channels_last), none between layers.
    assert log.count("mkldnn::_convolution_pointwise") == n_convs, log.ops
    assert n_shortcuts > 0
    for op in ("aten::convolution", "aten::mkldnn_convolution", "aten::relu", "aten::relu_", "aten::add",
               "aten::add_", "aten::where"):
        assert log.ops.count(op) == 0, (op, log.ops)
    for fragment in ("batch_norm", "resfused", "_reorder_convolution_weight"):  # weights reordered once, earlier
        assert log.count(fragment) == 0, (fragment, log.ops)
    copies = [o for o in log.ops if o in ("aten::clone", "aten::_to_copy", "aten::copy_", "aten::contiguous")]
    assert len(copies) == 1 + one_pixel, log.ops
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with OpLog() as log_cl, torch.no_grad():
        y_cl = fused(x_cl)
    assert len([o for o in log_cl.ops if o in ("aten::clone", "aten::_to_copy", "aten::copy_")]) == one_pixel, \
        log_cl.ops
    assert torch.equal(y_cl, y)


@needs_mkldnn
@pytest.mark.parametrize("residual_inplace", [False, True], ids=["fresh-output", "into-residual"])
@pytest.mark.parametrize("hw,k,stride,c_out", [(1, 1, 1, 24), (1, 3, 1, 24), (2, 3, 2, 24), (3, 1, 1, 24),
                                               (2, 3, 1, 1), (1, 1, 1, 1)])
def test_mkldnn_packed_weights_with_residual_of_ambiguous_layout(hw, k, stride, c_out, residual_inplace):
    """ResNet's layer4 at 32x32 inputs: a one-pixel output (or C == 1) with packed weights and a residual, whose
    layout is NCHW and channels_last at once: torch 2.11's out-of-place fused binary conv rejects it ("could not
    create a memory"); (3, 1, 1, 24) is the unambiguous control."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, hw, hw).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(c_out, 16, k, k) * 0.2, torch.randn(c_out)
    pad = k // 2
    ho = (hw + 2 * pad - k) // stride + 1
    res = torch.randn(2, c_out, ho, ho).contiguous(memory_format=torch.channels_last)
    res_before = res.clone()
    packed = _mkldnn.pack_weight(w, [pad, pad], [stride, stride], [1, 1], 1)
    y = _mkldnn.conv_bias_act(x, packed, b, res, None, None, [stride, stride], [pad, pad], [1, 1], 1, [1, 1], True,
                              residual_inplace=residual_inplace)
    ref64 = torch.relu(F.conv2d(x.double(), w.double(), b.double(), stride, pad) + res_before.double())
    stock = torch.relu(F.conv2d(x, w, b, stride, pad) + res_before)
    assert_close(f"{hw}x{hw} k{k} s{stride}", y, ref64, torch.float32, stock)
    if residual_inplace:
        assert y.data_ptr() == res.data_ptr()
    else:
        assert torch.equal(res, res_before)  # the caller's residual is never written


@needs_mkldnn
def test_fused_mkldnn_mutation_is_caught(monkeypatch):
    stock, fused, x = _fused_resnet("resnet18")
    real = _mkldnn.conv_bias_act

    def off(*a, **k):
        y = real(*a, **k)
        y[:, 0] *= 1.01
        return y

    monkeypatch.setattr(resfused.fuse._mkldnn, "conv_bias_act", off)
    with torch.no_grad():
        ref64 = copy.deepcopy(stock).double()(x.double())
        bound = 2 * nrel(stock(x), ref64)
        assert nrel(fused(x), ref64) > bound


@needs_mkldnn
def test_fused_mkldnn_weights_repacked_when_changed_and_copyable():
    stock, fused, x = _fused_resnet("resnet18")
    with torch.no_grad():
        y = fused(x)
        conv = fused.module.fc  # untouched by fusion
        first = next(m for m in fused.modules() if isinstance(m, resfused.fuse.FusedConv2d))
        packed = first._mkldnn_weights()[0]
        assert first._mkldnn_weights()[0] is packed  # reordered once
        clone = copy.deepcopy(fused)  # the opaque oneDNN weights are not copied, rebuilt on demand
        assert torch.equal(clone(x), y)
        first.weight.mul_(0.5)  # an in-place change is seen: repacked, the output changes
        assert first._mkldnn_weights()[0] is not packed
        assert not torch.equal(fused(x), y)
        first.weight.mul_(2.0)
        assert torch.allclose(fused(x), y, rtol=1e-5, atol=1e-5)
        y64 = fused.double()(x.double())  # float64: the reference backend
        assert nrel(y64, y) < 1e-5 and conv is fused.module.fc
