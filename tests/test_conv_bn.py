"""Fused conv + BatchNorm training path (resfused.ops.conv_bn, convert(fuse_convs=True)) against stock PyTorch.

Op level: conv_bn_forward (BN + ReLU prologue, batch-statistics epilogue, running stats) against an F.conv2d /
F.batch_norm composite per backend; gradcheck of the reference in float64; opcheck on every op.
Block and model level: torchvision BasicBlock/Bottleneck (stride 1 and 2, with and without downsample) and whole
resnet18/resnet50 after convert(fuse_convs=True): two SGD steps give stock's outputs, gradients, parameters and
running stats (float64 tight; float32 within twice stock float32's error against float64), and eval afterwards
gives stock's output.
On CPU the triton backend runs its kernels (forward, backward, tail) in the interpreter.
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resfused
from resfused import _layout
from resfused.nn import ConvBNBasicBlock, ConvBNBottleneck, conv_bn_blocks
from resfused.ops import conv_bn as op

from _oracle import assert_close
from conftest import DEVICE, HAS_CUDA, usable_backends

torchvision = pytest.importorskip("torchvision")
from torchvision.models import resnet  # noqa: E402

# On a GPU every backend, available or not (a missing one fails its tests, see conftest.usable_backends).
BACKENDS = usable_backends(DEVICE, lambda b, d: op.unavailable_reason(b, d, torch.float32))
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def small_tiles(monkeypatch):
    """Interpreter only: 16-wide tiles, so tiny shapes run several row tiles (the Chan merge), K loops, tails."""
    tk = importlib.import_module("resfused.triton_kernels.conv_bn")
    if tk._INTERPRET:
        monkeypatch.setattr(tk, "_FIXED", {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})
        monkeypatch.setattr(tk, "_BWD", {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})
        monkeypatch.setattr(tk, "_TAIL", {"BLOCK_R": 16, "BLOCK_I": 16})


def _nrel(a, b):
    b = b.detach().double()
    return ((a.detach().double() - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------------
# op level
# ---------------------------------------------------------------------------------------------------

# label: (N, C_in, H, W, C_out, kernel, stride, padding, groups); channel counts off the 16-wide test tiles,
# N*Ho*Wo leaves row tails.
CONVS = {
    "1x1": (2, 24, 5, 5, 40, 1, 1, 0, 1),
    "1x1_s2": (2, 24, 6, 7, 40, 1, 2, 0, 1),
    "3x3_s1": (2, 20, 5, 5, 24, 3, 1, 1, 1),
    "3x3_s2": (1, 20, 7, 6, 24, 3, 2, 1, 1),
    "3x3_grouped_narrow": (1, 16, 4, 5, 16, 3, 1, 1, 4),
    "C3": (2, 3, 4, 4, 8, 3, 2, 1, 1),
}


def _conv_inputs(case, dtype, layout, seed=0):
    n, c, h, w, co, k, s, p, g = CONVS[case]
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=gen) * 2 + 1).to(DEVICE, dtype).contiguous(memory_format=LAYOUTS[layout])
    weight = (torch.randn(co, c // g, k, k, generator=gen) / (c // g * k * k) ** 0.5).to(DEVICE, dtype)
    vec = lambda lo, hi, m=c: (torch.rand(m, generator=gen) * (hi - lo) + lo).to(DEVICE)  # noqa: E731
    pro = op.BNParams(vec(-1, 1), vec(0.5, 1.5), vec(0.5, 1.5), vec(-0.5, 0.5), False)
    return x, weight, pro, vec(-0.1, 0.1, co), vec(0.5, 1.5, co), (s, p, g)


def _stock_forward(x, weight, pro, rm, rv, conv_args, dtype, act_dtype=None):
    """F.conv2d(relu(bn(x))) and F.batch_norm's statistics/running stats, all in ``dtype``; with ``act_dtype``
    the activation relu(bn(x)) is rounded to it before the conv (see _rounded)."""
    s, p, g = conv_args
    x = x.to(dtype)
    if pro is not None:
        v = lambda t: t.to(dtype).view(1, -1, 1, 1)  # noqa: E731
        x = _rounded(torch.relu((x - v(pro.mean)) * v(pro.weight * pro.invstd) + v(pro.bias)), act_dtype)
    y = F.conv2d(x, weight.to(dtype), None, s, p, 1, g)
    rm, rv = rm.to(dtype), rv.to(dtype)
    F.batch_norm(y, rm, rv, None, None, True, 0.1, 1e-5)
    var, mean = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
    return y, mean, torch.rsqrt(var + 1e-5), rm, rv


FORWARD_CASES = [("1x1", "nchw", True), ("1x1", "cl", False), ("1x1_s2", "cl", True), ("3x3_s1", "cl", True),
                 ("3x3_s1", "nchw", False), ("3x3_s2", "nchw", True), ("3x3_grouped_narrow", "cl", True),
                 ("C3", "nchw", True)]


@pytest.mark.parametrize("case,layout,prologue", FORWARD_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_stock(backend, case, layout, prologue, small_tiles):
    """y, batch mean/invstd and the running-stats update in float32, within twice stock float32's error."""
    x, weight, pro, rm, rv, conv_args = _conv_inputs(case, torch.float32, layout)
    pro = pro if prologue else None
    ref = _stock_forward(x, weight, pro, rm.clone(), rv.clone(), conv_args, torch.float64)
    stock = _stock_forward(x, weight, pro, rm.clone(), rv.clone(), conv_args, torch.float32)
    s, p, g = conv_args
    y, mean, invstd = op.conv_bn(x, weight, s, p, 1, g, prologue=pro, stats=True, running_mean=rm, running_var=rv,
                                 backend=backend)
    assert y.is_contiguous(memory_format=LAYOUTS[layout]) and y.dtype == torch.float32
    for name, out, r, st in zip(("y", "mean", "invstd", "running_mean", "running_var"), (y, mean, invstd, rm, rv),
                                ref, stock):
        assert_close(name, out, r, torch.float32, st)


# (case, layout, mode): mode "train" = prologue BN with x's batch statistics (differentiated through), "eval" =
# prologue with running statistics (constants), "plain" = no prologue.
BACKWARD_CASES = [("3x3_s1", "cl", "train"), ("3x3_s2", "nchw", "train"), ("1x1_s2", "cl", "train"),
                  ("3x3_grouped_narrow", "nchw", "train"), ("1x1", "cl", "eval"), ("3x3_s2", "cl", "plain"),
                  ("C3", "nchw", "train")]


