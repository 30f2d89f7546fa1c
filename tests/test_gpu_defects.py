"""The GPU-only defects of issue 13: each fix, tested on CPU wherever the logic can be reached there, and as
@pytest.mark.cuda tests (skipped here) for what only a GPU can show.

CPU (with resfused._C built):
  * the C++ conv ops' argument checks, through their Meta kernels (the same checks the CUDA kernels run before
    any device work): stride 0, negative padding, zero dilation, groups, weight channels, bias, a residual of the
    wrong shape, the shortcut's weight and spatial size, each error naming the argument;
  * the fused cuDNN conv_bn path's statistics finalize (csrc/conv_bn_stats.cu, its CPU kernel: the same formulas),
    exact for |mean| / std up to 1e3 where the uncentred formula it replaces is off by percent; and the same
    through the Python composition (resfused/ops/conv_bn_cuda.py) over an emulated genstats.
GPU (cuda): TF32 conv and RNN settings that differ; the Triton conv launchers on cuda:1; every bf16 conv of
ResNet-50 on the fused cuDNN path (1x1 weights with NCHW-looking strides included); the fused statistics at
|mean| / std = 1e3 on the device; conv_bias_act's rounding contract; the checks on CUDA tensors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resfused import _layout
from resfused.ops import conv_bn_cuda
from resfused.reference import conv_bn as ref

from conftest import DEVICE, HAS_CUDA
from test_cuda_ext import _extension_expected

needs_ext = pytest.mark.skipif(not _extension_expected(),
                               reason="resfused._C is not built (no RESFUSED_FORCE_CUDA_BUILD=1 and no installed "
                                      "extension)")


def _ops():
    import resfused._C  # noqa: F401

    return torch.ops.resfused_cuda_conv, torch.ops.resfused_cuda_conv_bn


# ---------------------------------------------------------------------------------------------------
# argument checks (Meta kernels on CPU; the CUDA kernels run the same code first)
# ---------------------------------------------------------------------------------------------------

def _cba_args(device="meta", **over):
    cl = torch.channels_last
    args = dict(x=torch.empty(2, 8, 9, 9, device=device).contiguous(memory_format=cl),
                weight=torch.empty(16, 8, 3, 3, device=device), bias=torch.empty(16, device=device),
                residual=torch.empty(2, 16, 9, 9, device=device), shortcut_x=None, shortcut_weight=None,
                stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1, shortcut_stride=[1, 1], relu=True)
    args.update(over)
    return args


CBA_ERRORS = {
    "stride0": (dict(stride=[0, 1]), "stride must be positive"),
    "stride3": (dict(stride=[1, 1, 1]), "stride must have two entries"),
    "padding": (dict(padding=[-1, 1]), "padding must be non-negative"),
    "dilation": (dict(dilation=[1, 0]), "dilation must be positive"),
    "groups": (dict(groups=0), "groups must be positive"),
    "weight_channels": (dict(weight=torch.empty(16, 4, 3, 3, device="meta")), "does not fit x's 8 channels"),
    "bias_shape": (dict(bias=torch.empty(15, device="meta")), "bias must have shape (16,)"),
    "residual_broadcast": (dict(residual=torch.empty(2, 16, 1, 9, device="meta")),
                           "residual must have the output's shape"),
    "residual_channels": (dict(residual=torch.empty(2, 1, 9, 9, device="meta")),
                          "residual must have the output's shape"),
    "shortcut_weight": (dict(shortcut_x=torch.empty(2, 4, 9, 9, device="meta"),
                             shortcut_weight=torch.empty(16, 4, 3, 3, device="meta")),
                        "shortcut_weight must have shape (16, 4, 1, 1)"),
    "shortcut_spatial": (dict(shortcut_x=torch.empty(2, 4, 20, 20, device="meta"),
                              shortcut_weight=torch.empty(16, 4, 1, 1, device="meta"), shortcut_stride=[1, 1]),
                         "shortcut_x of spatial size"),
    "shortcut_stride0": (dict(shortcut_x=torch.empty(2, 4, 9, 9, device="meta"),
                              shortcut_weight=torch.empty(16, 4, 1, 1, device="meta"), shortcut_stride=[0, 1]),
                         "shortcut_stride must be positive"),
    "too_small": (dict(padding=[0, 0], x=torch.empty(2, 8, 2, 9, device="meta")), "too small for the conv"),
}


@needs_ext
def test_conv_bias_act_meta_kernel_gives_the_output_shape():
    cba, _ = _ops()
    a = _cba_args()
    y = cba.conv_bias_act(*a.values())
    assert y.shape == (2, 16, 9, 9) and y.is_contiguous(memory_format=torch.channels_last)
    a = _cba_args(shortcut_x=torch.empty(2, 4, 17, 17, device="meta"),
                  shortcut_weight=torch.empty(16, 4, 1, 1, device="meta"), shortcut_stride=[2, 2])
    assert cba.conv_bias_act(*a.values()).shape == (2, 16, 9, 9)


@needs_ext
@pytest.mark.parametrize("case", list(CBA_ERRORS))
def test_conv_bias_act_checks_every_argument(case):
    """Called directly through torch.ops (no Python validation in front): each bad argument is a RuntimeError
    naming it, before any device work (stride 0 divided by zero; a (2, 16, 1, 9) residual broadcast silently)."""
    cba, _ = _ops()
    over, message = CBA_ERRORS[case]
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cba.conv_bias_act(*_cba_args(**over).values())


def _cbn_forward_args(**over):
    args = dict(x=torch.empty(2, 8, 9, 9, device="meta").contiguous(memory_format=torch.channels_last),
                weight=torch.empty(16, 8, 3, 3, device="meta"), scale=torch.empty(8, device="meta"),
                shift=torch.empty(8, device="meta"), stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1,
                stats=True)
    args.update(over)
    return args


CBN_ERRORS = {
    "stride0": (dict(stride=[1, 0]), "stride must be positive"),
    "padding": (dict(padding=[1, -2]), "padding must be non-negative"),
    "dilation": (dict(dilation=[0, 1]), "dilation must be positive"),
    "groups": (dict(groups=0), "groups must be positive"),
    "weight_channels": (dict(weight=torch.empty(16, 3, 3, 3, device="meta")), "weight"),
    "scale_shape": (dict(scale=torch.empty(7, device="meta")), "scale must be a contiguous float32 tensor"),
    "shift_alone": (dict(scale=None), "scale and shift must be given together"),
    "dtype": (dict(x=torch.empty(2, 8, 9, 9, device="meta", dtype=torch.float64)), "x must be float16, bfloat16"),
    "strided_x": (dict(x=torch.empty(2, 8, 9, 18, device="meta")[..., ::2]), "x must be contiguous or channels_last"),
}


@needs_ext
def test_conv_bn_meta_kernels_give_the_output_shapes():
    _, cbn = _ops()
    y, mean, var = cbn.conv_bn_forward(*_cbn_forward_args().values())
    assert y.shape == (2, 16, 9, 9) and y.is_contiguous(memory_format=torch.channels_last)
    assert mean.shape == var.shape == (16,) and mean.dtype == torch.float32
    x = _cbn_forward_args()["x"]
    dw = cbn.conv_bn_wgrad(torch.empty(2, 16, 5, 5, device="meta"), x, None, None, [16, 8, 3, 3], [2, 2], [1, 1],
                           [1, 1], 1)
    assert dw.shape == (16, 8, 3, 3)


@needs_ext
@pytest.mark.parametrize("case", list(CBN_ERRORS))
def test_conv_bn_forward_checks_every_argument(case):
    _, cbn = _ops()
    over, message = CBN_ERRORS[case]
    with pytest.raises(RuntimeError, match=message):
        cbn.conv_bn_forward(*_cbn_forward_args(**over).values())


@needs_ext
@pytest.mark.parametrize("weight_size,stride,message", [([16, 8, 3, 3], [0, 2], "stride must be positive"),
                                                         ([16, 3, 3, 3], [2, 2], "weight_size"),
                                                         ([16, 8, 3], [2, 2], "weight_size must have four")])
def test_conv_bn_wgrad_checks_every_argument(weight_size, stride, message):
    _, cbn = _ops()
    x = _cbn_forward_args()["x"]
    with pytest.raises(RuntimeError, match=message):
        cbn.conv_bn_wgrad(torch.empty(2, 16, 5, 5, device="meta"), x, None, None, weight_size, stride, [1, 1],
                          [1, 1], 1)


# ---------------------------------------------------------------------------------------------------
# the fused path's statistics: exact for |mean| / std up to 1e3
# ---------------------------------------------------------------------------------------------------

RATIOS = [0.0, 1.0, 10.0, 100.0, 1000.0]


def _shifted(shape, ratios, dtype=torch.float32, seed=0, device="cpu"):
    """(N, K, H, W) values with channel k's mean = ratios[k] * its std (std 1), channels_last."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = y + torch.tensor(ratios, dtype=torch.float64).view(1, -1, 1, 1)
    return y.to(dtype).to(device).contiguous(memory_format=torch.channels_last)


