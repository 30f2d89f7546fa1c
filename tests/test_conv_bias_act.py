"""resfused::conv_bias_act (fused conv + bias + shortcut conv + residual + ReLU) against F.conv2d, per backend.

On CPU: reference and triton (interpreter); on a GPU: reference, triton and cuda, on CUDA tensors. Each
conv variant of a ResNet (1x1, strided 1x1, 3x3 stride 1/2, grouped 3x3, dilated 3x3, 7x7/2 stem, the dual
GEMM with a projection shortcut) is checked for fp32/fp16/bf16 and NCHW/channels_last against a float64
F.conv2d composite, within twice the error of stock PyTorch computing the same composite in that dtype.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from resfused import _layout
from resfused.ops import conv_bias_act as op

from _oracle import assert_close
from conftest import DEVICE, usable_backends

# On a GPU every backend, available or not (a missing one fails its tests, see conftest.usable_backends).
BACKENDS = usable_backends(DEVICE, lambda b, d: op.unavailable_reason(b, d, torch.float32))
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}

# label: (N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups). Channel counts are not multiples of
# the 16-wide test tiles, and N*Ho*Wo leaves row tails.
VARIANTS = {
    "1x1": (2, 24, 5, 5, 40, 1, 1, 0, 1, 1),
    "1x1_s2": (2, 24, 6, 7, 40, 1, 2, 0, 1, 1),
    "3x3_s1": (1, 20, 5, 5, 24, 3, 1, 1, 1, 1),
    "3x3_s2": (1, 20, 7, 6, 24, 3, 2, 1, 1, 1),
    "3x3_grouped_narrow": (1, 16, 4, 5, 16, 3, 1, 1, 1, 4),  # 4 channels per group: flat-K loop
    "3x3_grouped_s2": (1, 64, 5, 5, 48, 3, 2, 1, 1, 2),  # 32 channels per group: channel loop
    "3x3_dilated": (1, 16, 7, 7, 16, 3, 1, 2, 2, 1),
    "7x7_s2_stem": (1, 3, 13, 11, 16, 7, 2, 3, 1, 1),
    "C1": (2, 1, 4, 4, 8, 3, 1, 1, 1, 1),
    "HW1": (4, 16, 1, 1, 24, 1, 1, 0, 1, 1),
}

SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}


@pytest.fixture(autouse=True)
def _no_tf32():
    """Kernel comparisons at full fp32 precision; TF32 has its own test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def small_tiles(monkeypatch):
    """Interpreter only: 16x16x16 tiles, so tiny shapes still run multi-tile grids, K loops and tails."""
    tk = importlib.import_module("resfused.triton_kernels.conv_bias_act")
    if tk._INTERPRET:
        monkeypatch.setattr(tk, "_FIXED", dict(SMALL_TILES))


