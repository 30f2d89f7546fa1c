"""The CUDA C++ backend, resfused._C (csrc/).

Everywhere: when csrc/ holds sources and RESFUSED_FORCE_CUDA_BUILD=1 is set (CI sets it), or resfused._C
is installed, the extension must import and register torch.ops.resfused_cuda.* with the schemas below:
a broken build or registration fails here even on a machine without a GPU.

On a GPU (@pytest.mark.cuda), for both kernel schemes (RESFUSED_CUDA_SCHEME=two_pass | persistent): the
ops against the reference backend on ResNet-50 shapes at batch 32 in fp32/fp16/bf16, NCHW and
channels_last; C % 8 != 0 and tensors that start off a 16-byte boundary; the persistent kernels' re-read
path (RESFUSED_CUDA_PERSISTENT_CACHE_BYTES caps their on-chip cache); every gradient; running stats;
bit-identical reruns; no host synchronisation (sync debug mode, CUDA graph capture and replay).

Tolerances follow tests/_oracle.py: error against a float64 evaluation of the reference at most twice
the error of the reference backend computing in the test dtype, plus a floor of a few ulps.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import pytest
import torch

from resfused import _layout
from resfused.reference import bn_add_relu as ref

from _oracle import assert_close
from conftest import DEVICE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCHEMAS = {
    "bn_add_relu_forward_train": (
        "bn_add_relu_forward_train(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps, bool relu) "
        "-> (Tensor, Tensor, Tensor, Tensor)"),
    "bn_add_relu_forward_eval": (
        "bn_add_relu_forward_eval(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, "
        "Tensor running_mean, Tensor running_var, float eps, bool relu, bool save_mask) -> (Tensor, Tensor)"),
    "bn_add_relu_backward": (
        "bn_add_relu_backward(Tensor grad_out, Tensor x, Tensor mask, Tensor mean, Tensor invstd, "
        "Tensor? weight, bool relu, bool training, bool need_input_grad, bool need_residual_grad, "
        "bool need_weight_grad) -> (Tensor, Tensor, Tensor, Tensor)"),
}


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _extension_expected() -> bool:
    """Whether resfused._C must be there: always on a machine with a CUDA device (a GPU run without the
    extension fails rather than skipping), else when CI forces the build or it is installed."""
    if torch.cuda.is_available():
        return True
    has_sources = bool(glob.glob(os.path.join(ROOT, "csrc", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    return (has_sources and _flag("RESFUSED_FORCE_CUDA_BUILD")) or importlib.util.find_spec("resfused._C") is not None


@pytest.mark.skipif(not _extension_expected(),
                    reason="resfused._C is not built (no RESFUSED_FORCE_CUDA_BUILD=1 and no installed extension)")
def test_extension_imports_and_registers_ops():
    import resfused._C  # noqa: F401  (loading the library runs the op registrations)

    for name, schema in SCHEMAS.items():
        packet = getattr(torch.ops.resfused_cuda, name, None)
        assert packet is not None, f"torch.ops.resfused_cuda.{name} is not registered"
        assert str(packet.default._schema) == f"resfused_cuda::{schema}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resfused_cuda::{name}", "CUDA"), \
            f"resfused_cuda::{name} has no CUDA kernel"
    from resfused import _backend
    assert _backend.cuda_ext() is not None, _backend._cuda_ext_status()[1]


# ---------------------------------------------------------------------------------------------------
# GPU tests
# ---------------------------------------------------------------------------------------------------

SCHEMES = ["two_pass", "persistent"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
BATCH = 32
# (C, H = W) of every BN (+ residual add) + ReLU output in ResNet-50 at 224x224
RESNET50 = {
    "stem_64x112": (64, 112),
    "l1_64x56": (64, 56),
    "l1_256x56": (256, 56),
    "l2_128x28": (128, 28),
    "l2_512x28": (512, 28),
    "l3_256x14": (256, 14),
    "l3_1024x14": (1024, 14),
    "l4_512x7": (512, 7),
    "l4_2048x7": (2048, 7),
}
# channel counts that are not multiples of 8 and spatial sizes that are not multiples of 8
ODD = {
    "C3_56x56": (4, 3, 56, 56),
    "C13_7x7": (16, 13, 7, 7),
    "C100_14x14": (8, 100, 14, 14),
    "C40_9x11": (3, 40, 9, 11),
    "C1_5x5": (6, 1, 5, 5),
    "C24_1x1": (32, 24, 1, 1),
}


def _ops():
    return torch.ops.resfused_cuda


def _channels(layout):
    """A channel count the persistent scheme can take in this layout: nchw persistent blocks own one
    channel each, so C must not exceed the co-resident blocks (one 512-thread block per SM)."""
    return 256 if layout == "cl" else 64


@pytest.fixture
def ext():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from resfused import _backend
    if _backend.cuda_ext() is None:
        pytest.fail(f"resfused._C unavailable on a GPU machine: {_backend._cuda_ext_status()[1]}")
    return _ops()


@pytest.fixture(params=SCHEMES)
def scheme(request, monkeypatch):
    monkeypatch.setenv("RESFUSED_CUDA_SCHEME", request.param)
    monkeypatch.delenv("RESFUSED_CUDA_PERSISTENT_CACHE_BYTES", raising=False)
    return request.param


def _act(shape, dtype, layout, gen, scale=1.0, offset=0.0, misalign=0):
    """A dense (N, C, H, W) tensor in ``layout``; ``misalign`` elements of storage offset when > 0."""
    n, c, h, w = shape
    numel = n * c * h * w
    flat = (torch.randn(numel + misalign, generator=gen) * scale + offset).to(dtype).to(DEVICE)[misalign:]
    if layout == "cl":
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(n, c, h, w)


def _inputs(shape, dtype, layout, *, seed=0, misalign=0, residual=True, affine=True):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = _act(shape, dtype, layout, g, scale=2.0, offset=0.5, misalign=misalign)
    z = _act(shape, dtype, layout, g, misalign=misalign) if residual else None
    dy = _act(shape, dtype, layout, g, misalign=misalign)
    if _layout.layout_of(x) == "nchw":  # C == 1 or H == W == 1: both layouts are the same memory
        z = None if z is None else z.contiguous()
        dy = dy.contiguous()
    w = (torch.randn(c, generator=g) * 0.5 + 1).to(DEVICE) if affine else None
    b = (torch.randn(c, generator=g) * 0.5).to(DEVICE) if affine else None
    rm = (torch.randn(c, generator=g) * 0.1).to(DEVICE)
    rv = (torch.rand(c, generator=g) + 0.5).to(DEVICE)
    return x, z, w, b, rm, rv, dy


def _d(t):
    return None if t is None else t.double()


def _check_mask(mask, mask64, pre64, x):
    layout = _layout.layout_of(x)
    assert mask.dtype == torch.uint8 and mask.shape == mask64.shape
    assert torch.equal(mask, _layout.pack_mask(_layout.unpack_mask(mask, x.shape, layout), layout)), \
        "padding bits past the packed axis must be zero"
    differ = _layout.unpack_mask(mask, x.shape, layout) != _layout.unpack_mask(mask64, x.shape, layout)
    bound = 1e-4 * max(1.0, pre64.abs().max().item())
    assert (pre64[differ].abs() <= bound).all(), f"{int(differ.sum())} mask bits differ away from zero"


def _compare_train(x, z, w, b, rm, rv, dy, *, relu=True, momentum=0.1, eps=1e-5):
    """cuda forward_train / forward_eval / backward against the reference in float64 (oracle) and in x's dtype."""
    ops = _ops()
    dtype = x.dtype
    rm_c, rv_c, rm_r, rv_r, rm_64, rv_64 = rm.clone(), rv.clone(), rm.clone(), rv.clone(), rm.double(), rv.double()
    y, mask, mean, invstd = ops.bn_add_relu_forward_train(x, z, w, b, rm_c, rv_c, momentum, eps, relu)
    y_r, mask_r, mean_r, invstd_r = ref.forward_train(x, z, w, b, rm_r, rv_r, momentum, eps, relu)
    y_64, mask_64, mean_64, invstd_64 = ref.forward_train(x.double(), _d(z), _d(w), _d(b), rm_64, rv_64, momentum,
                                                          eps, relu)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride(), "y must be laid out like x"
    assert mean.dtype == invstd.dtype == torch.float32 and mean.shape == (x.shape[1],)
    assert_close("y", y, y_64, dtype, y_r)
    assert_close("mean", mean, mean_64, torch.float32, mean_r)
    assert_close("invstd", invstd, invstd_64, torch.float32, invstd_r)
    assert_close("running_mean", rm_c, rm_64, torch.float32, rm_r)
    assert_close("running_var", rv_c, rv_64, torch.float32, rv_r)
    if relu:
        pre = (x.double() - mean_64.view(1, -1, 1, 1)) * invstd_64.view(1, -1, 1, 1)
        if w is not None:
            pre = pre * w.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1)
        if z is not None:
            pre = pre + z.double()
        _check_mask(mask, mask_64, pre, x)
    else:
        assert mask.numel() == 0 and mask.dtype == torch.uint8

    # backward from the reference's saved tensors (the contract every backend shares)
    outs = ops.bn_add_relu_backward(dy, x, mask_r, mean_r, invstd_r, w, relu, True, True, True, True)
    outs_r = ref.backward(dy, x, mask_r, mean_r, invstd_r, w, relu, True, True, True, True)
    outs_64 = ref.backward(dy.double(), x.double(), mask_r, mean_r.double(), invstd_r.double(), _d(w), relu, True,
                           True, True, True)
    for name, got, want, base in zip(("grad_input", "grad_residual", "grad_weight", "grad_bias"), outs, outs_64,
                                     outs_r):
        assert got.dtype == base.dtype, name
        if name in ("grad_input", "grad_residual"):
            assert got.stride() == x.stride(), f"{name} must be laid out like x"
        if name == "grad_residual":
            assert torch.equal(got, base), "grad_residual is dy * mask exactly"
        else:
            assert_close(name, got, want, got.dtype, base)

    # eval forward from the running stats
    ye, me = ops.bn_add_relu_forward_eval(x, z, w, b, rm, rv, eps, relu, True)
    ye_r, me_r = ref.forward_eval(x, z, w, b, rm, rv, eps, relu, True)
    ye_64, _ = ref.forward_eval(x.double(), _d(z), _d(w), _d(b), rm.double(), rv.double(), eps, relu, True)
    assert_close("y_eval", ye, ye_64, dtype, ye_r)
    if relu:
        assert (me != me_r).sum().item() <= max(1, me.numel() // 1000), "eval mask differs beyond rounding"


@pytest.mark.cuda
@pytest.mark.parametrize("shape", RESNET50.values(), ids=RESNET50.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_resnet50_shapes_match_reference(ext, scheme, dtype, layout, shape):
    c, hw = shape
    _compare_train(*_inputs((BATCH, c, hw, hw), dtype, layout, residual=c != 64 or hw != 112))


@pytest.mark.cuda
@pytest.mark.parametrize("misalign", [0, 1], ids=["aligned", "offset1"])
@pytest.mark.parametrize("shape", ODD.values(), ids=ODD.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_odd_channels_and_misaligned_tensors(ext, scheme, dtype, layout, shape, misalign):
    x, z, w, b, rm, rv, dy = _inputs(shape, dtype, layout, misalign=misalign, seed=1)
    if misalign:
        assert x.data_ptr() % 16 != 0
    _compare_train(x, z, w, b, rm, rv, dy)


VARIANTS = {
    "no_residual": dict(residual=False),
    "no_affine": dict(affine=False),
    "no_relu": dict(relu=False),
    "no_residual_no_relu_no_affine": dict(residual=False, relu=False, affine=False),
}


@pytest.mark.cuda
@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_variants(ext, scheme, dtype, layout, variant):
    variant = dict(variant)
    relu = variant.pop("relu", True)
    _compare_train(*_inputs((8, 96, 20, 20), dtype, layout, **variant), relu=relu, momentum=0.3, eps=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("cap", [0, 16384], ids=["no_cache", "cache_16KiB"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_persistent_reread_path(ext, monkeypatch, dtype, layout, cap):
    """The persistent kernels with a capped on-chip cache: slices are re-read (in reverse order)."""
    monkeypatch.setenv("RESFUSED_CUDA_SCHEME", "persistent")
    monkeypatch.setenv("RESFUSED_CUDA_PERSISTENT_CACHE_BYTES", str(cap))
    shape = (BATCH, 64, 56, 56) if layout == "cl" else (BATCH, 16, 56, 56)
    x, z, w, b, rm, rv, dy = _inputs(shape, dtype, layout, seed=2)
    for op in ("forward_train", "backward"):
        plan = ext.bn_add_relu_plan(x, op)
        assert plan.startswith("persistent"), plan
        fields = dict(kv.split("=") for kv in plan.split()[1:])
        assert int(fields["cache_iters"]) < int(fields["iters"]), plan
    _compare_train(x, z, w, b, rm, rv, dy)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_scheme_selection(ext, monkeypatch, layout):
    x = _inputs((BATCH, _channels(layout), 56, 56), torch.float16, layout)[0]
    monkeypatch.setenv("RESFUSED_CUDA_SCHEME", "two_pass")
    assert ext.bn_add_relu_plan(x, "forward_train").startswith("two_pass")
    assert ext.bn_add_relu_plan(x, "backward").startswith("two_pass")
    monkeypatch.setenv("RESFUSED_CUDA_SCHEME", "persistent")
    assert ext.bn_add_relu_plan(x, "forward_train").startswith("persistent")
    assert ext.bn_add_relu_plan(x, "backward").startswith("persistent")
    monkeypatch.setenv("RESFUSED_CUDA_SCHEME", "auto")
    # the planner's cost model prefers persistent here (its CPU tests: tests/test_bn_add_relu_planner.py)
    for op in ("forward_train", "backward"):
        plan = ext.bn_add_relu_plan(x, op)
        assert plan.startswith("persistent") and float(plan.split("est_us=")[1]) > 0, plan
    # more channels than co-resident blocks: NCHW cannot run persistent and falls back
    wide = _inputs((BATCH, 2048, 7, 7), torch.float16, "nchw")[0]
    monkeypatch.setenv("RESFUSED_CUDA_SCHEME", "persistent")
    assert ext.bn_add_relu_plan(wide, "forward_train").startswith("two_pass")
    monkeypatch.setenv("RESFUSED_CUDA_SCHEME", "bogus")
    with pytest.raises(RuntimeError, match="RESFUSED_CUDA_SCHEME"):
        ext.bn_add_relu_plan(x, "forward_train")


NEEDS = [  # (training, need_input_grad, need_residual_grad, need_weight_grad)
    (True, True, True, True), (True, True, False, False), (True, False, True, False), (True, False, False, True),
    (True, True, True, False), (False, True, True, True), (False, True, False, False), (False, False, False, True),
]


@pytest.mark.cuda
@pytest.mark.parametrize("needs", NEEDS, ids=lambda n: "train" * n[0] + "eval" * (not n[0]) + "_" +
                         "".join(c for c, f in zip("xrw", n[1:]) if f))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_output_subsets(ext, scheme, layout, needs):
    training, nx, nr, nw = needs
    x, z, w, b, rm, rv, dy = _inputs((BATCH, 128, 28, 28), torch.float16, layout, seed=3)
    _, mask, mean, invstd = ref.forward_train(x, z, w, b, None, None, 0.1, 1e-5, True)
    if not training:
        mean, invstd = rm, torch.rsqrt(rv + 1e-5)
    outs = ext.bn_add_relu_backward(dy, x, mask, mean, invstd, w, True, training, nx, nr, nw)
    outs_r = ref.backward(dy, x, mask, mean, invstd, w, True, training, nx, nr, nw)
    outs_64 = ref.backward(dy.double(), x.double(), mask, mean.double(), invstd.double(), w.double(), True,
                           training, nx, nr, nw)
    for name, asked, got, want, base in zip(("grad_input", "grad_residual", "grad_weight", "grad_bias"),
                                            (nx, nr, nw, nw), outs, outs_64, outs_r):
        if not asked:
            assert got.numel() == 0, f"{name} not asked for, yet returned {tuple(got.shape)}"
            continue
        assert_close(name, got, want, got.dtype, base)


def _bits(t):
    """The raw bits of t (same shape and strides), so that -0.0 != 0.0 and NaN == NaN."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_deterministic(ext, scheme, layout):
    """Per-block partials merged in a fixed order, no atomics: reruns are bit-identical."""
    x, z, w, b, rm, rv, dy = _inputs((BATCH, _channels(layout), 56, 56), torch.float16, layout, seed=4)
    runs = []
    for _ in range(2):
        rm_c, rv_c = rm.clone(), rv.clone()
        y, mask, mean, invstd = ext.bn_add_relu_forward_train(x, z, w, b, rm_c, rv_c, 0.1, 1e-5, True)
        grads = ext.bn_add_relu_backward(dy, x, mask, mean, invstd, w, True, True, True, True, True)
        runs.append([y, mask, mean, invstd, rm_c, rv_c, *grads])
    for a, b_ in zip(*runs):
        assert torch.equal(_bits(a), _bits(b_))


@pytest.mark.cuda
def test_empty_batch(ext, scheme):
    x = torch.empty(0, 8, 4, 4, device=DEVICE)
    w, b = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    rm, rv = torch.zeros(8, device=DEVICE), torch.ones(8, device=DEVICE)
    y, mask, mean, invstd = ext.bn_add_relu_forward_train(x, None, w, b, rm, rv, 0.1, 1e-5, True)
    _, _, mean_r, invstd_r = ref.forward_train(x, None, w, b, None, None, 0.1, 1e-5, True)
    assert y.shape == x.shape and mask.shape == (0, 2)
    assert torch.isnan(mean).all() and torch.isnan(mean_r).all() and torch.isnan(invstd).all()
    gx, gz, gw, gb = ext.bn_add_relu_backward(x, x, mask, mean, invstd, w, True, True, True, True, True)
    assert gx.shape == x.shape and gz.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros_like(gb))


def _train_step(ext, x, z, w, b, rm, rv, dy):
    y, mask, mean, invstd = ext.bn_add_relu_forward_train(x, z, w, b, rm, rv, 0.1, 1e-5, True)
    grads = ext.bn_add_relu_backward(dy, x, mask, mean, invstd, w, True, True, True, True, True)
    ye, _ = ext.bn_add_relu_forward_eval(x, z, w, b, rm, rv, 1e-5, True, False)
    return [y, mask, mean, invstd, *grads, ye]


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_host_sync(ext, scheme, layout):
    x, z, w, b, rm, rv, dy = _inputs((BATCH, _channels(layout), 28, 28), torch.bfloat16, layout, seed=5)
    """A training step never waits for the GPU: queued behind a ~1 s GPU sleep, the step returns while the
    stream is still busy (any host synchronisation, instrumented by PyTorch's sync debug mode or not, would
    wait the sleep out), and then gives the results of a step run without the sleep."""
    rm0, rv0 = rm.clone(), rv.clone()
    want = _train_step(ext, x, z, w, b, rm0, rv0, dy)  # first call: device queries, kernel attributes
    torch.cuda.synchronize()
    stream = torch.cuda.current_stream()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU clock cycles ahead of the step
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = _train_step(ext, x, z, w, b, rm, rv, dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    busy = not stream.query()
    torch.cuda.synchronize()
    assert busy, "the training step waited for the GPU (a host synchronisation)"
    for a, b_ in zip(got, want):
        assert torch.equal(_bits(a), _bits(b_))
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_graph_capture_and_replay(ext, scheme, layout):
    """Current stream only, no host sync: the ops capture into a CUDA graph and replay to eager's bits."""
    x, z, w, b, rm, rv, dy = _inputs((BATCH, _channels(layout), 28, 28), torch.float16, layout, seed=6)
    rm0, rv0 = rm.clone(), rv.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _train_step(ext, x, z, w, b, rm.clone(), rv.clone(), dy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _train_step(ext, x, z, w, b, rm, rv, dy)
    for _ in range(2):
        rm.copy_(rm0)
        rv.copy_(rv0)
        graph.replay()
        graph_rm, graph_rv = rm.clone(), rv.clone()
        rm_e, rv_e = rm0.clone(), rv0.clone()
        eager = _train_step(ext, x, z, w, b, rm_e, rv_e, dy)
        torch.cuda.synchronize()
        for a, b_ in zip(static_out, eager):
            assert torch.equal(_bits(a), _bits(b_))
        assert torch.equal(graph_rm, rm_e) and torch.equal(graph_rv, rv_e)


@pytest.mark.cuda
def test_bad_input_messages_name_the_tensor(ext):
    x = torch.randn(2, 8, 4, 4, device=DEVICE)
    w = torch.ones(8, device=DEVICE)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        ext.bn_add_relu_forward_train(x.double(), None, None, None, None, None, 0.1, 1e-5, True)
    with pytest.raises(RuntimeError, match="weight must be float32"):
        ext.bn_add_relu_forward_train(x.half(), None, w.half(), None, None, None, 0.1, 1e-5, True)
    with pytest.raises(RuntimeError, match=r"running_var must have shape \(8,\)"):
        ext.bn_add_relu_forward_train(x, None, None, None, w, w[:4], 0.1, 1e-5, True)
    with pytest.raises(RuntimeError, match="residual must have x's memory layout"):
        ext.bn_add_relu_forward_train(x, x.contiguous(memory_format=torch.channels_last), None, None, None, None,
                                      0.1, 1e-5, True)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        ext.bn_add_relu_forward_eval(x[:, :, :, ::2], None, None, None, w, w, 1e-5, True, True)
    _, mask, mean, invstd = ext.bn_add_relu_forward_train(x, None, None, None, None, None, 0.1, 1e-5, True)
    with pytest.raises(RuntimeError, match="mask must be"):
        ext.bn_add_relu_backward(x, x, mask[:-1], mean, invstd, None, True, True, True, True, True)
    with pytest.raises(RuntimeError, match="grad_out must have x's dtype"):
        ext.bn_add_relu_backward(x.half(), x, mask, mean, invstd, None, True, True, True, True, True)