def _rel(a, b):
    return ((a.double() - b).abs() / b.abs().clamp_min(1e-30)).max().item()


@needs_ext
def test_finalize_stats_exact_where_the_uncentred_formula_cancels():
    """From fp32 sums and sums of squares, as cuDNN's genstats gives them: the variance within 1e-5 (relative) of
    the float64 variance of the same values at every |mean| / std up to 1e3, where sqsum/n - mean^2 in fp32 is
    off by more than 1 % (at 1e3 it cancels to nothing). Channels with |mean| / std <= 4 keep the uncentred
    result, bit for bit (no recentring, no extra read of y)."""
    _, cbn = _ops()
    y = _shifted((8, len(RATIOS), 32, 32), RATIOS)
    n = y.numel() // y.shape[1]
    s, q = y.sum((0, 2, 3)), (y * y).sum((0, 2, 3))
    mean, var = cbn.conv_bn_finalize_stats(y, s, q)
    var64, mean64 = torch.var_mean(y.double(), (0, 2, 3), correction=0)
    assert _rel(var, var64) < 1e-5, (var, var64)
    assert (mean.double() - mean64).abs().max().item() < 1e-5 * var64.sqrt().max().item() + 1e-7 * 1000
    uncentred_mean = s / n
    uncentred = (q / n - uncentred_mean * uncentred_mean).clamp_min(0)
    assert _rel(uncentred[-2:], var64[-2:]) > 1e-2  # what the fix is for: the old formula fails this test
    small = torch.tensor(RATIOS) <= 1.0
    assert torch.equal(var[small], uncentred[small]) and torch.equal(mean[small], uncentred_mean[small])