def _rounded(a, act_dtype):
    """``a`` rounded to ``act_dtype`` (and back), gradients passing straight through; ``a`` when None.

    The half-precision float64 oracle rounds the prologue's activation to the activation dtype, as the contract
    does (resfused/reference/conv_bn.py: what a fused kernel feeds its MMA) and as stock does (relu(bn(x)) is a
    bf16 tensor there). Without it, the float64 conv of the unrounded activation differs from any bf16 pipeline
    by a sum of K independent activation roundings at each output, which cancellation can make many ulps of
    that output and which stock's error at the same element does not predict: an elementwise bound would then
    fail correct kernels at random."""
    if act_dtype is None:
        return a
    return a + (a.detach().to(act_dtype).to(a.dtype) - a.detach())


def _stock_grads(x, weight, pro, gy, conv_args, mode, dtype, act_dtype=None):
    """Gradients of sum(gy * conv2d(relu(F.batch_norm(x)), weight)) w.r.t. x, weight, bn weight, bn bias
    (``act_dtype``: see _rounded)."""
    s, p, g = conv_args
    leaf = lambda t: t.detach().to(dtype).requires_grad_()  # noqa: E731
    x, weight, w, b = leaf(x), leaf(weight), leaf(pro.weight), leaf(pro.bias)
    if mode == "train":
        a = torch.relu(F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5))
    elif mode == "eval":
        rv = (pro.invstd.to(dtype) ** -2) - 1e-5
        a = torch.relu(F.batch_norm(x, pro.mean.to(dtype), rv, w, b, False, 0.0, 1e-5))
    else:
        a = x
    a = _rounded(a, act_dtype) if mode != "plain" else a
    (F.conv2d(a, weight, None, s, p, 1, g) * gy.to(dtype)).sum().backward()
    return x.grad, weight.grad, w.grad, b.grad


