"""resfused.fuse_for_inference on torchvision ResNets against the stock eval model, per backend.

Every model gets non-trivial BatchNorm statistics and affine parameters (torchvision initialises them to the
identity, which would hide folding mistakes). A fused result in dtype d passes when its error against the
float64 stock model is, at every element, within a few times the error of the stock model run in d there (or
2 ulps of the element; tests/_oracle.py). CPU: reference on every
net, the Triton interpreter on the smallest ones (it is slow); GPU: every backend.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")

import resfused  # noqa: E402
from resfused.fuse import FusedConv2d, fold_conv_bn, fuse_for_inference  # noqa: E402
from resfused.ops import conv_bias_act as op  # noqa: E402

from _oracle import assert_close, exact_zero_eps  # noqa: E402
from conftest import DEVICE, HAS_CUDA, usable_backends  # noqa: E402

# On a GPU every backend, available or not (a missing one fails its tests, see conftest.usable_backends).
BACKENDS = usable_backends(DEVICE, lambda b, d: op.unavailable_reason(b, d, torch.float32))
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
NETS = ("resnet18", "resnet34", "resnet50", "resnet101")
# The interpreter runs ResNet-18 at 32x32 in a few seconds; on a GPU each new conv geometry compiles a Triton
# kernel (one fixed config in tests, see conftest.py), so the GPU run covers one net of each block type.
TRITON_NETS = ("resnet18", "resnet50") if HAS_CUDA else ("resnet18",)


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _randomize_bn(model: nn.Module, seed: int = 0, var_scale: float = 1.0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_((torch.rand(c, generator=g) + 0.5) * var_scale)
                m.weight.copy_(torch.rand(c, generator=g) * 0.6 + 0.4)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model


_NET_CACHE: dict = {}

# Small relatives of the big variants, one block per stage: same block code paths, a fraction of the CPU time.
_TINY = {
    "resnext_tiny": lambda: torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1],
                                                             groups=32, width_per_group=4),
    "wide_resnet_tiny": lambda: torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1],
                                                                 width_per_group=128),
    "dilated_resnet_tiny": lambda: torchvision.models.resnet.ResNet(
        torchvision.models.resnet.Bottleneck, [1, 1, 2, 1], replace_stride_with_dilation=[False, True, True]),
}


def _net(name: str) -> nn.Module:
    """A torchvision net with random BN stats, in eval mode, on DEVICE (cached: building ResNet-101 takes ~2 s)."""
    if name not in _NET_CACHE:
        torch.manual_seed(0)
        net = _TINY[name]() if name in _TINY else getattr(torchvision.models, name)()
        _NET_CACHE[name] = _randomize_bn(net).eval().to(DEVICE)
    return _NET_CACHE[name]


def _images(n=1, size=32, layout="nchw", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    return x.to(DEVICE, dtype).contiguous(memory_format=LAYOUTS[layout])


_STOCK_CACHE: dict = {}


def _stock(model, x, dtype):
    """(float64 oracle, stock result in dtype), cached per (model, input, dtype). ``model`` is cast on copies.

    The cache holds the model itself: keyed by id() alone, a model freed by an earlier test could hand its
    id, and so its cached results, to a new model."""
    key = (id(model), x.shape, x.stride(), x.sum().item(), dtype)
    hit = _STOCK_CACHE.get(key)
    if hit is None or hit[0] is not model:
        with torch.no_grad():
            ref = exact_zero_eps(copy.deepcopy(model).double())(x.double())
            stock = exact_zero_eps(copy.deepcopy(model).to(dtype))(x.to(dtype))
        _STOCK_CACHE[key] = hit = (model, ref, stock)
    return hit[1], hit[2]


def _assert_matches_stock(fused, model, x, dtype, factor=4.0, pointwise=False):
    """Whole nets: within ``factor`` times stock's largest error, or 2 ulps of each element (pointwise=False,
    see tests/_oracle.py); single blocks and layers (pointwise=True): elementwise against stock's error."""
    ref, stock = _stock(model, x, dtype)
    with torch.no_grad():
        y = fused(x.to(dtype))
    assert y.shape == ref.shape and y.dtype == dtype
    assert_close("output", y, ref, dtype, stock, factor=factor, pointwise=pointwise)


def _no_batchnorm(model):
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# ---------------------------------------------------------------------------------------------------
# whole nets
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", NETS)
def test_resnets_reference(name, layout):
    model = _net(name)
    fused = fuse_for_inference(model, backend="reference")
    assert _no_batchnorm(fused)
    _assert_matches_stock(fused, model, _images(layout=layout), torch.float32)