@needs_ext
def test_finalize_stats_16_bit_y_and_empty():
    _, cbn = _ops()
    y = _shifted((4, 3, 8, 8), [0.5, 50.0, 1000.0], torch.bfloat16, seed=1)
    yf = y.float()
    mean, var = cbn.conv_bn_finalize_stats(y, yf.sum((0, 2, 3)), (yf * yf).sum((0, 2, 3)))
    var64, mean64 = torch.var_mean(y.double(), (0, 2, 3), correction=0)
    assert _rel(var, var64) < 1e-5
    e = torch.empty(0, 3, 8, 8)
    mean, var = cbn.conv_bn_finalize_stats(e, torch.zeros(3), torch.zeros(3))
    assert mean.isnan().all() and var.isnan().all()  # 0 / 0, as the unfused path's var_mean of nothing
    with pytest.raises(RuntimeError, match="sqsum must be a contiguous float32 tensor of shape"):
        cbn.conv_bn_finalize_stats(y, torch.zeros(3), torch.zeros(4))


class _GenstatsConvOps:
    """csrc/conv_bn.cpp's fused forward with its statistics as the op computes them: fp32 sum and sum of squares
    of the conv output (cuDNN's genstats), finalized by the real conv_bn_finalize_stats (its CPU kernel)."""

    @staticmethod
    def conv_bn_forward(x, weight, scale, shift, stride, padding, dilation, groups, stats):
        a = x if scale is None else torch.relu(x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
        acc = F.conv2d(a.float(), weight.float(), None, stride, padding, dilation, groups)
        y = acc.to(x.dtype).contiguous(memory_format=_layout.memory_format(_layout.layout_of(x)))
        _, cbn = _ops()
        mean, var = cbn.conv_bn_finalize_stats(y, acc.sum((0, 2, 3)), (acc * acc).sum((0, 2, 3)))
        return y, mean, var


@needs_ext
@pytest.mark.parametrize("ratio", [10.0, 1000.0])
def test_cuda_composition_running_stats_exact_at_large_mean(monkeypatch, ratio):
    """resfused/ops/conv_bn_cuda.py's forward over the fused op's statistics: a 1x1 identity conv of channels whose
    |mean| / std is ``ratio``: invstd and the running variance match the float64 reference to 1e-5 (the previous
    uncentred finalize: off by percent at 1e3)."""
    monkeypatch.setattr(conv_bn_cuda, "_conv_ops", lambda: _GenstatsConvOps)
    c = 4
    x = _shifted((8, c, 16, 16), [ratio] * c, seed=2)
    w = torch.eye(c).view(c, c, 1, 1)
    rm, rv = torch.zeros(c), torch.ones(c)
    rm64, rv64 = rm.double(), rv.double()
    geo = ([1, 1], [0, 0], [1, 1], 1)
    _, mean, invstd = conv_bn_cuda.forward(x, w, None, None, None, None, rm, rv, *geo, False, True, 0.1, 1e-5)
    _, mean64, invstd64 = ref.forward(x.double(), w.double(), None, None, None, None, rm64, rv64, *geo, False, True,
                                      0.1, 1e-5)
    assert _rel(invstd, invstd64) < 1e-5 and _rel(rv, rv64) < 1e-5
    assert (rm.double() - rm64).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------

def _cuda_ops():
    from resfused.ops import conv_bn as op

    reason = op.unavailable_reason("cuda", torch.device(DEVICE), torch.bfloat16)
    assert reason is None, reason  # on a GPU a missing backend is a failure
    return _ops()


@pytest.mark.cuda
def test_fused_conv_bn_with_differing_tf32_settings():
    """torch.backends.cudnn.conv.fp32_precision = "ieee" with the RNN setting left at "tf32": the legacy
    allowTF32CuDNN() query throws then; the conv-specific one does not, and fp32 convs avoid TF32 engines."""
    _, cbn = _cuda_ops()
    conv, rnn = torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision
    try:
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cudnn.rnn.fp32_precision = "tf32"
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(4, 32, 14, 14, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = torch.randn(32, 32, 3, 3, device="cuda", dtype=dtype) / 17
            scale, shift = torch.rand(32, device="cuda") + 0.5, torch.randn(32, device="cuda") * 0.1
            y, mean, var = cbn.conv_bn_forward(x, w, scale, shift, [1, 1], [1, 1], [1, 1], 1, True)
            a = torch.relu(x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(dtype)
            want = F.conv2d(a.double(), w.double(), padding=1)
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
            torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)
            assert conv_bn_cuda.plan(x, w, True, [1, 1], [1, 1], [1, 1], 1, True, "forward")
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision = conv, rnn


@pytest.mark.cuda
def test_triton_conv_launchers_run_on_the_tensors_device():
    """Tensors on cuda:1 while cuda:0 is current: every Triton conv launcher (conv_bias_act, conv_bn forward,
    backward, tail) computes on cuda:1, giving what the same call gives on cuda:0."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs a second GPU")
    from resfused.triton_kernels import conv_bias_act as cba
    from resfused.triton_kernels import conv_bn as cb

    def run(dev):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 16, 9, 9, generator=gen).to(dev).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(16, 16, 3, 3, generator=gen) / 12).to(dev)
        b = torch.randn(16, generator=gen).to(dev)
        vecs = [torch.randn(16, generator=gen).to(dev) * 0.1, torch.rand(16, generator=gen).to(dev) + 0.5,
                torch.rand(16, generator=gen).to(dev) + 0.5, torch.randn(16, generator=gen).to(dev) * 0.1]
        geo = ([1, 1], [1, 1], [1, 1], 1)
        out = [cba.conv_bias_act(x, w, b, x, None, None, *geo, [1, 1], True)]
        rm, rv = torch.zeros(16, device=dev), torch.ones(16, device=dev)
        y, mean, invstd = cb.forward(x, w, *vecs, rm, rv, *geo, True, True, 0.1, 1e-5)
        out += [y, mean, invstd, rm, rv]
        out += list(cb.backward(torch.randn(y.shape, generator=gen).to(dev).contiguous(
            memory_format=torch.channels_last), x, w, *vecs, *geo, True, True, True, True, True))
        t, mask = cb.tail_forward(y, mean, invstd, vecs[2], vecs[3], x, None, None, None, None, False)
        out += [t, mask]
        torch.cuda.synchronize(dev)
        return [o.cpu() for o in out]

    with torch.cuda.device(0):
        on0 = run(torch.device("cuda:0"))
        on1 = run(torch.device("cuda:1"))
    for a, b in zip(on0, on1):
        assert torch.equal(a, b)


def _resnet50_bf16_convs(batch=8):
    """(x, weight, stride, padding, dilation, groups) of every conv of torchvision's ResNet-50 but the 7x7 stem
    (C_in = 3, which resfused's conv + BN fusion leaves to stock), as a bf16 channels_last model runs them, its
    weights converted with .to(memory_format=channels_last) (1x1 weights keep NCHW-looking strides)."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet50().cuda().to(torch.bfloat16).to(memory_format=torch.channels_last)
    seen, calls = set(), []

    def hook(mod, inputs, _):
        x = inputs[0]
        key = (tuple(x.shape), tuple(mod.weight.shape), mod.stride, mod.padding)
        if mod.in_channels > 3 and key not in seen:
            seen.add(key)
            calls.append((x.detach(), mod.weight.detach(), list(mod.stride), list(mod.padding), list(mod.dilation),
                          mod.groups))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last))
    for h in handles:
        h.remove()
    return calls


@pytest.mark.cuda
def test_every_resnet50_bf16_conv_takes_the_fused_path():
    """Every distinct bf16 conv of ResNet-50 (bottlenecks and downsamples, 1x1 included) plans onto cuDNN's fused
    graph for the forward with statistics (with and without the BN + ReLU prologue) and for wgrad. The 1x1 weights
    here have strides (C, 1, 1, 1) although channels_last: canonicalised, cuDNN sees them as NHWC."""
    _cuda_ops()
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("cuDNN's runtime-fusion engines need sm80+")
    calls = _resnet50_bf16_convs()
    assert any(w.shape[2:] == (1, 1) and w.stride()[2:] == (1, 1) for _, w, *_ in calls)  # the case at issue
    unfused = []
    for x, w, s, p, d, g in calls:
        for prologue in (False, True):
            for what in ("forward", "wgrad"):
                path = conv_bn_cuda.plan(x, w, prologue, s, p, d, g, True, what)
                if not path.startswith("cudnn-graph"):
                    unfused.append((tuple(x.shape), tuple(w.shape), s, prologue, what, path))
    assert not unfused, unfused


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_statistics_exact_at_mean_1e3_std(dtype):
    """On the device, through the fused cuDNN graph (conv + genstats) and the recentring kernel: a 1x1 identity
    conv of channels with |mean| / std from 0 to 1e3 gives the float64 mean and variance of its output."""
    _, cbn = _cuda_ops()
    c = 8
    ratios = [0.0, 1.0, 3.0, 10.0, 100.0, 300.0, 1000.0, 1000.0]
    x = _shifted((16, c, 28, 28), ratios, dtype, seed=3, device="cuda")
    w = torch.eye(c, device="cuda", dtype=dtype).view(c, c, 1, 1).contiguous(memory_format=torch.channels_last)
    y, mean, var = cbn.conv_bn_forward(x, w, None, None, [1, 1], [0, 0], [1, 1], 1, True)
    var64, mean64 = torch.var_mean(y.double(), (0, 2, 3), correction=0)
    assert _rel(var, var64) < 1e-4, (conv_bn_cuda.plan(x, w, False, [1, 1], [0, 0], [1, 1], 1, True, "forward"),
                                     var, var64)
    assert ((mean.double() - mean64).abs() <= 1e-4 * var64.sqrt() + 1e-6 * mean64.abs()).all()


@pytest.mark.cuda
def test_conv_ops_check_arguments_on_cuda_tensors():
    cba, cbn = _cuda_ops()
    a = _cba_args("cuda", residual=torch.empty(2, 16, 1, 9, device="cuda"))
    with pytest.raises(RuntimeError, match="residual must have the output's shape"):
        cba.conv_bias_act(*a.values())
    x = torch.randn(2, 8, 9, 9, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="stride must be positive"):
        cbn.conv_bn_forward(x, torch.randn(8, 8, 3, 3, device="cuda", dtype=torch.bfloat16), None, None, [0, 1],
                            [1, 1], [1, 1], 1, True)


@pytest.mark.cuda
@pytest.mark.parametrize("relu", [True, False], ids=["fused_relu", "unfused_epilogue"])
@pytest.mark.parametrize("layout", ["cl", "nchw"])
def test_conv_bias_act_cuda_rounding_contract(layout, relu):
    """The cuda backend's contract (csrc/conv_bias_act.cu): bias (fp32 given) rounded to bf16 for cuDNN's fused op,
    bias and residual added in fp32 on the unfused path (relu=False always takes it: cuDNN's fused op has a ReLU);
    elementwise, no worse than stock's composition (conv with the bias cast to bf16, add, ReLU) against float64,
    plus 2 ulp of the result."""
    cba, _ = _cuda_ops()
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    gen = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(4, 64, 14, 14, device="cuda", generator=gen).to(torch.bfloat16).contiguous(memory_format=fmt)
    w = (torch.randn(64, 64, 3, 3, device="cuda", generator=gen) / 24).to(torch.bfloat16)
    b = torch.randn(64, device="cuda", generator=gen)
    r = torch.randn(4, 64, 14, 14, device="cuda", generator=gen).to(torch.bfloat16).contiguous(memory_format=fmt)
    y = cba.conv_bias_act(x, w, b, r, None, None, [1, 1], [1, 1], [1, 1], 1, [1, 1], relu)
    act = torch.relu if relu else (lambda t: t)
    want = act(F.conv2d(x.double(), w.double(), b.double(), padding=1) + r.double())
    stock = act(F.conv2d(x, w, b.to(torch.bfloat16), padding=1) + r)
    ulp = torch.finfo(torch.bfloat16).eps * want.abs()
    assert ((y.double() - want).abs() <= 2 * (stock.double() - want).abs() + 2 * ulp + 1e-30).all()


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["cl", "nchw"])
def test_conv_bias_act_cuda_shortcut_rounding(layout):
    """With a projection shortcut the cuda backend rounds the shortcut conv's output to x's dtype and adds the
    residual in it before the epilogue (stated in csrc/conv_bias_act.cu and resfused/reference/conv_bias_act.py):
    elementwise no worse than stock's composition, which rounds at the same points, plus 2 ulp."""
    cba, _ = _cuda_ops()
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    gen = torch.Generator(device="cuda").manual_seed(5)
    bf = torch.bfloat16
    x = torch.randn(4, 64, 14, 14, device="cuda", generator=gen).to(bf).contiguous(memory_format=fmt)
    w = (torch.randn(64, 64, 3, 3, device="cuda", generator=gen) / 24).to(bf)
    b = torch.randn(64, device="cuda", generator=gen)
    sx = torch.randn(4, 32, 28, 28, device="cuda", generator=gen).to(bf).contiguous(memory_format=fmt)
    sw = (torch.randn(64, 32, 1, 1, device="cuda", generator=gen) / 6).to(bf)
    r = torch.randn(4, 64, 14, 14, device="cuda", generator=gen).to(bf).contiguous(memory_format=fmt)
    y = cba.conv_bias_act(x, w, b, r, sx, sw, [1, 1], [1, 1], [1, 1], 1, [2, 2], True)
    d = torch.float64
    want = torch.relu(F.conv2d(x.to(d), w.to(d), b.to(d), padding=1) + F.conv2d(sx.to(d), sw.to(d), stride=2)
                      + r.to(d))
    stock = torch.relu(F.conv2d(x, w, b.to(bf), padding=1) + (F.conv2d(sx, sw, stride=2) + r))
    ulp = torch.finfo(bf).eps * want.abs()
    assert ((y.double() - want).abs() <= 2 * (stock.double() - want).abs() + 2 * ulp + 1e-30).all()