@pytest.mark.parametrize("case,layout,mode", BACKWARD_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_matches_stock(backend, case, layout, mode, small_tiles):
    """Gradients of x, the conv weight and the prologue BN's weight and bias in float32 through
    ConvBNFunction (the backend's conv_bn_backward), within twice stock float32's error against float64."""
    x, weight, pro, _, _, conv_args = _conv_inputs(case, torch.float32, layout)
    s, p, g = conv_args
    gy_shape = op.output_shape(x.shape, weight.shape, [s, s], [p, p], [1, 1])
    gy = torch.randn(gy_shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    gy = gy.contiguous(memory_format=LAYOUTS[layout])
    ref = _stock_grads(x, weight, pro, gy, conv_args, mode, torch.float64)
    stock = _stock_grads(x, weight, pro, gy, conv_args, mode, torch.float32)
    xs, ws, bw, bb = (t.detach().clone().requires_grad_() for t in (x, weight, pro.weight, pro.bias))
    prologue = None
    if mode == "train":
        prologue = _batch_params(xs, bw, bb)
    elif mode == "eval":
        prologue = op.BNParams(pro.mean, pro.invstd, bw, bb, False)
    y, _, _ = op.conv_bn(xs, ws, s, p, 1, g, prologue=prologue, backend=backend)
    (y * gy).sum().backward()
    names = ("grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias")
    for name, t, r, st in zip(names, (xs, ws, bw, bb), ref, stock):
        if r is None:
            assert t.grad is None, name
            continue
        assert t.grad.stride() == t.stride(), name
        assert_close(name, t.grad, r, torch.float32, st)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision(backend, dtype, small_tiles):
    """fp16/bf16 input (fp32 statistics and accumulation): forward outputs and all gradients, elementwise within
    twice the error of stock PyTorch in that dtype (or 2 ulps) against float64 with the activation rounded as
    the contract rounds it (_rounded)."""
    if backend == "triton" and dtype == torch.bfloat16 and _interpreted():
        # Strict expected failure: Triton's interpreter (triton 3.8) casts fp32 -> bf16 by truncation
        # (runtime/interpreter.py cast_impl passes no rounding mode to _convert_float), so the prologue's
        # activation, z.to(a.dtype) in triton_kernels/conv_bn.py _prologue, is rounded toward zero instead of
        # to nearest: every activation is biased by up to one bf16 ulp, and y by a sum of those (observed:
        # 6e-3 at |y| = 0.1, 12x stock's error there). A GPU rounds to nearest. Fails here when that is fixed.
        try:
            _half_precision(backend, dtype)
        except AssertionError as e:
            pytest.xfail(f"Triton interpreter truncates fp32 -> bf16 casts: {str(e)[:200]}")
        pytest.fail("the interpreter's bf16 truncation no longer breaks this check: remove the expected failure")
    _half_precision(backend, dtype)


def _interpreted() -> bool:
    return importlib.import_module("resfused.triton_kernels.conv_bn")._INTERPRET


def _half_precision(backend, dtype):
    """test_half_precision's checks."""
    x, weight, pro, rm, rv, conv_args = _conv_inputs("3x3_s2", dtype, "cl")
    s, p, g = conv_args
    rm0, rv0 = rm.clone(), rv.clone()
    ref = _stock_forward(x, weight, pro, rm.clone(), rv.clone(), conv_args, torch.float64, act_dtype=dtype)
    stock = _stock_forward(x, weight, pro, rm.clone(), rv.clone(), conv_args, dtype)
    outs = op.conv_bn(x, weight, s, p, 1, g, prologue=pro, stats=True, running_mean=rm, running_var=rv,
                      backend=backend)
    assert outs[0].dtype == dtype and outs[1].dtype == torch.float32
    assert_close("y", outs[0], ref[0], dtype, stock[0])
    # The statistics are float32 results: held to float32's floor, against stock's float32 statistics of its
    # own rounded y (F.batch_norm on half-precision input accumulates in float32; stock's half-precision
    # var_mean would round them to the dtype and pass a 1 % error in a channel).
    y32 = stock[0].float()
    rm32, rv32 = rm0.clone(), rv0.clone()
    F.batch_norm(y32, rm32, rv32, None, None, True, 0.1, 1e-5)
    var32, mean32 = torch.var_mean(y32, dim=(0, 2, 3), unbiased=False)
    for name, out, r, st in zip(("mean", "invstd", "running_mean", "running_var"), (*outs[1:], rm, rv), ref[1:],
                                (mean32, torch.rsqrt(var32 + 1e-5), rm32, rv32)):
        assert_close(name, out, r, torch.float32, st)
    gy = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    ref = _stock_grads(x, weight, pro, gy, conv_args, "train", torch.float64, act_dtype=dtype)
    stock = _stock_grads(x, weight, pro, gy, conv_args, "train", dtype)
    xs, ws = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    bw, bb = pro.weight.detach().clone().requires_grad_(), pro.bias.detach().clone().requires_grad_()
    y, _, _ = op.conv_bn(xs, ws, s, p, 1, g, prologue=_batch_params(xs.float(), bw, bb), backend=backend)
    (y.float() * gy.float()).sum().backward()
    for name, t, r, st in zip(("grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias"), (xs, ws, bw, bb), ref,
                              stock):
        assert t.grad.dtype == t.dtype, name
        assert_close(name, t.grad, r, dtype, st)


# C and H*W off the tile and byte boundaries; a plane of 16 pixels takes the NCHW Triton tail's other way of loading
# the per-channel vectors (triton_kernels/conv_bn.py::_nchw_once).
TAIL_SHAPES = {"hw15": (2, 20, 5, 3), "hw16": (2, 20, 4, 4)}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual_bn", [False, True], ids=["identity", "projection"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", TAIL_SHAPES.values(), ids=TAIL_SHAPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_tail_matches_stock(backend, shape, layout, residual_bn, training, small_tiles):
    """relu(bn(y) + residual) / relu(bn(y) + bn_d(residual)): output, the packed mask (bit-identical to
    resfused._layout.pack_mask of the output's sign) and the gradients of y, residual and both BNs' weight and
    bias in float32, within twice stock float32's error against float64."""
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(shape, generator=gen).to(DEVICE).contiguous(memory_format=LAYOUTS[layout])
    r = torch.randn(shape, generator=gen).to(DEVICE).contiguous(memory_format=LAYOUTS[layout])
    vecs = [(torch.rand(20, generator=gen) + 0.5).to(DEVICE) for _ in range(4)]
    run_mean, run_var = [(torch.rand(20, generator=gen) * 0.4 - 0.2).to(DEVICE) for _ in range(2)]
    run_var = run_var + 1.0
    gy = torch.randn(shape, generator=gen).to(DEVICE)

    def stock(dtype):
        ts = [t.detach().to(dtype).requires_grad_() for t in (y, r, *vecs)]
        yy, rr, w, b, rw, rb = ts
        bn = lambda t, ww, bb: F.batch_norm(t, None if training else run_mean.to(dtype),  # noqa: E731
                                            None if training else run_var.to(dtype), ww, bb, training, 0.0, 1e-5)
        out = torch.relu(bn(yy, w, b) + (bn(rr, rw, rb) if residual_bn else rr))
        (out * gy.to(dtype)).sum().backward()
        return out, [t.grad for t in ts]

    (ref_out, ref_grads), (st_out, st_grads) = stock(torch.float64), stock(torch.float32)
    ts = [t.detach().clone().requires_grad_() for t in (y, r, *vecs)]
    yy, rr, w, b, rw, rb = ts

    def params(t, ww, bb):
        if training:
            return _batch_params(t, ww, bb)
        return op.BNParams(run_mean, torch.rsqrt(run_var + 1e-5), ww, bb, False)

    out = op.bn_add_relu_tail(yy, params(yy, w, b), rr, params(rr, rw, rb) if residual_bn else None, backend=backend)
    assert out.is_contiguous(memory_format=LAYOUTS[layout])
    assert_close("out", out, ref_out, torch.float32, st_out)
    _, mask = torch.ops.resfused.conv_bn_tail_forward(yy.detach(), *params(yy, w, b)[:4], rr.detach(),
                                                      *(params(rr, rw, rb)[:4] if residual_bn else (None,) * 4),
                                                      residual_bn, backend)
    assert torch.equal(mask, _layout.pack_mask(out.detach() > 0, _layout.layout_of(out)))
    (out * gy).sum().backward()
    for name, t, rg, sg in zip(("y", "residual", "weight", "bias", "res_weight", "res_bias"), ts, ref_grads,
                               st_grads):
        if rg is None:
            assert t.grad is None, name
            continue
        assert_close(f"grad {name}", t.grad, rg, torch.float32, sg)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_is_zero_after_the_activation(backend, small_tiles):
    """A 3x3 conv of relu(0 * x + 1) == ones: border outputs see zero padding, not relu(bias) = 1."""
    x = torch.randn(1, 4, 5, 5, device=DEVICE)
    ones = torch.ones(4, device=DEVICE)
    pro = op.BNParams(torch.zeros(4, device=DEVICE), ones, torch.zeros(4, device=DEVICE), ones, False)
    weight = torch.ones(2, 4, 3, 3, device=DEVICE)
    y, _, _ = op.conv_bn(x, weight, 1, 1, prologue=pro, backend=backend)
    expected = F.conv2d(torch.ones(1, 4, 5, 5, device=DEVICE), weight, padding=1)
    assert expected[0, 0, 0, 0] == 16 and expected[0, 0, 2, 2] == 36
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_statistics_are_deterministic(backend, small_tiles):
    """Bit-identical reruns: always on triton (no float atomics); on cuda under torch.use_deterministic_algorithms,
    which makes it skip cuDNN engines with the non-deterministic note."""
    x, weight, pro, rm, rv, (s, p, g) = _conv_inputs("3x3_s1", torch.float32, "cl")
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(backend == "cuda" or saved)
    try:
        a = op.conv_bn(x, weight, s, p, 1, g, prologue=pro, stats=True, backend=backend)
        b = op.conv_bn(x, weight, s, p, 1, g, prologue=pro, stats=True, backend=backend)
    finally:
        torch.use_deterministic_algorithms(saved)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.fixture
def tiny_tiles(monkeypatch):
    """16-row tiles for the Triton forward and backward kernels, in the interpreter and on a GPU with one fixed
    config (tests/conftest.py), so tiny shapes run several row tiles there too; skips when autotuning."""
    if "triton" not in BACKENDS:
        pytest.skip("needs the triton backend")
    tk = importlib.import_module("resfused.triton_kernels.conv_bn")
    if not tk._INTERPRET and not tk._FIXED:
        pytest.skip("the forward kernel is autotuned (RESFUSED_TRITON_AUTOTUNE=1): its tiles cannot be fixed")
    gpu = {} if tk._INTERPRET else {"num_warps": 4, "num_stages": 2}
    monkeypatch.setattr(tk, "_FIXED", {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, **gpu})
    monkeypatch.setattr(tk, "_BWD", {**tk._BWD, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})
    monkeypatch.setattr(tk, "_STATS_M", 16)
    return tk


@pytest.mark.parametrize("stats_m", [16, 8], ids=["one-per-program", "two-per-program"])
def test_two_level_statistics_merge(monkeypatch, tiny_tiles, stats_m):
    """More statistics tiles than _STATS_CHUNK (4 tiles of 16 rows in chunks of 3, the last one partial): the
    two-level merge gives the single-level statistics and running stats up to fp32 rounding, and the same y.
    "two-per-program": 8-row statistics tiles inside 16-row program tiles (as on a GPU, where BLOCK_M is a multiple
    of _STATS_M), 7 partials, the last one of 2 rows."""
    tk = tiny_tiles
    monkeypatch.setattr(tk, "_STATS_M", stats_m)
    x, weight, pro, rm, rv, (s, p, g) = _conv_inputs("3x3_s1", torch.float32, "cl")
    assert x.shape[0] * x.shape[2] * x.shape[3] == 50  # 4 row tiles of 16 rows; 7 of 8
    runs = []
    for chunk in (1 << 30, 3):
        monkeypatch.setattr(tk, "_STATS_CHUNK", chunk)
        rm_c, rv_c = rm.clone(), rv.clone()
        y, mean, invstd = op.conv_bn(x, weight, s, p, 1, g, prologue=pro, stats=True, running_mean=rm_c,
                                     running_var=rv_c, backend="triton")
        runs.append((y, mean, invstd, rm_c, rv_c))
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1:], runs[1][1:]):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)
    ref = _stock_forward(x, weight, pro, rm.clone(), rv.clone(), (s, p, g), torch.float64)
    for out, r in zip(runs[1][1:], ref[1:]):
        torch.testing.assert_close(out.double(), r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case,layout", [("3x3_s1", "cl"), ("1x1_s2", "nchw")])
def test_wgrad_split_k(monkeypatch, tiny_tiles, case, layout):
    """wgrad split over the rows (several fp32 partials summed) gives the unsplit gradient to fp32 rounding,
    within twice stock float32's error, and the same bits on a rerun."""
    tk = tiny_tiles
    x, weight, pro, _, _, (s, p, g) = _conv_inputs(case, torch.float32, layout)
    y, _, _ = op.conv_bn(x, weight, s, p, 1, g, prologue=pro, backend="triton")
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    gy = gy.contiguous(memory_format=LAYOUTS[layout])
    args = (gy, x, weight, *pro[:4], [s, s], [p, p], [1, 1], g, True, False, False, True, False)
    m = gy.shape[0] * gy.shape[2] * gy.shape[3]
    monkeypatch.setattr(tk, "_WGRAD_MIN_ITERS", 1)
    grads = []
    for target, splits in ((1, 1), (1 << 20, triton_cdiv(m, 16)), (1 << 20, triton_cdiv(m, 16))):
        monkeypatch.setattr(tk, "_WGRAD_TARGET_PROGRAMS", target)
        assert triton_cdiv(m, tk._wgrad_rows_per_split(m, 2, 16, x.device)) == splits
        grads.append(tk.backward(*args)[1])
    assert triton_cdiv(m, 16) >= 2  # several splits ran
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(grads[1], grads[2])
    ref = _stock_grads(x, weight, pro, gy, (s, p, g), "eval", torch.float64)[1]
    stock = _stock_grads(x, weight, pro, gy, (s, p, g), "eval", torch.float32)[1]
    assert_close("grad_weight", grads[1], ref, torch.float32, stock)


def triton_cdiv(a, b):
    return -(-a // b)


_GPU_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import resfused.triton_kernels.conv_bn as k

geo = dict(STRIDE_H=2, STRIDE_W=2, PAD_H=1, PAD_W=1, DIL_H=1, DIL_W=1, KH=3, KW=3, PROLOGUE=True,
           INPUT_PRECISION="ieee", DOT_IN_FP64=False, INDEX64=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)
tail = dict(RES_BN=True, CHANNELS_LAST=True, INDEX64=False, BLOCK_R=32, BLOCK_I=64)
kernels = (
    (k._conv_bn_fwd_kernel, dict(geo, STATS=True, FLAT_K=False, STATS_M=64, STATS_LOG2=6)),
    (k._bn_stats_merge_kernel, dict(BLOCK_C=128)),
    (k._bn_stats_finalize_kernel, dict(UPDATE_RUNNING=True, BLOCK_C=128)),
    (k._conv_bn_wgrad_kernel, geo),
    (k._conv_bn_dgrad_kernel, geo),
    (k._bn_input_grad_kernel, dict(TRAINING=True, CHANNELS_LAST=True, INDEX64=False, BLOCK_R=32, BLOCK_I=64)),
    (k._tail_fwd_kernel, tail),
    (k._tail_bwd_reduce_kernel, tail),
    (k._tail_bwd_elementwise_kernel, dict(tail, WRITE_Y=True, WRITE_R=True, TRAINING=True, RES_TRAINING=True)),
)
bf16 = {"x_ptr", "w_ptr", "dy_ptr", "y_ptr", "r_ptr", "out_ptr", "gz_ptr", "g_ptr", "gy_out_ptr", "gr_out_ptr"}
floats = {"momentum", "eps", "inv_n"}
for fn, consts in kernels:
    names = fn.arg_names
    constexpr = {n for n, p in zip(names, fn.params) if p.is_constexpr}
    def kind(n):
        if n in constexpr:
            return "constexpr"
        if n.endswith("_ptr"):
            return "*bf16" if n in bf16 else ("*u8" if n == "mask_ptr" else "*fp32")
        return "fp32" if n in floats else "i32"
    src = ASTSource(fn=fn, signature={n: kind(n) for n in names},
                    constexprs={(names.index(n),): v for n, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
    print(fn.__name__, "ok", len(compiled.asm["ptx"]))
"""


def test_triton_kernels_compile_for_gpu():
    """Every Triton kernel of the fused conv path (forward conv, statistics merge and finalize, split-K wgrad,
    dgrad, input grad, the tail's three) lowers to PTX for sm_90 without a GPU, bf16 activations (in a subprocess
    without TRITON_INTERPRET): what the interpreter cannot check (dot shapes and dtypes, dynamic loop bounds,
    stores of mixed dtypes)."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _GPU_COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0 and ("ptxas" in proc.stderr and "not found" in proc.stderr.lower()):
        pytest.skip(f"no ptxas for Triton's NVIDIA backend: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(" ok ") == 9


def _batch_params(t, w, b):
    with torch.no_grad():
        var, mean = torch.var_mean(t, dim=(0, 2, 3), unbiased=False)
    return op.BNParams(mean, torch.rsqrt(var + 1e-5), w, b, True)


def test_gradcheck_conv_with_prologue_float64():
    """The consumer differentiates its prologue BN through the batch statistics of its input."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, generator=gen, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(2, generator=gen, dtype=torch.float64).mul(0.3).requires_grad_()

    def f(x, weight, w, b):
        y, _, _ = op.conv_bn(x, weight, 2, 1, prologue=_batch_params(x, w, b), backend="reference")
        return y

    assert torch.autograd.gradcheck(f, (x, weight, w, b), fast_mode=True)


@pytest.mark.parametrize("residual_bn", [False, True], ids=["identity", "projection"])
def test_gradcheck_tail_float64(residual_bn):
    gen = torch.Generator().manual_seed(1)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_()  # noqa: E731
    y, r = mk(2, 3, 3, 3), mk(2, 3, 3, 3)
    w, b, rw, rb = mk(3), mk(3), mk(3), mk(3)

    def f(y, r, w, b, rw, rb):
        return op.bn_add_relu_tail(y, _batch_params(y, w, b), r, _batch_params(r, rw, rb) if residual_bn else None,
                                   backend="reference")

    assert torch.autograd.gradcheck(f, (y, r, w, b, rw, rb))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, small_tiles):
    """Every op, every backend."""
    for case, layout in (("C3", "cl"), ("C3", "nchw")):
        x, weight, pro, rm, rv, (s, p, g) = _conv_inputs(case, torch.float32, layout)
        for prologue, stats in ((True, True), (False, True), (True, False)):
            fargs = (x, weight, *(pro[:4] if prologue else (None,) * 4), rm if stats else None,
                     rv if stats else None, [s, s], [p, p], [1, 1], g, prologue, stats, 0.1, 1e-5, backend)
            torch.library.opcheck(torch.ops.resfused.conv_bn_forward.default, fargs)
        y, _, _ = torch.ops.resfused.conv_bn_forward(x, weight, *pro[:4], None, None, [s, s], [p, p], [1, 1], g, True,
                                                     False, 0.1, 1e-5, backend)
        bargs = (torch.randn_like(y), x, weight, *pro[:4], [s, s], [p, p], [1, 1], g, True, True, True, True, True,
                 backend)
        torch.library.opcheck(torch.ops.resfused.conv_bn_backward.default, bargs)
        c = y.shape[1]
        bn = op.BNParams(*(torch.rand(c, device=DEVICE) + 0.5 for _ in range(4)), True)
        for residual_bn in (False, True):
            rbn = bn[:4] if residual_bn else (None,) * 4
            targs = (y, *bn[:4], torch.randn_like(y), *rbn, residual_bn, backend)
            torch.library.opcheck(torch.ops.resfused.conv_bn_tail_forward.default, targs)
            out, mask = torch.ops.resfused.conv_bn_tail_forward(*targs)
            tb = (torch.randn_like(out), mask, y, *bn[:3], torch.randn_like(y), *rbn[:3], residual_bn, True, True,
                  True, True, True, True, backend)
            torch.library.opcheck(torch.ops.resfused.conv_bn_tail_backward.default, tb)


def test_bad_input_changes_nothing():
    x, weight, pro, rm, rv, (s, p, g) = _conv_inputs("1x1", torch.float32, "nchw")
    rm0, rv0 = rm.clone(), rv.clone()
    bad = op.BNParams(pro.mean[:3], pro.invstd, pro.weight, pro.bias, True)
    with pytest.raises(ValueError, match=r"prologue.mean must have shape \(24,\)"):
        op.conv_bn(x, weight, prologue=bad, stats=True, running_mean=rm, running_var=rv)
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        op.conv_bn(x, weight.double(), stats=True, running_mean=rm, running_var=rv)
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="unavailable for conv_bn"):
            op.conv_bn(x, weight, stats=True, running_mean=rm, running_var=rv, backend="cuda")
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


# ---------------------------------------------------------------------------------------------------
# blocks and models against stock torchvision
# ---------------------------------------------------------------------------------------------------

# label: (block, inplanes, planes, stride, downsample, groups); the input is (4, inplanes, 8, 8).
BLOCKS = {
    "basic_s1": (resnet.BasicBlock, 8, 8, 1, False, 1),
    "basic_s2_ds": (resnet.BasicBlock, 8, 16, 2, True, 1),
    "bottleneck_s1": (resnet.Bottleneck, 16, 4, 1, False, 1),
    "bottleneck_s1_ds": (resnet.Bottleneck, 8, 4, 1, True, 1),
    "bottleneck_s2_ds": (resnet.Bottleneck, 16, 8, 2, True, 1),
    "bottleneck_grouped_s2_ds": (resnet.Bottleneck, 16, 4, 2, True, 4),  # resnext-style grouped 3x3
}


def _randomize_bns(model, gen):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) * 0.4 - 0.2)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


def _block(label, seed=0):
    cls, inplanes, planes, stride, ds, groups = BLOCKS[label]
    torch.manual_seed(seed)
    downsample = None
    if ds:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * cls.expansion, 1, stride, bias=False),
                                   nn.BatchNorm2d(planes * cls.expansion))
    block = cls(inplanes, planes, stride, downsample, groups=groups)
    return _randomize_bns(block, torch.Generator().manual_seed(seed)).to(DEVICE)


def _train(model, x, loss_fn, steps=2):
    """``steps`` SGD steps; returns the outputs, the last step's gradients and the eval output afterwards."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outs = []
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        loss_fn(out).backward()
        outs.append(out.detach())
        opt.step()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        outs.append(model(x))
    model.train()
    return outs, grads


def _compare_float64(ours, stock, x, loss_fn, rtol):
    (outs_o, grads_o), (outs_s, grads_s) = _train(ours, x, loss_fn), _train(stock, x, loss_fn)
    for i, (a, b) in enumerate(zip(outs_o, outs_s)):
        assert _nrel(a, b) < rtol, f"output {i} (last = eval after training): {_nrel(a, b):.2e}"
    for n, g in grads_o.items():
        assert _nrel(g, grads_s[n]) < rtol, f"grad {n}: {_nrel(g, grads_s[n]):.2e}"
    sd_stock = stock.state_dict()
    assert list(ours.state_dict()) == list(sd_stock)
    for k, v in ours.state_dict().items():
        if v.is_floating_point():
            assert _nrel(v, sd_stock[k]) < rtol, f"{k}: {_nrel(v, sd_stock[k]):.2e}"
        else:
            assert torch.equal(v, sd_stock[k]), k


def _input(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(DEVICE)


def _block_loss(out):
    gen = torch.Generator().manual_seed(3)
    return (out * torch.randn(out.shape, generator=gen).to(out)).sum()


@pytest.mark.parametrize("label", list(BLOCKS))
def test_block_two_sgd_steps_float64(label):
    cls, inplanes = BLOCKS[label][0], BLOCKS[label][1]
    x = _input(4, inplanes, 8, 8, dtype=torch.float64)
    stock = _block(label).double()
    ours = resfused.convert(_block(label).double(), backend="reference", fuse_convs=True)
    assert type(ours) is (ConvBNBasicBlock if cls is resnet.BasicBlock else ConvBNBottleneck)
    _compare_float64(ours, stock, x, _block_loss, 1e-10)


def _check_2x_stock(name, ours, ref, stock, floor=1e-5):
    """Norm-relative error against float64 at most twice stock float32's + ``floor`` (as tests/test_convert.py):
    the gradients of 4-channel BN weights, two steps and three BN backwards deep, are sums with heavy
    cancellation whose float32 error varies several-fold with the summation order, too noisy for
    tests/_oracle.py's max-error form. A wrong formula shows up as errors of 1e-3 and more."""
    err, bound = _nrel(ours, ref), _nrel(stock, ref)
    assert err <= 2 * bound + floor, f"{name}: {err:.2e} vs stock {bound:.2e}"


# On CPU only the triton backend runs the float32 block and net tests (the reference's semantics are checked in
# float64, and op by op in float32); on a GPU every backend does.
FP32_BACKENDS = BACKENDS if HAS_CUDA else BACKENDS[-1:]
FP32_BLOCK_CASES = [(label, layout) for label in ("basic_s2_ds", "bottleneck_s1", "bottleneck_s2_ds")
                    for layout in LAYOUTS] + [("bottleneck_grouped_s2_ds", "cl")]


@pytest.mark.parametrize("label,layout", FP32_BLOCK_CASES)
@pytest.mark.parametrize("backend", FP32_BACKENDS)
def test_block_two_sgd_steps_float32(backend, label, layout):
    """float32 against stock float64: every output (incl. eval after training), gradient, parameter and running
    stat within twice stock float32's error."""
    _two_steps_against_stock(backend, label, layout)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("label", ["basic_s2_ds", "bottleneck_s2_ds"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_block_two_sgd_steps_autocast(backend, label, dtype):
    """float32 parameters under autocast(fp16/bf16), channels_last, against stock float64: within twice the error
    of stock under the same autocast."""
    _two_steps_against_stock(backend, label, "cl", dtype)


@pytest.mark.parametrize("label", ["bottleneck_s1_ds", "basic_s1", "bottleneck_grouped_s2_ds"])
def test_recompute_two_sgd_steps_float64(label):
    """recompute=True (the last conv's output recomputed in backward, not saved): stock's results in float64."""
    x = _input(4, BLOCKS[label][1], 8, 8, dtype=torch.float64)
    ours = resfused.convert(_block(label).double(), backend="reference", fuse_convs=True, recompute=True)
    assert ours.recompute and "recompute" in repr(ours)
    _compare_float64(ours, _block(label).double(), x, _block_loss, 1e-10)


@pytest.mark.parametrize("label", ["bottleneck_s2_ds", "basic_s2_ds"])
@pytest.mark.parametrize("backend", FP32_BACKENDS)
def test_recompute_two_sgd_steps_float32(backend, label):
    """recompute=True on the fast backends: within twice stock float32's error, channels_last."""
    _two_steps_against_stock(backend, label, "cl", recompute=True)


def test_recompute_needs_fuse_convs_and_a_matching_spec():
    with pytest.raises(ValueError, match="recompute=True needs fuse_convs=True"):
        resfused.convert(_block("basic_s1"), recompute=True)
    x, weight, pro, _, _, (s, p, g) = _conv_inputs("3x3_s1", torch.float32, "cl")
    y, mean, invstd = op.conv_bn(x, weight, s, p, 1, g, prologue=pro, stats=True)
    bn = op.BNParams(mean, invstd, torch.ones_like(mean), torch.zeros_like(mean), True)
    wrong = op.ConvSpec(x, weight, 2, p, 1, g, pro, True)  # stride 2: not the conv that made y
    with pytest.raises(ValueError, match="recompute_from does not describe the conv that produced y"):
        op.bn_add_relu_tail(y, bn, torch.zeros_like(y), recompute_from=wrong)
    with pytest.raises(TypeError, match="recompute_from must be a resfused.ops.conv_bn.ConvSpec"):
        op.bn_add_relu_tail(y, bn, torch.zeros_like(y), recompute_from=(x, weight))


@pytest.mark.parametrize("recompute", [False, True], ids=["save", "recompute"])
def test_fused_block_compiles_fullgraph(recompute):
    """torch.compile(fullgraph=True, backend="aot_eager") of a fused bottleneck: no graph break, eager's outputs
    and gradients."""
    label = "bottleneck_s1_ds"
    x = _input(4, BLOCKS[label][1], 8, 8)
    blocks = [resfused.convert(_block(label), backend="reference", fuse_convs=True, recompute=recompute)
              for _ in range(2)]
    compiled = torch.compile(blocks[0], backend="aot_eager", fullgraph=True)
    outs = []
    for run, block in ((compiled, blocks[0]), (blocks[1], blocks[1])):
        out = run(x.clone().requires_grad_())
        _block_loss(out).backward()
        outs.append((out.detach(), [p.grad for p in block.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b)


def _two_steps_against_stock(backend, label, layout, autocast_dtype=None, recompute=False):
    inplanes = BLOCKS[label][1]
    fmt = LAYOUTS[layout]
    x = _input(4, inplanes, 8, 8).contiguous(memory_format=fmt)
    runs = {}
    for key, dtype in (("ref", torch.float64), ("stock", torch.float32), ("ours", torch.float32)):
        model = _block(label).to(dtype=dtype, memory_format=fmt)
        if key == "ours":
            model = resfused.convert(model, backend=backend, fuse_convs=True, recompute=recompute)
        cast = autocast_dtype is not None and key != "ref"
        with torch.autocast(DEVICE.type, dtype=autocast_dtype or torch.bfloat16, enabled=cast):
            runs[key] = (*_train(model, x.to(dtype), _block_loss), model.state_dict())
    out_fmt = fmt if backend == "reference" else torch.channels_last  # see conv_bn_blocks.to_kernel_layout
    for i in range(3):
        assert runs["ours"][0][i].is_contiguous(memory_format=out_fmt)
        _check_2x_stock(f"output {i}", runs["ours"][0][i], runs["ref"][0][i], runs["stock"][0][i])
    for what, idx in (("grad", 1), ("state", 2)):
        for k, r in runs["ref"][idx].items():
            if not r.is_floating_point():
                assert torch.equal(runs["ours"][idx][k], r), k
            else:
                _check_2x_stock(f"{what} {k}", runs["ours"][idx][k], r, runs["stock"][idx][k])


def test_running_stats_semantics_float64():
    """momentum=None (cumulative average via num_batches_tracked), a BN left in eval mode inside a training block
    (frozen: running stats applied, not updated), three steps."""
    def prepare(block):
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        block.train()
        block.bn2.eval()
        return block

    x = _input(4, 16, 8, 8, dtype=torch.float64)
    stock = prepare(_block("bottleneck_s2_ds").double())
    ours = prepare(resfused.convert(_block("bottleneck_s2_ds").double(), backend="reference", fuse_convs=True))
    for _ in range(3):
        for m in (stock, ours):
            m.zero_grad()
            _block_loss(m(x)).backward()
    sd_stock = stock.state_dict()
    assert sd_stock["bn1.num_batches_tracked"].item() == 3 and sd_stock["bn2.num_batches_tracked"].item() == 0
    for k, v in ours.state_dict().items():
        assert (_nrel(v, sd_stock[k]) < 1e-12) if v.is_floating_point() else torch.equal(v, sd_stock[k]), k
    for (n, p), q in zip(ours.named_parameters(), stock.parameters()):
        assert _nrel(p.grad, q.grad) < 1e-10, n


def _model(name, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = getattr(torchvision.models, name)(num_classes=10)
    return _randomize_bns(m, torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _ce(target):
    return lambda out: F.cross_entropy(out.float(), target)


def _relu_margin(model, x, training=True) -> float:
    """The smallest |ReLU input| over every ReLU of ``model``'s training (or eval) forward on ``x``, in units of
    the std of that input's channel (how far the least clear ReLU decision is from a flip). The training forward
    updates the running statistics: pass a model that is thrown away after."""
    margins = []

    def hook(mod, args):
        t = args[0].detach()
        std = t.transpose(0, 1).reshape(t.shape[1], -1).std(dim=1).clamp_min(1e-30).view(1, -1, 1, 1)
        margins.append(float((t.abs() / std).min()))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    try:
        with torch.no_grad():
            model.train(training)(x)
    finally:
        for h in handles:
            h.remove()
        model.train()
    return min(margins)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_two_sgd_steps_float64(name):
    """Whole nets in float64: outputs, gradients, parameters, running stats and the eval output after training
    equal stock to 1e-6 (norm-relative, as tests/test_convert.py: BN over 4 values per channel in layer4 is
    ill-conditioned, and the eval output after training is ~1e30 for both)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64).to(DEVICE)
    target = torch.randint(0, 10, (4,), generator=gen).to(DEVICE)
    ours = resfused.convert(_model(name, torch.float64), backend="reference", fuse_convs=True)
    assert not any(type(m) in (resnet.BasicBlock, resnet.Bottleneck) for m in ours.modules())
    _compare_float64(ours, _model(name, torch.float64), x, _ce(target), 1e-6)


@pytest.mark.parametrize("backend", FP32_BACKENDS)
def test_resnet18_sgd_step_float32(backend):
    """float32 resnet18, one SGD step (as tests/test_convert.py): output, the whole gradient, running stats and
    the eval output afterwards within twice stock float32's norm-relative error against float64 (+1e-5).

    Not two steps: on these inputs (BN over 4 values per channel in layer4) stock float32's own error against
    float64 after a second step is 2-19% for the gradients (measured, three seeds): ReLU flips at rounding level
    are amplified, so any two float32 implementations disagree that much. Two steps are checked in float64 on
    whole nets and in float32 on blocks above.

    The input must be well posed for float32: no ReLU input of the float64 run within 1e-5 of its channel's std
    of zero, in the training forward and in the eval forward after the step (both asserted), else which side of
    zero float32 rounds it to is luck, and one flipped ReLU early in the net moves every gradient before it by
    about 1 %. Input seed 0 has one at 2.9e-7 std in layer2.0.bn1's training forward, which stock float32 itself
    flips in channels_last (5.1e-3 on the eval output against 8e-5 in NCHW). Seed 1 has 1.6e-5 there but 6.0e-6
    in the eval forward after the step, where stock float32 is 3.3e-5 off in NCHW and 6.9e-5 in channels_last,
    and whether a summation order flips it depends on the CPU's BLAS (the interpreter's dots). Of seeds 1-15
    only seed 5 clears both (2.2e-5 and 2.3e-5 std).
    """
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 32, 32, generator=gen).to(DEVICE)
    target = torch.randint(0, 10, (4,), generator=gen).to(DEVICE)
    assert _relu_margin(_model("resnet18", torch.float64), x.double()) > 1e-5
    runs = {}
    for key, dtype in (("ref", torch.float64), ("stock", torch.float32), ("ours", torch.float32)):
        model = _model("resnet18", dtype)
        if key == "ours":
            model = resfused.convert(model, backend=backend, fuse_convs=True)
        runs[key] = (*_train(model, x.to(dtype), _ce(target), steps=1), model.state_dict())
        if key == "ref":
            assert _relu_margin(model, x.double(), training=False) > 1e-5
    for i, what in enumerate(("output", "eval output after the step")):
        _check_2x_stock(what, runs["ours"][0][i], runs["ref"][0][i], runs["stock"][0][i])
    flat = {k: torch.cat([g.double().flatten() for _, g in sorted(r[1].items())]) for k, r in runs.items()}
    _check_2x_stock("gradients", flat["ours"], flat["ref"], flat["stock"])
    for k, v in runs["ours"][2].items():
        if not v.is_floating_point():
            assert torch.equal(v, runs["ref"][2][k]), k
        elif "running" in k:
            _check_2x_stock(k, v, runs["ref"][2][k], runs["stock"][2][k])


# ---------------------------------------------------------------------------------------------------
# convert / revert and saved tensors
# ---------------------------------------------------------------------------------------------------

def test_convert_fuse_convs_keys_and_revert():
    stock = _model("resnet50")
    ours = resfused.convert(_model("resnet50"), fuse_convs=True)
    assert isinstance(ours.layer1[0], ConvBNBottleneck) and isinstance(ours.layer2[1], ConvBNBottleneck)
    assert list(ours.state_dict()) == list(stock.state_dict())
    ids = {id(p) for p in ours.parameters()}
    back = resfused.revert(ours)
    assert ids == {id(p) for p in back.parameters()}
    assert type(back.layer1[0]) is resnet.Bottleneck and not any(
        isinstance(m, (ConvBNBasicBlock, ConvBNBottleneck)) for m in back.modules())
    block = resfused.convert(_block("basic_s2_ds"), fuse_convs=True)
    assert type(block) is ConvBNBasicBlock
    back = resfused.revert(block)
    assert type(back) is resnet.BasicBlock
    x = _input(2, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), _block("basic_s2_ds").eval()(x))


def test_sync_batchnorm_blocks_fall_back_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(conv_bn_blocks, "_logged", set())
    model = _model("resnet18")
    for block in (model.layer1[0], model.layer1[1]):
        block.bn1 = nn.SyncBatchNorm.convert_sync_batchnorm(block.bn1)
    with caplog.at_level(logging.INFO, logger="resfused"):
        resfused.convert(model, fuse_convs=True)
    assert type(model.layer1[0]) is resfused.nn.BasicBlock and type(model.layer1[1]) is resfused.nn.BasicBlock
    assert type(model.layer2[0]) is ConvBNBasicBlock
    assert caplog.text.count("BasicBlock runs without conv fusion: bn1 is SyncBatchNorm") == 1


def _saved_activation_bytes(block, x):
    """Bytes of the distinct activation-sized tensors autograd saves for one training step (weights excluded)."""
    params = {p.data_ptr() for p in block.parameters()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in params and t.numel() > 32:  # activations and masks, not (C,) vectors
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x.requires_grad_())
    return sum(seen.values())


def test_saved_activation_bytes_per_bottleneck():
    """Fused: x, y1, y2, y3, yd (pre-BN conv outputs) + a 1-bit mask of the output; never a normalized activation.
    Stock additionally keeps relu(bn1(y1)), relu(bn2(y2)) and the block output."""
    label = "bottleneck_s1_ds"
    x = torch.randn(4, 8, 8, 8, device=DEVICE)
    stock_bytes = _saved_activation_bytes(_block(label), x.clone())
    ours_bytes = _saved_activation_bytes(resfused.convert(_block(label), fuse_convs=True), x.clone())
    n, hw, width, out = 4, 64, 4, 16
    elems = n * hw * (8 + width + width + out + out)  # x, y1, y2, y3, yd
    mask = n * out * ((hw + 7) // 8)  # nchw: (N*C, ceil(H*W/8)) bytes
    assert ours_bytes == elems * 4 + mask
    assert stock_bytes == (elems + n * hw * (width + width + out)) * 4
    recompute_bytes = _saved_activation_bytes(resfused.convert(_block(label), fuse_convs=True, recompute=True),
                                              x.clone())
    assert recompute_bytes == (elems - n * hw * out) * 4 + mask  # y3 recomputed, not saved



@pytest.mark.parametrize("label", ["bottleneck_s2_ds", "basic_s1"])
def test_block_bad_input_changes_no_state(label):
    """A fused block given bad input raises before any BN's running stats or num_batches_tracked move."""
    block = resfused.convert(_block(label), backend="reference", fuse_convs=True)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    inplanes = BLOCKS[label][1]
    for bad, match in ((_input(4, inplanes + 1, 8, 8), "channels"), (_input(inplanes, 8, 8), "4-D"),
                       (_input(4, inplanes, 8, 8).to(torch.int32), "floating-point"),
                       (_input(1, inplanes, 1, 1), "more than 1 value per channel")):
        with pytest.raises(ValueError, match=match):
            block(bad)
        for k, v in block.state_dict().items():
            assert torch.equal(v, state[k]), f"{k} changed on bad input ({match})"


def _is_nhwc(t):
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_blocks_run_channels_last_from_an_nchw_input(backend, monkeypatch):
    """An NCHW input to two fused blocks: on every backend but the reference the fused convs read channels_last
    (the first block takes the one copy, the second none, the output stays channels_last), with bitwise the
    outputs, x.grad (in x's layout), weight gradients and running stats of a channels_last input; the reference
    keeps NCHW throughout."""
    layouts = []
    real = op.conv_bn

    def spy(x, *args, **kwargs):
        layouts.append(_is_nhwc(x))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(conv_bn_blocks._op, "conv_bn", spy)
    model = resfused.convert(nn.Sequential(_block("basic_s1", seed=0), _block("basic_s1", seed=1)),
                             backend=backend, fuse_convs=True)
    runs = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        m = copy.deepcopy(model)
        layouts.clear()
        x = _input(4, 8, 8, 8).contiguous(memory_format=memory_format).requires_grad_()
        first = m[0](x)
        out = m[1](first)
        _block_loss(out).backward()
        runs.append((out.detach(), x.grad, {n: p.grad for n, p in m.named_parameters()},
                     {n: b.clone() for n, b in m.named_buffers()}))
        if memory_format is torch.contiguous_format:
            kernel = backend != "reference"
            assert layouts == [kernel] * 4, layouts
            assert _is_nhwc(first) == kernel and _is_nhwc(out) == kernel
            assert conv_bn_blocks.to_kernel_layout(first, backend) is first  # the second block copies nothing
            assert x.grad.is_contiguous()
    if backend == "reference":
        return  # stock's own convs round differently per layout; test_block_two_sgd_steps_* check its values
    (y0, gx0, gp0, b0), (y1, gx1, gp1, b1) = runs
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    for n in gp0:
        assert torch.equal(gp0[n], gp1[n]), n
    for n in b0:
        assert torch.equal(b0[n], b1[n]), n


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan")], ids=str)
def test_conv_bn_rejects_eps_as_f_batch_norm(eps):
    """ops.conv_bn with statistics rejects what F.batch_norm with batch statistics rejects (eps <= 0), with its
    error type, before the running stats move, and takes what it takes (nan)."""
    x, weight, _pro, rm, rv, (s, p, g) = _conv_inputs("1x1", torch.float32, "nchw")
    rm0, rv0 = rm.clone(), rv.clone()
    y = F.conv2d(x, weight)
    try:
        F.batch_norm(y, rm.clone(), rv.clone(), None, None, True, 0.1, eps)
    except Exception as e:  # noqa: BLE001 - ours must raise what stock raises
        with pytest.raises(type(e), match="eps"):
            op.conv_bn(x, weight, stats=True, running_mean=rm, running_var=rv, eps=eps, backend="reference")
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    else:  # stock takes it (nan): so do we
        op.conv_bn(x, weight, stats=True, running_mean=rm, running_var=rv, eps=eps, backend="reference")
    op.conv_bn(x, weight, stats=False, eps=eps, backend="reference")  # no statistics: eps is not used


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("which", ["bn2", "downsample.1"])
def test_fused_block_checks_each_bns_eps_as_stock(which, training):
    """A fused block checks every BN's eps as that nn.BatchNorm2d would in the same mode, names the BN, and
    changes no state; stock's block raises the same error type for the same eps."""
    stock = _block("bottleneck_s2_ds")
    stock.get_submodule(which).eps = -1e-5 if not training else 0.0
    stock.train(training)
    block = resfused.convert(copy.deepcopy(stock), backend="reference", fuse_convs=True)
    x = _input(4, 16, 8, 8)
    with pytest.raises(Exception) as stock_error:  # noqa: PT011 - its type is what ours must match
        stock(x)
    assert "eps" in str(stock_error.value)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    with pytest.raises(stock_error.type, match=rf"{re.escape(which)}: .*eps"):
        block(x)
    for k, v in block.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed on a rejected eps"


@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend is not usable here")
def test_triton_backward_refuses_a_non_dense_x():
    """The Triton backward walks x, gz and grad_x as one dense row view: a strided x (the op layer copies one
    first) is refused before any launch, not read through the wrong offsets."""
    from resfused.triton_kernels import conv_bn as tk

    x = torch.randn(2, 8, 6, 10, device=DEVICE)[..., ::2]
    w = torch.randn(4, 8, 3, 3, device=DEVICE)
    gy = torch.randn(2, 4, 6, 5, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous or channels_last"):
        tk.backward(gy, x, w, None, None, None, None, (1, 1), (1, 1), (1, 1), 1, False, True, True, True, False)