FUSED_CASES = [(b, n) for b in BACKENDS if b != "reference" for n in (NETS if b == "cuda" else TRITON_NETS)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend,name", FUSED_CASES, ids=[f"{b}-{n}" for b, n in FUSED_CASES])
def test_resnets_fused_backends(backend, name, layout):
    model = _net(name)
    fused = fuse_for_inference(model, backend=backend)
    _assert_matches_stock(fused, model, _images(layout=layout), torch.float32)


LOW_PRECISION = [(b, d) for b in BACKENDS for d in (torch.float16, torch.bfloat16)
                 if HAS_CUDA or b == "reference" or d == torch.bfloat16]  # the interpreter: bf16 only


@pytest.mark.parametrize("backend,dtype", LOW_PRECISION, ids=[f"{b}-{str(d)[6:]}" for b, d in LOW_PRECISION])
def test_low_precision(backend, dtype):
    """A bf16/fp16 model (folded in fp32, then cast) against the stock model in the same dtype."""
    model = _net("resnet18")
    low = copy.deepcopy(model).to(dtype)
    fused = fuse_for_inference(low, backend=backend)
    assert all(p.dtype == dtype for p in fused.parameters())
    _assert_matches_stock(fused, model, _images(layout="cl"), dtype)


def test_fused_model_cast_after_fusing():
    """fuse_for_inference(fp32 model).to(bf16) works like fusing a bf16 model (folding stays fp32-exact)."""
    model = _net("resnet18")
    fused = fuse_for_inference(model).to(torch.bfloat16)
    _assert_matches_stock(fused, model, _images(layout="nchw"), torch.bfloat16)


@pytest.mark.parametrize("name", ["resnext_tiny", "wide_resnet_tiny"])
def test_grouped_and_wide_reference(name):
    model = _net(name)
    fused = fuse_for_inference(model, backend="reference")
    assert _no_batchnorm(fused)
    _assert_matches_stock(fused, model, _images(layout="cl"), torch.float32)


def test_dilated_reference():
    """replace_stride_with_dilation: dilated 3x3 convs and stride-1 projection shortcuts."""
    model = _net("dilated_resnet_tiny")
    fused = fuse_for_inference(model, backend="reference")
    _assert_matches_stock(fused, model, _images(layout="nchw"), torch.float32)


# ---------------------------------------------------------------------------------------------------
# single blocks on the fused backends (cheap enough for the interpreter)
# ---------------------------------------------------------------------------------------------------

def _first_blocks(name):
    """layer2[0] of ``name``: a strided block with a projection shortcut, and its input channels."""
    block = _net(name).layer2[0]
    return block, block.conv1.in_channels


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("block_of", ["resnet18", "resnet50", "resnext_tiny"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_downsampling_block(backend, block_of, layout):
    """Strided block whose projection shortcut is fused as a dual GEMM into its last conv."""
    block, c_in = _first_blocks(block_of)
    fused = fuse_for_inference(block, backend=backend)
    inner = fused.module
    last = inner.conv3 if hasattr(inner, "conv3") else inner.conv2
    assert last.has_shortcut and inner.downsample is None
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, c_in, 6, 6, generator=g).to(DEVICE).contiguous(memory_format=LAYOUTS[layout])
    _assert_matches_stock(fused, block, x, torch.float32, pointwise=True)


def _without_bn_bias(model: nn.Module) -> nn.Module:
    """Every BN of ``model`` bias-free, as nn.BatchNorm2d(bias=False) builds it in torch >= 2.14 (weight kept, bias
    None), set by hand so that torch 2.11 (the GPU machine's) runs the case too."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_parameter("bias", None)
    return model


@pytest.mark.parametrize("block_of", ["resnet18", "resnet50"])
@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_bias_free_bns_fold(backend, block_of):
    """A BN without bias (torch >= 2.14's nn.BatchNorm2d(bias=False)) folds with a zero shift: the fused block,
    projection shortcut included, matches stock's elementwise."""
    block = _without_bn_bias(copy.deepcopy(_first_blocks(block_of)[0]))
    c_in = block.conv1.in_channels
    fused = fuse_for_inference(block, backend=backend)
    assert _no_batchnorm(fused)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, c_in, 6, 6, generator=g).to(DEVICE)
    _assert_matches_stock(fused, block, x, torch.float32, pointwise=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_avgpool_downsample_block(backend, caplog):
    """A ResNet-D style shortcut (avg-pool, 1x1 conv, BN) cannot ride the dual GEMM: it is folded and run
    separately, its output feeding the last conv's residual input."""
    torch.manual_seed(2)
    block = torchvision.models.resnet.BasicBlock(16, 32, stride=2, downsample=nn.Sequential(
        nn.AvgPool2d(2), nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32)))
    block = _randomize_bn(block, seed=4).eval().to(DEVICE)
    with caplog.at_level(logging.INFO, logger="resfused"):
        fused = fuse_for_inference(block, backend=backend)
    assert not fused.module.conv2.has_shortcut
    assert isinstance(fused.module.downsample[1], FusedConv2d) and not fused.module.downsample[1].relu
    assert _no_batchnorm(fused)
    x = torch.randn(1, 16, 6, 6, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    _assert_matches_stock(fused, block, x, torch.float32, pointwise=True)


# ---------------------------------------------------------------------------------------------------
# API semantics
# ---------------------------------------------------------------------------------------------------

def test_input_model_unchanged():
    model = _net("resnet50")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    types = [type(m) for m in model.modules()]
    fused = fuse_for_inference(model)
    with torch.no_grad():
        fused(_images())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [id(p) for p in model.parameters()] == params
    assert [type(m) for m in model.modules()] == types
    assert not model.training
    fused_ptrs = {p.data_ptr() for p in fused.parameters()}
    assert not fused_ptrs & {p.data_ptr() for p in model.parameters()}, "the fused model must own its tensors"


def test_input_model_in_train_mode_stays_in_train_mode():
    model = torchvision.models.resnet18().to(DEVICE).train()
    fuse_for_inference(model)
    assert all(m.training for m in model.modules())


def test_structure():
    fused = fuse_for_inference(_net("resnet50"))
    inner = fused.module
    assert isinstance(inner.conv1, FusedConv2d) and inner.conv1.relu
    assert isinstance(inner.bn1, nn.Identity) and isinstance(inner.relu, nn.Identity)
    n_fused = sum(isinstance(m, FusedConv2d) for m in fused.modules())
    assert n_fused == 1 + 16 * 3  # stem + three convs per Bottleneck; the 4 downsamples ride on conv3
    assert sum(isinstance(m, FusedConv2d) and m.has_shortcut for m in fused.modules()) == 4
    assert not any(p.requires_grad for p in fused.parameters())
    assert _no_batchnorm(fused)


def test_train_raises_eval_works():
    fused = fuse_for_inference(_net("resnet18"))
    with pytest.raises(RuntimeError, match="inference-only"):
        fused.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        fused.module.layer1[0].train(True)
    assert fused.eval() is fused
    assert not fused.training and not any(m.training for m in fused.modules())


def test_backend_default_and_explicit():
    model = _net("resnet18")
    x = _images()
    resfused.set_backend("reference")
    with torch.no_grad():
        y_default = fuse_for_inference(model)(x)
        y_ref = fuse_for_inference(model, backend="reference")(x)
    assert torch.equal(y_default, y_ref)
    with pytest.raises(ValueError, match="backend must be one of"):
        fuse_for_inference(model, backend="fast")
    if DEVICE.type == "cpu":
        with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
            fuse_for_inference(model, backend="cuda")(x)


def test_dtype_mismatch_raises_like_stock():
    fused = fuse_for_inference(_net("resnet18"))
    with pytest.raises(TypeError, match="dtype"):
        fused(_images(dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------------
# folding
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["tiny_var", "zero_eps_tiny_var", "large_eps", "large_mean", "no_affine",
                                  "conv_bias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fold_extreme_running_stats(backend, case):
    """conv -> BN with extreme statistics: folded weights stay within fp32 rounding of stock conv+BN."""
    g = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=(case == "conv_bias"))
    bn = nn.BatchNorm2d(16, eps={"zero_eps_tiny_var": 0.0, "large_eps": 10.0}.get(case, 1e-5),
                        affine=(case != "no_affine"))
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(16, generator=g))
        bn.running_mean.copy_(torch.randn(16, generator=g) * (100.0 if case == "large_mean" else 0.1))
        var = torch.rand(16, generator=g) + 0.5
        if case in ("tiny_var", "zero_eps_tiny_var"):
            var = var * 1e-9
        bn.running_var.copy_(var)
        if bn.affine:
            bn.weight.copy_(torch.rand(16, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(16, generator=g))
    model = nn.Sequential(conv, bn, nn.ReLU()).eval().to(DEVICE)
    fused = fuse_for_inference(model, backend=backend)
    assert isinstance(fused.module[0], FusedConv2d) and fused.module[0].relu
    assert _no_batchnorm(fused)
    x = torch.randn(2, 8, 5, 5, generator=g).to(DEVICE)
    if case == "large_mean":
        x = x + 30.0
    _assert_matches_stock(fused, model, x, torch.float32, factor=8.0, pointwise=True)


@pytest.fixture
def f_batch_norm_rejects_zero_eps(monkeypatch):
    """F.batch_norm as torch < 2.13 has it (torch 2.11 runs on the GPU machine): eps <= 0 raises in every mode."""
    real = torch.nn.functional.batch_norm

    def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive, but got {eps}")
        return real(input, running_mean, running_var, weight, bias, training, momentum, eps)

    monkeypatch.setattr(torch.nn.functional, "batch_norm", batch_norm)


def test_fold_zero_eps_without_f_batch_norm_taking_it(f_batch_norm_rejects_zero_eps):
    """Folding a BN with eps=0 (allowed: resfused/fuse.py) is checked by an oracle that never asks F.batch_norm
    for eps=0, so the check runs on every torch (torch 2.11's F.batch_norm rejects it even in eval)."""
    test_fold_extreme_running_stats("reference", "zero_eps_tiny_var")


def test_fold_conv_bn_formula():
    conv = nn.Conv2d(3, 4, 1, bias=True)
    bn = _randomize_bn(nn.Sequential(nn.BatchNorm2d(4)))[0].eval()
    w, b = fold_conv_bn(conv, bn)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert torch.allclose(w, conv.weight * scale.view(-1, 1, 1, 1))
    assert torch.allclose(b, bn.bias + (conv.bias - bn.running_mean) * scale)
    assert w.data_ptr() != conv.weight.data_ptr()


def test_bn_without_running_stats_raises():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="cannot fold the BatchNorm"):
        fuse_for_inference(model)


def test_bn_not_after_conv_raises():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"cannot fold the BatchNorm at 0"):
        fuse_for_inference(model)


def test_batchnorm_subclass_with_activation_raises_not_dropped():
    """A BatchNorm subclass that also applies an activation (resfused's BatchNormAddReLU2d, timm's
    BatchNormAct2d) must not be folded as if it were plain BN: that would silently drop the ReLU."""
    from resfused.nn import BatchNormAddReLU2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAddReLU2d(4)).eval()
    with pytest.raises(ValueError, match=r"cannot fold the BatchNorm at 1 \(BatchNormAddReLU2d\)"):
        fuse_for_inference(model)


@pytest.mark.parametrize("fuse_convs", [False, True], ids=["convert", "convert_fuse_convs"])
def test_converted_model_fuses_like_stock(fuse_convs):
    """convert (for training), then fuse_for_inference: the converted blocks are reverted on the copy and fold
    like torchvision's; the converted input model keeps its blocks."""
    model = _net("resnet18")
    converted = resfused.convert(copy.deepcopy(model), fuse_convs=fuse_convs)
    block_types = [type(m) for m in converted.modules()]
    fused = fuse_for_inference(converted, backend="reference")
    assert _no_batchnorm(fused)
    assert [type(m) for m in converted.modules()] == block_types
    _assert_matches_stock(fused, model, _images(), torch.float32)


def test_unsupported_conv_falls_back_and_logs(caplog):
    """A block whose conv pads by reflection keeps cuDNN convs with folded BN, logs once, still matches."""
    model = torchvision.models.resnet18()
    _randomize_bn(model).eval()
    block = model.layer1[0]
    block.conv1.padding_mode = "reflect"
    model = model.to(DEVICE)
    with caplog.at_level(logging.INFO, logger="resfused"):
        fused = fuse_for_inference(model, backend="reference")
    assert _no_batchnorm(fused)
    assert isinstance(fused.module.layer1[0].conv1, nn.Conv2d)
    assert isinstance(fused.module.layer1[1].conv1, FusedConv2d)
    assert any("left on cuDNN convs with folded BN" in r.getMessage() for r in caplog.records)
    _assert_matches_stock(fused, model, _images(), torch.float32)


# ---------------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_resnet50_gpu_batch(backend, dtype):
    """ResNet-50 at batch 4, 96x96, channels_last, every backend, against the stock model in that dtype."""
    model = _net("resnet50")
    low = copy.deepcopy(model).to(dtype)
    fused = fuse_for_inference(low, backend=backend)
    _assert_matches_stock(fused, model, _images(n=4, size=96, layout="cl"), dtype)


@pytest.mark.cuda
def test_cuda_graph_capture(deterministic_cudnn):
    """Replay gives eager's output bit for bit: the same kernels, plans and autotuned configs on the same input."""
    fused = fuse_for_inference(_net("resnet18"))
    x = _images(n=2, size=64, layout="cl")
    with torch.no_grad():
        fused(x)  # warm-up: autotuning and cuDNN plan caches outside capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fused(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, fused(x))