def _launch_guard_report(source: str) -> list[str]:
    """The kernel launches (``name[grid](...)``) of a module that may run outside ``with on_device(t)``: a launch
    is guarded when it sits in such a ``with`` block, or in a module function every call of which is guarded."""
    import ast

    tree = ast.parse(source)
    funcs = {n.name: n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}

    def guard_with(node) -> bool:
        return isinstance(node, ast.With) and any(
            isinstance(i.context_expr, ast.Call) and getattr(i.context_expr.func, "id", "") in ("on_device",
                                                                                                 "_on_device")
            for i in node.items)

    # every node's (enclosing function, inside a guard within that function)
    where: dict[int, tuple[str, bool]] = {}

    def visit(node, func: str, guarded: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name, False)
                continue
            g = guarded or guard_with(child)
            where[id(child)] = (func, g)
            visit(child, func, g)

    visit(tree, "<module>", False)
    calls: dict[str, list[tuple[str, bool]]] = {}
    launches: list[tuple[ast.Call, str, bool]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func, g = where.get(id(node), ("<module>", False))
        if isinstance(node.func, ast.Subscript) and isinstance(node.func.value, ast.Name) \
                and node.func.value.id.endswith("_kernel"):
            launches.append((node, func, g))
        elif isinstance(node.func, ast.Name) and node.func.id in funcs:
            calls.setdefault(node.func.id, []).append((func, g))

    def func_guarded(name: str, seen=frozenset()) -> bool:
        sites = calls.get(name, [])
        if not sites or name in seen:
            return False  # an entry point (or recursion): nothing guards it
        return all(g or func_guarded(caller, seen | {name}) for caller, g in sites)

    return [f"line {node.lineno}: {node.func.value.id} in {func}()" for node, func, g in launches
            if not (g or func_guarded(func))]


def test_every_triton_launch_runs_on_the_tensors_device():
    """CPU check of the cuda:1 defect for machines with one GPU: every Triton kernel launch in triton_kernels/ runs
    under ``with on_device(t)`` (torch.cuda.device(t.device)), directly or through helpers called only there. The
    check itself is tested: a launch taken out of its guard is reported."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent / "triton_kernels"
    sources = {p.name: p.read_text() for p in sorted(root.glob("*.py"))}
    counted = sum(s.count("_kernel[") for s in sources.values())
    assert counted >= 15, "fewer kernel launches found than triton_kernels has: the pattern no longer matches"
    unguarded = {name: _launch_guard_report(s) for name, s in sources.items()}
    assert not any(unguarded.values()), unguarded
    import re

    guards = 0
    for name, s in sources.items():  # each guard taken away, one at a time, is reported
        for m in re.finditer(r"\n( +)with _?on_device\(\w+\):\n", s):
            guards += 1
            mutated = f"{s[:m.start()]}\n{m.group(1)}if True:\n{s[m.end():]}"
            assert _launch_guard_report(mutated), f"{name}: removing the guard at offset {m.start()} went unseen"
    assert guards >= 9
