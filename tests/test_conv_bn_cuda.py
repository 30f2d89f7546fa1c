"""The cuda backend of the fused conv + BN training ops: resfused/ops/conv_bn_cuda.py over csrc/conv_bn.cpp.

Everywhere:
  * the extension registers torch.ops.resfused_cuda_conv_bn.* with the schemas below and CUDA kernels (when it
    is built: CI sets RESFUSED_FORCE_CUDA_BUILD=1);
  * the Python composition (prologue scale/shift, finalize and running stats, wgrad/dgrad, dReLU + dBN, the
    tail on the BN + add + ReLU kernels with a projection shortcut's BN as a second pass) is run on CPU over
    emulations of the C++ ops' contracts, against the reference backend: the blocks' float32 SGD-step tests
    of tests/test_conv_bn.py with backend="cuda", and every output subset of backward and the tail.
On a GPU (@pytest.mark.cuda) the real ops run in every test of tests/test_conv_bn.py (its BACKENDS include
cuda there), and here: which path cuDNN gives one ResNet-50 conv of each kind in bf16 channels_last (the
fused graph is expected on sm80+), the unfused path agreeing with the fused one, and CUDA graph capture.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from resfused import _layout
from resfused.ops import conv_bn as op
from resfused.ops import conv_bn_cuda
from resfused.reference import conv_bn as ref

import test_conv_bn as tcb
from conftest import DEVICE, HAS_CUDA
from test_cuda_ext import _extension_expected

SCHEMAS = {
    "conv_bn_forward": ("conv_bn_forward(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, int[] stride, "
                        "int[] padding, int[] dilation, int groups, bool stats) -> (Tensor, Tensor, Tensor)"),
    "conv_bn_wgrad": ("conv_bn_wgrad(Tensor grad_y, Tensor x, Tensor? scale, Tensor? shift, int[] weight_size, "
                      "int[] stride, int[] padding, int[] dilation, int groups) -> Tensor"),
    "conv_bn_plan": ("conv_bn_plan(Tensor x, Tensor weight, bool prologue, int[] stride, int[] padding, "
                     "int[] dilation, int groups, bool stats, str op) -> str"),
}


@pytest.mark.skipif(not _extension_expected(),
                    reason="resfused._C is not built (no RESFUSED_FORCE_CUDA_BUILD=1 and no installed extension)")
def test_extension_registers_conv_bn_ops():
    import resfused._C  # noqa: F401

    for name, schema in SCHEMAS.items():
        packet = getattr(torch.ops.resfused_cuda_conv_bn, name, None)
        assert packet is not None, f"torch.ops.resfused_cuda_conv_bn.{name} is not registered"
        assert str(packet.default._schema) == f"resfused_cuda_conv_bn::{schema}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resfused_cuda_conv_bn::{name}", "CUDA"), name
    assert op.cuda_op_reason() is None


@pytest.mark.skipif(not _extension_expected(),
                    reason="resfused._C is not built (no RESFUSED_FORCE_CUDA_BUILD=1 and no installed extension)")
def test_info_reports_the_cuda_conv_ops():
    """`python -m resfused` (gpu_check.sh's info step) says whether _C carries each CUDA conv op."""
    proc = subprocess.run([sys.executable, "-m", "resfused"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cuda conv_bias_act: built" in proc.stdout and "cuda conv_bn: built" in proc.stdout, proc.stdout


# ---------------------------------------------------------------------------------------------------
# the composition on CPU, over emulations of the C++ ops
# ---------------------------------------------------------------------------------------------------

def _fmt(x):
    return _layout.memory_format(_layout.layout_of(x))


def _act(x, scale, shift):
    if scale is None:
        return x
    return torch.relu(x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(x.dtype)


class _EmulatedConvOps:
    """csrc/conv_bn.cpp's contracts in torch ops (the fused path's uncentred statistics included)."""

    @staticmethod
    def conv_bn_forward(x, weight, scale, shift, stride, padding, dilation, groups, stats):
        weight = weight.contiguous(memory_format=_fmt(x))  # as the C++ op does
        acc = F.conv2d(_act(x, scale, shift).float(), weight.float(), None, stride, padding, dilation, groups)
        y = acc.to(x.dtype).contiguous(memory_format=_fmt(x))
        if not stats:
            return y, x.new_empty((0,), dtype=torch.float32), x.new_empty((0,), dtype=torch.float32)
        n = acc.numel() // acc.shape[1]
        mean = acc.sum((0, 2, 3)) / n
        return y, mean, (acc.square().sum((0, 2, 3)) / n - mean * mean).clamp_min(0)

    @staticmethod
    def conv_bn_wgrad(grad_y, x, scale, shift, weight_size, stride, padding, dilation, groups):
        grad_y = grad_y.contiguous(memory_format=_fmt(x))
        dw = torch.nn.grad.conv2d_weight(_act(x, scale, shift).float(), weight_size, grad_y.float(), stride, padding,
                                         dilation, groups)
        return dw.to(x.dtype).contiguous(memory_format=_fmt(x))


class _EmulatedBnOps:
    """csrc/bn_add_relu.cu's forward_eval and backward contracts in torch ops."""

    @staticmethod
    def bn_add_relu_forward_eval(x, residual, weight, bias, running_mean, running_var, eps, relu, save_mask):
        v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
        z = (x.float() - v(running_mean)) * v(torch.rsqrt(running_var + eps) * weight) + v(bias)
        if residual is not None:
            z = z + residual.float()
        positive = z > 0
        out = torch.where(positive, z, torch.zeros(())) if relu else z
        mask = _layout.pack_mask(positive, _layout.layout_of(x)) if relu and save_mask else \
            x.new_empty((0,), dtype=torch.uint8)
        return torch.empty_like(x).copy_(out), mask

    @staticmethod
    def bn_add_relu_backward(grad_out, x, mask, mean, invstd, weight, relu, training, need_input_grad,
                             need_residual_grad, need_weight_grad):
        assert relu
        positive = _layout.unpack_mask(mask, x.shape, _layout.layout_of(x))
        gz = torch.where(positive, grad_out.float(), torch.zeros(()))
        gx, gw, gb = ref.bn_backward(gz, x, mean, invstd, weight, training, need_input_grad, need_weight_grad)
        gr = torch.empty_like(x).copy_(gz) if need_residual_grad else x.new_empty((0,))
        return gx, gr, gw, gb


@pytest.fixture
def emulated_cuda(monkeypatch):
    """backend="cuda" runs resfused.ops.conv_bn_cuda on CPU over the emulated C++ ops."""
    monkeypatch.setattr(conv_bn_cuda, "_conv_ops", lambda: _EmulatedConvOps)
    monkeypatch.setattr(conv_bn_cuda, "_bn_ops", lambda: _EmulatedBnOps)
    real = op.unavailable_reason
    monkeypatch.setattr(op, "unavailable_reason",
                        lambda name, device, dtype: None if name == "cuda" else real(name, device, dtype))


@pytest.mark.skipif(HAS_CUDA, reason="the GPU run tests the real ops (tests/test_conv_bn.py with backend='cuda')")
@pytest.mark.parametrize("label,layout", tcb.FP32_BLOCK_CASES)
def test_blocks_two_sgd_steps_float32_emulated(emulated_cuda, label, layout):
    tcb.test_block_two_sgd_steps_float32("cuda", label, layout)


@pytest.mark.skipif(HAS_CUDA, reason="the GPU run tests the real ops")
@pytest.mark.parametrize("case,layout,prologue", [("3x3_s2", "cl", True), ("1x1", "nchw", False)])
def test_forward_matches_reference_emulated(emulated_cuda, case, layout, prologue):
    x, weight, pro, rm, rv, (s, p, g) = tcb._conv_inputs(case, torch.float32, layout)
    vecs = [pro.mean, pro.invstd, pro.weight, pro.bias] if prologue else [None] * 4
    rm_c, rv_c = rm.clone(), rv.clone()
    ours = conv_bn_cuda.forward(x, weight, *vecs, rm_c, rv_c, [s, s], [p, p], [1, 1], g, prologue, True, 0.1, 1e-5)
    want = ref.forward(x, weight, *vecs, rm, rv, [s, s], [p, p], [1, 1], g, prologue, True, 0.1, 1e-5)
    for a, b in zip(ours + (rm_c, rv_c), want + (rm, rv)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert ours[0].is_contiguous(memory_format=tcb.LAYOUTS[layout])


@pytest.mark.skipif(HAS_CUDA, reason="the GPU run tests the real ops")
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, False),
                                   (False, False, True)], ids=["all", "x", "w", "affine"])
@pytest.mark.parametrize("prologue,in_training", [(True, True), (True, False), (False, False)],
                         ids=["train", "eval", "plain"])
def test_backward_output_subsets_emulated(emulated_cuda, needs, prologue, in_training):
    x, weight, pro, _, _, (s, p, g) = tcb._conv_inputs("3x3_s2", torch.float32, "cl")
    vecs = [pro.mean, pro.invstd, pro.weight, pro.bias] if prologue else [None] * 4
    gy = torch.randn(ref.forward(x, weight, *vecs, None, None, [s, s], [p, p], [1, 1], g, prologue, False, 0.1,
                                 1e-5)[0].shape).contiguous(memory_format=torch.channels_last)
    args = (gy, x, weight, *vecs, [s, s], [p, p], [1, 1], g, prologue, in_training, *needs)
    for a, b in zip(conv_bn_cuda.backward(*args), ref.backward(*args)):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(HAS_CUDA, reason="the GPU run tests the real ops")
@pytest.mark.parametrize("needs", [(True, True, True, True), (False, True, False, True), (True, False, True, False)],
                         ids=["all", "affine", "inputs"])
@pytest.mark.parametrize("residual_bn", [False, True], ids=["identity", "projection"])
def test_tail_matches_reference_emulated(emulated_cuda, residual_bn, needs):
    gen = torch.Generator().manual_seed(0)
    y, r, gout = (torch.randn(4, 8, 5, 5, generator=gen) for _ in range(3))
    vec = lambda lo, hi: torch.rand(8, generator=gen) * (hi - lo) + lo  # noqa: E731
    bn = [vec(-1, 1), vec(0.5, 1.5), vec(0.5, 1.5), vec(-0.5, 0.5)]
    rbn = [vec(-1, 1), vec(0.5, 1.5), vec(0.5, 1.5), vec(-0.5, 0.5)] if residual_bn else [None] * 4
    fwd = (y, *bn, r, *rbn, residual_bn)
    out, mask = conv_bn_cuda.tail_forward(*fwd)
    out_r, mask_r = ref.tail_forward(*fwd)
    torch.testing.assert_close(out, out_r, rtol=1e-5, atol=1e-6)
    assert torch.equal(mask, mask_r)
    bwd = (gout, mask_r, y, *bn[:3], r, *rbn[:3], residual_bn, True, True, *needs)
    for a, b in zip(conv_bn_cuda.tail_backward(*bwd), ref.tail_backward(*bwd)):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# GPU: which path cuDNN gives the ResNet-50 convs
# ---------------------------------------------------------------------------------------------------

# (C_in, H, C_out, kernel, stride, padding): bottleneck convs of ResNet-50 at batch 32, one of each kind (1x1
# reduce, 3x3, 3x3 stride 2, 1x1 expand); each builds 4 runtime-fusion plans, compiled by cuDNN (seconds).
R50_CONVS = [(256, 56, 64, 1, 1, 0), (64, 56, 64, 3, 1, 1), (128, 56, 128, 3, 2, 1), (512, 7, 2048, 1, 1, 0)]


@pytest.mark.cuda
@pytest.mark.parametrize("conv", R50_CONVS, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}k{c[3]}s{c[4]}")
def test_resnet50_convs_take_the_fused_cudnn_path(conv):
    """bf16 channels_last on sm80+: cuDNN's runtime fusion has an engine for the prologue + conv + genstats
    graph and the prologue + wgrad graph (an "unfused: ..." answer fails, saying cuDNN's reason)."""
    if op.unavailable_reason("cuda", torch.device(DEVICE), torch.bfloat16) is not None:
        pytest.fail(f"cuda conv_bn unavailable on a GPU machine: "
                    f"{op.unavailable_reason('cuda', torch.device(DEVICE), torch.bfloat16)}")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("cuDNN's runtime-fusion engines need sm80+")
    c, h, k, r, s, p = conv
    x = torch.randn(32, c, h, h, device=DEVICE, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(k, c, r, r, device=DEVICE, dtype=torch.bfloat16)
    for prologue in (False, True):
        for what in ("forward", "wgrad"):
            path = conv_bn_cuda.plan(x, w, prologue, [s, s], [p, p], [1, 1], 1, True, what)
            assert path.startswith("cudnn-graph"), f"{what}, prologue={prologue}: {path}"


@pytest.mark.cuda
def test_fused_and_unfused_paths_agree():
    """A bf16 channels_last 3x3 conv through the fused graph and, from a copy 2 bytes off a 16-byte boundary,
    through the unfused path: y, the statistics and wgrad agree to bf16 rounding."""
    if op.unavailable_reason("cuda", torch.device(DEVICE), torch.bfloat16) is not None:
        pytest.fail(f"cuda conv_bn unavailable on a GPU machine: "
                    f"{op.unavailable_reason('cuda', torch.device(DEVICE), torch.bfloat16)}")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    n, c, h = 8, 64, 14
    base = torch.randn(n * c * h * h + 1, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    x_off = base[1:].view(n, h, h, c).permute(0, 3, 1, 2)  # channels_last, misaligned
    x_ok = x_off.clone(memory_format=torch.channels_last)
    w = (torch.randn(c, c, 3, 3, device=DEVICE, generator=gen) / 24).to(torch.bfloat16)
    w = w.contiguous(memory_format=torch.channels_last)
    scale = torch.rand(c, device=DEVICE, generator=gen) + 0.5
    shift = torch.rand(c, device=DEVICE, generator=gen) - 0.5
    geo = ([1, 1], [1, 1], [1, 1], 1)
    assert conv_bn_cuda.plan(x_off, w, True, *geo, True, "forward").startswith("unfused")
    ops = torch.ops.resfused_cuda_conv_bn
    fused = ops.conv_bn_forward(x_ok, w, scale, shift, *geo, True)
    unfused = ops.conv_bn_forward(x_off, w, scale, shift, *geo, True)
    torch.testing.assert_close(fused[0], unfused[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused[1], unfused[1], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fused[2], unfused[2], rtol=1e-2, atol=1e-3)
    gy = torch.randn(fused[0].shape, device=DEVICE, generator=gen).to(torch.bfloat16)
    gy = gy.contiguous(memory_format=torch.channels_last)
    dw_fused = ops.conv_bn_wgrad(gy, x_ok, scale, shift, list(w.shape), *geo)
    dw_unfused = ops.conv_bn_wgrad(gy, x_off, scale, shift, list(w.shape), *geo)
    assert tcb._nrel(dw_fused, dw_unfused) < 2e-2


@pytest.mark.cuda
def test_cuda_graph_capture_after_warm_up(deterministic_cudnn):
    """Warmed up outside capture, the fused forward and wgrad replay inside a CUDA graph with eager's results; a
    configuration first seen inside capture runs unfused there (no plan is built during capture)."""
    if op.unavailable_reason("cuda", torch.device(DEVICE), torch.bfloat16) is not None:
        pytest.fail(f"cuda conv_bn unavailable on a GPU machine: "
                    f"{op.unavailable_reason('cuda', torch.device(DEVICE), torch.bfloat16)}")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(8, 64, 14, 14, device=DEVICE, generator=gen).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(64, 64, 3, 3, device=DEVICE, generator=gen) / 24).to(torch.bfloat16)
    scale = torch.rand(64, device=DEVICE, generator=gen) + 0.5
    shift = torch.rand(64, device=DEVICE, generator=gen) - 0.5
    geo = ([1, 1], [1, 1], [1, 1], 1)
    ops = torch.ops.resfused_cuda_conv_bn
    eager = ops.conv_bn_forward(x, w, scale, shift, *geo, True)
    gy = torch.randn_like(eager[0])
    dw_eager = ops.conv_bn_wgrad(gy, x, scale, shift, list(w.shape), *geo)
    x_new = torch.randn(4, 64, 14, 14, device=DEVICE, generator=gen).to(torch.bfloat16)
    x_new = x_new.contiguous(memory_format=torch.channels_last)  # a batch size never planned
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        captured = ops.conv_bn_forward(x, w, scale, shift, *geo, True)
        dw_captured = ops.conv_bn_wgrad(gy, x, scale, shift, list(w.shape), *geo)
        unplanned = ops.conv_bn_forward(x_new, w, scale, shift, *geo, True)
    graph.replay()
    torch.cuda.synchronize()
    # Deterministic engines only (the fixture): the planned configurations replay eager's bits.
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)
    assert torch.equal(dw_captured, dw_eager)
    # The batch first seen inside capture ran unfused there; eager now plans it and may take the fused
    # engine, a different summation order, so this one is compared within bf16's tolerance.
    direct = ops.conv_bn_forward(x_new, w, scale, shift, *geo, True)
    torch.testing.assert_close(unplanned[0], direct[0], rtol=2e-2, atol=2e-2)