def _make(spec, dtype, layout, *, bias=True, residual=True, shortcut=None, seed=0):
    n, c, h, w, co, k, s, p, d, g = spec
    gen = torch.Generator().manual_seed(seed)
    fmt = LAYOUTS[layout]

    def act(shape):
        return torch.randn(shape, generator=gen).to(dtype).to(DEVICE).contiguous(memory_format=fmt)

    x = act((n, c, h, w))
    weight = (torch.randn(co, c // g, k, k, generator=gen) / (c // g * k * k) ** 0.5).to(dtype).to(DEVICE)
    b = (torch.randn(co, generator=gen) * 0.5).to(DEVICE) if bias else None
    ho = (h + 2 * p - d * (k - 1) - 1) // s + 1
    wo = (w + 2 * p - d * (k - 1) - 1) // s + 1
    res = act((n, co, ho, wo)) if residual else None
    sc = None
    if shortcut is not None:
        c2, s2 = shortcut
        x2 = act((n, c2, (ho - 1) * s2 + 1 + (s2 - 1), (wo - 1) * s2 + 1))
        w2 = (torch.randn(co, c2, 1, 1, generator=gen) / c2 ** 0.5).to(dtype).to(DEVICE)
        sc = (x2, w2, s2)
    return x, weight, b, res, sc


def _composite(x, weight, b, res, sc, spec, relu, dtype):
    """Stock PyTorch in ``dtype``: conv2d (+ shortcut conv2d) + bias + residual, ReLU."""
    _, _, _, _, _, _, s, p, d, g = spec
    conv_b = None if b is None else b.to(dtype)
    y = F.conv2d(x.to(dtype), weight.to(dtype), conv_b, s, p, d, g)
    if sc is not None:
        y = y + F.conv2d(sc[0].to(dtype), sc[1].to(dtype), None, sc[2])
    if res is not None:
        y = y + res.to(dtype)
    return torch.relu(y) if relu else y


def _max_err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def _check(backend, spec, dtype, layout, *, bias=True, residual=True, shortcut=None, relu=True, seed=0):
    x, weight, b, res, sc = _make(spec, dtype, layout, bias=bias, residual=residual, shortcut=shortcut, seed=seed)
    _, _, _, _, _, _, s, p, d, g = spec
    kwargs = {}
    if sc is not None:
        kwargs = dict(shortcut_x=sc[0], shortcut_weight=sc[1], shortcut_stride=sc[2])
    y = op.conv_bias_act(x, weight, b, res, stride=s, padding=p, dilation=d, groups=g, relu=relu, backend=backend,
                         **kwargs)
    ref = _composite(x, weight, b, res, sc, spec, relu, torch.float64)
    stock = _composite(x, weight, b, res, sc, spec, relu, dtype)
    assert y.shape == ref.shape and y.dtype == dtype and y.device == x.device
    assert _layout.layout_of(y) == _layout.layout_of(x) or ref.shape[1] == 1 or ref.shape[2] * ref.shape[3] == 1, \
        "output must keep the input's memory format"
    assert torch.isfinite(y).all()
    assert_close(f"{backend} {dtype} {layout}", y, ref, dtype, stock)
    return y


# fp32 in both layouts; each low-precision dtype in one layout (the layout only changes strides, not the math).
DTYPE_LAYOUTS = [(torch.float32, "nchw"), (torch.float32, "cl"), (torch.float16, "cl"), (torch.bfloat16, "nchw")]
DTYPE_LAYOUT_IDS = ["fp32-nchw", "fp32-cl", "fp16-cl", "bf16-nchw"]


@pytest.mark.parametrize("dtype,layout", DTYPE_LAYOUTS, ids=DTYPE_LAYOUT_IDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_variants(backend, variant, dtype, layout, small_tiles):
    """Each conv shape with the full epilogue: + bias + residual, ReLU."""
    _check(backend, VARIANTS[variant], dtype, layout)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "no_res"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_epilogue_combinations(backend, bias, residual, relu, small_tiles):
    _check(backend, VARIANTS["3x3_s1"], torch.float32, "cl", bias=bias, residual=residual, relu=relu)


# The projection shortcut (dual GEMM): Bottleneck conv3 (1x1) with a strided 1x1 downsample, BasicBlock conv2
# (3x3) with one, and a stride-1 projection (layer1 of a Bottleneck net).
SHORTCUTS = {
    "bottleneck_s2": ("1x1", (12, 2)),
    "bottleneck_s1": ("1x1", (20, 1)),
    "basic_s2": ("3x3_s1", (16, 2)),
}


@pytest.mark.parametrize("dtype,layout", [(torch.float32, "cl"), (torch.float32, "nchw"), (torch.bfloat16, "cl")],
                         ids=["fp32-cl", "fp32-nchw", "bf16-cl"])
@pytest.mark.parametrize("case", list(SHORTCUTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_dual_gemm_shortcut(backend, case, dtype, layout, small_tiles):
    variant, shortcut = SHORTCUTS[case]
    _check(backend, VARIANTS[variant], dtype, layout, residual=False, shortcut=shortcut)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shortcut_and_residual_together(backend, small_tiles):
    _check(backend, VARIANTS["1x1"], torch.float32, "cl", residual=True, shortcut=(12, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_tiles_multi_chunk(backend):
    """The default (interpreter: 32x128x128) tiles with C_in and C_out above one tile: K loop and N tiles."""
    _check(backend, (1, 160, 3, 3, 136, 3, 1, 1, 1, 1), torch.float32, "cl")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_layouts(backend, small_tiles):
    """A channels_last x with an NCHW residual and weight in channels_last: the output follows x."""
    x, weight, b, res, _ = _make(VARIANTS["3x3_s1"], torch.float32, "cl")
    res = res.contiguous()
    weight = weight.contiguous(memory_format=torch.channels_last)
    y = op.conv_bias_act(x, weight, b, res, padding=1, backend=backend)
    ref = F.conv2d(x.double(), weight.double(), b.double(), padding=1) + res.double()
    assert _layout.layout_of(y) == _layout.CL
    assert _max_err(y, ref.relu()) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, small_tiles):
    x, weight, b, res, sc = _make(VARIANTS["1x1"], torch.float32, "cl", shortcut=(12, 2))
    args = (x, weight, b, res, sc[0], sc[1], [1, 1], [0, 0], [1, 1], 1, [2, 2], True, backend)
    torch.library.opcheck(torch.ops.resfused.conv_bias_act.default, args)
    x, weight, b, res, _ = _make(VARIANTS["3x3_s2"], torch.float16, "nchw")
    args = (x, weight, b, res, None, None, [2, 2], [1, 1], [1, 1], 1, [1, 1], False, backend)
    torch.library.opcheck(torch.ops.resfused.conv_bias_act.default, args)


def test_fake_impl_keeps_channels_last():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 16, 9, 9).contiguous(memory_format=torch.channels_last)
        w = torch.empty(32, 16, 3, 3)
        y = torch.ops.resfused.conv_bias_act(x, w, None, None, None, None, [2, 2], [1, 1], [1, 1], 1, [1, 1], True,
                                             "reference")
        assert y.shape == (2, 32, 5, 5)
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.fixture
def restore_cudnn_tf32():
    conv = getattr(torch.backends.cudnn, "conv", None)
    saved = (torch.backends.cudnn.allow_tf32, getattr(conv, "fp32_precision", None),
             getattr(getattr(torch.backends.cudnn, "rnn", None), "fp32_precision", None))
    yield conv
    if saved[1] is not None:
        torch.backends.cudnn.conv.fp32_precision = saved[1]
        torch.backends.cudnn.rnn.fp32_precision = saved[2]
    torch.backends.cudnn.allow_tf32 = saved[0]


def test_tf32_follows_cudnn_flag(restore_cudnn_tf32):
    """fp32 dots use TF32 exactly when cuDNN convolutions would (torch.backends.cudnn.allow_tf32)."""
    tk = pytest.importorskip("resfused.triton_kernels.conv_bias_act")
    torch.backends.cudnn.allow_tf32 = True
    assert tk.input_precision(torch.float32) == "tf32"
    torch.backends.cudnn.allow_tf32 = False
    assert tk.input_precision(torch.float32) == "ieee"
    assert tk.input_precision(torch.bfloat16) == "ieee"


def test_tf32_follows_the_fp32_precision_api(restore_cudnn_tf32):
    """With the newer per-op fp32_precision settings (convolutions and RNNs set differently, where the legacy
    flag raises when read), the convolution setting decides."""
    conv = restore_cudnn_tf32
    if conv is None or not hasattr(conv, "fp32_precision"):
        pytest.skip("this torch has no torch.backends.cudnn.conv.fp32_precision")
    tk = pytest.importorskip("resfused.triton_kernels.conv_bias_act")
    torch.backends.cudnn.rnn.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    assert tk.input_precision(torch.float32) == "tf32"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cudnn.rnn.fp32_precision = "tf32"
    assert tk.input_precision(torch.float32) == "ieee"


_GPU_COMPILE_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import resfused.triton_kernels.conv_bias_act as k

fn = k._conv_bias_act_kernel
names = fn.arg_names
constexpr = {n for n, p in zip(names, fn.params) if p.is_constexpr}
pointers = {"x_ptr", "w_ptr", "bias_ptr", "res_ptr", "x2_ptr", "w2_ptr", "y_ptr"}
for dtype, arch, flat_k, has_sc, warps in (("bf16", 90, False, True, 8), ("fp32", 80, True, False, 4)):
    sig = {n: "constexpr" if n in constexpr else ("*" + dtype if n in pointers else "i32") for n in names}
    consts = dict(STRIDE_H=2, STRIDE_W=2, PAD_H=1, PAD_W=1, DIL_H=1, DIL_W=1, KH=3, KW=3, SC_STRIDE_H=2,
                  SC_STRIDE_W=2, HAS_BIAS=True, HAS_RES=True, HAS_SC=has_sc, RELU=True, FLAT_K=flat_k,
                  INPUT_PRECISION="tf32" if dtype == "fp32" else "ieee", DOT_IN_FP64=False, INDEX64=False,
                  BLOCK_M=128, BLOCK_N=64, BLOCK_K=32)
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": 3})
    ptx = compiled.asm["ptx"]
    assert ("wgmma" if arch == 90 else "mma.sync") in ptx, f"sm_{arch} {dtype}: no tensor-core MMA in the PTX"
    print(f"sm_{arch} {dtype} ok")
"""


def test_triton_kernel_compiles_for_gpu():
    """Lower the Triton kernel to PTX for sm_90 (wgmma) and sm_80 (mma) without a GPU: catches what the
    interpreter cannot (dot shape/dtype rules, layouts). Runs in a subprocess without TRITON_INTERPRET."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _GPU_COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0 and ("ptxas" in proc.stderr and "not found" in proc.stderr.lower()):
        pytest.skip(f"no ptxas for Triton's NVIDIA backend: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(" ok") == 2


# ---------------------------------------------------------------------------------------------------
# bad input: one test per error class, each checking type and message
# ---------------------------------------------------------------------------------------------------

def _good():
    x, weight, b, res, _ = _make(VARIANTS["3x3_s1"], torch.float32, "cl")
    return x, weight, b, res


def test_error_dtype_mismatch():
    x, weight, b, res = _good()
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        op.conv_bias_act(x, weight.double(), b, res, padding=1, backend="reference")


def test_error_channel_mismatch():
    x, weight, b, res = _good()
    with pytest.raises(ValueError, match="input channels"):
        op.conv_bias_act(x[:, :10], weight, b, None, padding=1, backend="reference")


def test_error_residual_shape():
    x, weight, b, res = _good()
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        op.conv_bias_act(x, weight, b, res, stride=2, padding=1, backend="reference")


def test_error_shortcut_geometry():
    x, weight, b, res = _good()
    with pytest.raises(ValueError, match="shortcut conv gives shape"):
        op.conv_bias_act(x, weight, b, None, padding=1, shortcut_x=x, shortcut_weight=weight[:, :, :1, :1],
                         shortcut_stride=2, backend="reference")
    with pytest.raises(ValueError, match="both be tensors or both be None"):
        op.conv_bias_act(x, weight, b, None, padding=1, shortcut_x=x, backend="reference")


def test_error_bad_stride():
    x, weight, b, res = _good()
    with pytest.raises(ValueError, match="stride must be an int or a pair of ints >= 1"):
        op.conv_bias_act(x, weight, b, res, stride=0, padding=1, backend="reference")


def test_error_unavailable_backend(monkeypatch):
    x, weight, b, res = _good()
    if DEVICE.type == "cpu":
        with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
            op.conv_bias_act(x, weight, b, res, padding=1, backend="cuda")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match="backend 'triton' is unavailable"):
            op.conv_bias_act(x, weight, b, res, padding=1, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        op.conv_bias_act(x, weight, b, res, padding=1, backend="cudnn")


# ---------------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------------

@pytest.mark.cuda
def test_cuda_extension_carries_op():
    from resfused import _backend

    if _backend.cuda_ext() is None:
        pytest.fail(f"resfused._C unavailable on a GPU machine: {_backend._cuda_ext_status()[1]}")
    assert op.cuda_op_reason() is None


@pytest.mark.cuda
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_tf32_matches_cudnn(backend):
    """With TF32 allowed (PyTorch's cuDNN default) fp32 results sit within TF32 error of stock cuDNN conv."""
    torch.backends.cudnn.allow_tf32 = True
    x, weight, b, res, _ = _make((4, 64, 14, 14, 64, 3, 1, 1, 1, 1), torch.float32, "cl")
    y = op.conv_bias_act(x, weight, b, res, padding=1, backend=backend)
    stock = torch.relu(F.conv2d(x, weight, b, 1, 1) + res)
    ref = torch.relu(F.conv2d(x.double(), weight.double(), b.double(), 1, 1) + res.double())
    assert _max_err(y, ref) <= max(4 * _max_err(stock, ref), 1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_resnet50_layer_shapes(backend, dtype):
    """Real ResNet-50 widths at batch 8: 256->64 1x1, 64 3x3, 64->256 1x1 + projection shortcut."""
    _check(backend, (8, 256, 28, 28, 128, 3, 2, 1, 1, 1), dtype, "cl")
    _check(backend, (8, 64, 56, 56, 256, 1, 1, 0, 1, 1), dtype, "cl", residual=False, shortcut=(64, 1))
    _check(backend, (8, 128, 28, 28, 512, 1, 1, 0, 1, 1), dtype, "cl", residual=False, shortcut=(256, 2))
    _check(backend, (8, 3, 224, 224, 64, 7, 2, 3, 1, 1), dtype, "cl")
    _check(backend, (8, 256, 14, 14, 256, 3, 1, 1, 1, 32), dtype, "cl")
