"""resfused.convert on timm ResNets (timm.models.resnet) and pre-activation ResNetV2s (timm.models.resnetv2):
same outputs, gradients and running stats as stock timm (with drop-path too); checkpoints both ways; non-plain
blocks left alone."""

from __future__ import annotations

import logging
import subprocess
import sys
from functools import partial

import pytest
import torch
from torch import nn

import resfused
from resfused.nn import BatchNormAddReLU2d, TimmBasicBlock, TimmBottleneck

from _oracle import nrel, randomize_batchnorms, sgd_steps
from conftest import DEVICE, HAS_CUDA, usable_backends

timm = pytest.importorskip("timm")
from timm.layers import BatchNormAct2d, BlurPool2d, DropBlock2d, DropPath, SyncBatchNormAct  # noqa: E402
from timm.models import resnet as timm_resnet, resnetv2 as timm_resnetv2  # noqa: E402

PLAIN = ["resnet18", "resnet50"]
PREACT = ["resnetv2_18", "resnetv2_50"]
MODELS = PLAIN + PREACT
# Which blocks are swapped does not depend on the backend, and every backend is checked against the
# reference op by op and on torchvision nets (tests/test_convert.py): on CPU (where the Triton
# interpreter takes minutes per net) these run the reference backend; on a GPU every backend but cuda
# (no float64 kernels).
CASES = [(m, b) for m in MODELS for b in usable_backends() if b != "cuda" and (HAS_CUDA or b == "reference")]


def _model(name, seed=0, **kw):
    torch.manual_seed(seed)
    if name in PREACT:
        kw.setdefault("zero_init_last", False)  # else conv3/conv2 start at zero and block BN grads vanish
    return randomize_batchnorms(timm.create_model(name, pretrained=False, num_classes=10, **kw)).to(DEVICE)


def _stock_blocks(model):
    return [m for m in model.modules() if type(m) in (timm_resnet.BasicBlock, timm_resnet.Bottleneck)]


def _fused_count(model):
    return sum(isinstance(m, BatchNormAddReLU2d) for m in model.modules())


# resnet18: 8 blocks x 2 BNs; resnet50: 16 x 3; resnetv2_18: 8 blocks x 2 pre-activation norms; resnetv2_50: 16 x 3
FUSED_BNS = {"resnet18": 16, "resnet50": 48, "resnetv2_18": 16, "resnetv2_50": 48}


def _assert_fully_converted(name, model):
    assert _fused_count(model) == FUSED_BNS[name]
    assert not _stock_blocks(model)
    for block in model.modules():
        if type(block) in (timm_resnetv2.PreActBasic, timm_resnetv2.PreActBottleneck):
            assert not any(type(m) is BatchNormAct2d for m in block.modules())


def _assert_state_close(ours, stock, tol):
    sd = stock.state_dict()
    assert list(ours.state_dict()) == list(sd)
    for k, v in ours.state_dict().items():
        if v.is_floating_point():
            assert nrel(v, sd[k]) < tol, k
        else:
            assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("name,backend", CASES)
def test_training_steps_match_stock_float64(name, backend):
    """Two SGD steps in float64 (as tests/test_convert.py: no ReLU-mask flips at rounding level): outputs,
    parameter gradients, parameters and BN buffers equal stock timm to 1e-6 (norm-relative)."""
    torch.manual_seed(0)
    # 32x32 (layer4 BNs see 4 values per channel): at 16x16 some layer3/4 channels of resnet50 reach BN
    # with (near-)zero variance, where any two implementations' rounding differs at O(1) relative level
    x = torch.randn(4, 3, 32, 32, device=DEVICE, dtype=torch.float64)
    target = torch.randint(0, 10, (4,), device=DEVICE)
    stock = _model(name).double()
    ours = resfused.convert(_model(name).double(), backend=backend)
    _assert_fully_converted(name, ours)
    (outs_s, grads_s), (outs_o, grads_o) = sgd_steps(stock, x, target), sgd_steps(ours, x, target)
    for step, (a, b) in enumerate(zip(outs_o, outs_s)):
        assert nrel(a, b) < 1e-6, f"output of step {step}"
    for n, g in grads_o.items():
        assert nrel(g, grads_s[n]) < 1e-6, f"grad {n}"
    _assert_state_close(ours, stock, 1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_eval_matches_stock(name):
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    stock = _model(name).eval()
    ours = resfused.convert(_model(name), backend="reference").eval()
    _assert_fully_converted(name, ours)
    with torch.no_grad():
        # norm-relative: fp32 rounding differences grow through 50 layers (measured ~1e-6 here); a wrong
        # fusion gives O(1)
        assert nrel(ours(x), stock(x)) < 1e-5


@pytest.mark.parametrize("name", MODELS)
def test_checkpoints_load_both_ways(name, tmp_path):
    stock = _model(name)
    ours = resfused.convert(_model(name, seed=1))
    assert list(ours.state_dict()) == list(stock.state_dict())
    ours.load_state_dict(stock.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(v, stock.state_dict()[k]), k
    fused = next(m for m in ours.modules() if isinstance(m, BatchNormAddReLU2d))
    with torch.no_grad():
        fused.running_mean.add_(1.0)
    torch.save(ours.state_dict(), tmp_path / "ckpt.pt")
    fresh = _model(name, seed=2)
    fresh.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k


@pytest.mark.parametrize("name", MODELS)
def test_revert(name):
    model = _model(name)
    params = {n: p for n, p in model.named_parameters()}
    resfused.revert(resfused.convert(model))
    assert _fused_count(model) == 0
    assert {n: p for n, p in model.named_parameters()} == params  # the same tensor objects
    types = lambda m: [type(s) for s in m.modules()]  # noqa: E731
    assert types(model) == types(_model(name))
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), _model(name).eval()(x), rtol=0, atol=0)


def test_fused_block_structure():
    model = resfused.convert(_model("resnet50"))
    block = model.layer1[0]
    assert isinstance(block, TimmBottleneck)
    assert [n for n, _ in block.named_children()] == ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample"]
    assert type(block.downsample[1]) is nn.BatchNorm2d
    assert isinstance(resfused.convert(_model("resnet18")).layer4[1], TimmBasicBlock)
    v2 = resfused.convert(_model("resnetv2_50"))
    pre = v2.stages[1].blocks[0]
    assert type(pre) is timm_resnetv2.PreActBottleneck
    assert [n for n, _ in pre.named_children()] == ["downsample", "norm1", "conv1", "norm2", "conv2", "norm3",
                                                    "conv3", "drop_path"]
    assert all(type(getattr(pre, f"norm{i}")) is BatchNormAddReLU2d for i in (1, 2, 3))
    assert type(v2.norm) is BatchNormAct2d  # the final norm is not a block's pre-activation


def _one_block_cases():
    return {
        "attention": (lambda: timm_resnet.BasicBlock(8, 8, attn_layer="se"), "attention module (se: SEModule)"),
        "anti_aliasing": (lambda: timm_resnet.BasicBlock(8, 8, stride=2, aa_layer=BlurPool2d,
                                                         downsample=nn.Conv2d(8, 8, 1, stride=2)),
                          "anti-aliasing (aa: BlurPool2d)"),
        "activation": (lambda: timm_resnet.Bottleneck(32, 8, act_layer=nn.SiLU), "activation act1 is SiLU, not ReLU"),
        "norm": (lambda: timm_resnet.BasicBlock(8, 8, norm_layer=partial(nn.GroupNorm, 2)),
                 "norm layer bn1 is GroupNorm"),
        "drop_block": (lambda: timm_resnet.Bottleneck(32, 8, drop_block=partial(DropBlock2d, drop_prob=0.1)),
                       "drop_block (DropBlock2d, drop_prob=0.1)"),
        "drop_path_not_timm": (lambda: timm_resnet.BasicBlock(8, 8, drop_path=nn.Dropout(0.2)),
                               "drop_path (Dropout, drop_prob=?), not timm.layers.DropPath"),
        "preact_group_norm": (lambda: timm_resnetv2.PreActBottleneck(128, 128),
                              "its norm layer norm1 is GroupNormAct, not BatchNormAct2d"),
        "preact_activation": (lambda: timm_resnetv2.PreActBasic(
                                  8, 8, norm_layer=partial(BatchNormAct2d, act_layer=nn.SiLU)),
                              "norm layer norm1's activation is SiLU, not ReLU"),
    }


@pytest.mark.parametrize("case", list(_one_block_cases()))
def test_non_plain_block_left_alone_with_one_log_line(case, caplog):
    make, why = _one_block_cases()[case]
    block = make()
    before = [type(m) for m in block.modules()]
    with caplog.at_level(logging.INFO, logger="resfused"):
        out = resfused.convert(nn.Sequential(block))
    assert out[0] is block and [type(m) for m in block.modules()] == before
    lines = [r.getMessage() for r in caplog.records if r.name == "resfused"]
    assert len(lines) == 1, lines
    assert f"leaving {type(block).__name__} unfused" in lines[0] and why in lines[0], lines[0]


def test_seresnet18_left_alone(caplog):
    model = timm.create_model("seresnet18", pretrained=False, num_classes=10)
    with caplog.at_level(logging.INFO, logger="resfused"):
        resfused.convert(model)
    assert len(_stock_blocks(model)) == 8 and _fused_count(model) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "resfused"]
    assert len(lines) == 8 and all("attention module (se: SEModule)" in line for line in lines), lines


def _record_sample_scales(monkeypatch):
    """Spy on the per-sample scales the fused blocks draw: (drop_prob, (N,) scale) in call order."""
    from resfused.nn import timm_blocks

    drawn = []
    real = timm_blocks.drop_path_sample_scale

    def spy(drop_path, x):
        s = real(drop_path, x)
        if s is not None:
            drawn.append((drop_path.drop_prob, s.clone()))
        return s

    monkeypatch.setattr(timm_blocks, "drop_path_sample_scale", spy)
    return drawn


DROP_PATH_CASES = [b for b in usable_backends() if b != "cuda" and (HAS_CUDA or b == "reference")]


@pytest.mark.parametrize("backend", DROP_PATH_CASES)
def test_drop_path_model_trains_like_stock(backend, monkeypatch, caplog):
    """drop_path_rate > 0: every block is fused, timm's DropPath becoming the fused op's per-sample scale.
    The keep masks are drawn where and as timm draws them, so with the same seed two SGD steps give stock's
    outputs, gradients, parameters and BN buffers (float64, 1e-6 norm-relative), and eval matches too."""
    drawn = _record_sample_scales(monkeypatch)
    with caplog.at_level(logging.INFO, logger="resfused"):
        ours = resfused.convert(_model("resnet18", drop_path_rate=0.5).double(), backend=backend)
    assert not [r for r in caplog.records if r.name == "resfused"]
    _assert_fully_converted("resnet18", ours)
    blocks = [m for m in ours.modules() if isinstance(m, TimmBasicBlock)]
    assert sum(type(b.drop_path) is DropPath for b in blocks) == 7  # timm gives the first block rate 0: None
    stock = _model("resnet18", drop_path_rate=0.5).double()
    x = torch.randn(8, 3, 16, 16, device=DEVICE, dtype=torch.float64)
    target = torch.randint(0, 10, (8,), device=DEVICE)
    (outs_s, grads_s), (outs_o, grads_o) = (sgd_steps(stock, x, target, seed=3),
                                            sgd_steps(ours, x, target, seed=3))
    # 7 DropPath blocks x 2 steps, each drawing (8,) scales: 0 (dropped) or 1/keep_prob; some of each
    assert len(drawn) == 14
    for p, scale in drawn:
        assert ((scale == 0) | (scale == 1 / (1 - p))).all(), (p, scale)
    values = torch.cat([scale for _, scale in drawn])
    assert (values == 0).any() and (values > 0).any()
    for step, (a, b) in enumerate(zip(outs_o, outs_s)):
        assert nrel(a, b) < 1e-6, f"output of step {step}"
    for n, g in grads_o.items():
        assert nrel(g, grads_s[n]) < 1e-6, f"grad {n}"
    _assert_state_close(ours, stock, 1e-6)
    with torch.no_grad():
        assert nrel(ours.eval()(x), stock.eval()(x)) < 1e-6
    assert len(drawn) == 14  # eval draws nothing


@pytest.mark.parametrize("scale_by_keep", [True, False], ids=["scale_by_keep", "no_scale_by_keep"])
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_drop_path_block_matches_stock(kind, scale_by_keep):
    """One block with a projection shortcut, drop_prob 0.5 (scale_by_keep on and off): output, input and
    parameter gradients, running stats equal stock timm's under the same seed."""
    def make():
        torch.manual_seed(0)
        planes, cls = (16, timm_resnet.BasicBlock) if kind == "basic" else (8, timm_resnet.Bottleneck)
        out = planes * cls.expansion
        down = nn.Sequential(nn.Conv2d(8, out, 1, stride=2, bias=False), nn.BatchNorm2d(out))
        return cls(8, planes, stride=2, downsample=down, drop_path=DropPath(0.5, scale_by_keep=scale_by_keep)).to(
            DEVICE).double()

    stock, ours = make(), resfused.convert(nn.Sequential(make()), backend="reference")
    assert isinstance(ours[0], (TimmBasicBlock, TimmBottleneck))
    x = torch.randn(8, 8, 6, 6, device=DEVICE, dtype=torch.float64)
    results = []
    for model in (stock, ours):
        xi = x.clone().requires_grad_()
        torch.manual_seed(5)
        y = model(xi)
        y.square().sum().backward()
        results.append((y.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters()},
                        [b.clone() for n, b in model.named_buffers() if "running" in n]))
    (ys, gxs, gps, bufs_s), (yo, gxo, gpo, bufs_o) = results
    assert nrel(yo, ys) < 1e-10 and nrel(gxo, gxs) < 1e-10
    for (n, g), g_s in zip(gpo.items(), gps.values()):
        assert nrel(g, g_s) < 1e-10, n
    for b, b_s in zip(bufs_o, bufs_s):
        assert nrel(b, b_s) < 1e-12


@pytest.mark.parametrize("name", ["resnet18", "resnetv2_18"])
def test_syncbatchnorm_converted_and_reverted(name):
    """timm.layers.convert_sync_batchnorm output: fused norms synchronise over "world" (SyncBatchNorm's
    process_group=None); revert restores SyncBatchNorm / SyncBatchNormAct. Without torch.distributed
    initialised both compute what stock computes."""
    stock = _model(name).double()
    model = timm.layers.convert_sync_batchnorm(_model(name).double())
    resfused.convert(model, backend="reference")
    _assert_fully_converted(name, model)
    fused = [m for m in model.modules() if isinstance(m, BatchNormAddReLU2d)]
    assert all(m.process_group == "world" for m in fused)
    x = torch.randn(2, 3, 32, 32, device=DEVICE, dtype=torch.float64)
    torch.testing.assert_close(model(x), stock(x))
    resfused.revert(model)
    expected = SyncBatchNormAct if name in PREACT else nn.SyncBatchNorm
    reverted = [m for m in model.modules() if type(m) is expected]
    assert len(reverted) >= FUSED_BNS[name] and all(m.process_group is None for m in reverted)
    assert _fused_count(model) == 0


def test_fused_blocks_build_a_timm_resnet():
    """TimmBasicBlock/TimmBottleneck accept timm's block arguments: ResNet(block=...) has stock's state_dict."""
    for ours, theirs in ((TimmBasicBlock, timm_resnet.BasicBlock), (TimmBottleneck, timm_resnet.Bottleneck)):
        a = timm_resnet.ResNet(block=ours, layers=(1, 1, 1, 1), num_classes=10)
        b = timm_resnet.ResNet(block=theirs, layers=(1, 1, 1, 1), num_classes=10)
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
        assert isinstance(a.layer2[0].bn2, BatchNormAddReLU2d)
    c = timm_resnet.ResNet(block=TimmBasicBlock, layers=(1, 1, 1, 1), num_classes=10, drop_path_rate=0.1)
    assert type(c.layer4[0].drop_path) is DropPath


def test_revert_restores_drop_path():
    """convert keeps timm's DropPath modules in the fused blocks; revert puts the same objects back."""
    model = _model("resnet18", drop_path_rate=0.2)
    drop_paths = [b.drop_path for b in _stock_blocks(model)]
    resfused.convert(model)
    assert [b.drop_path for b in model.modules() if isinstance(b, TimmBasicBlock)] == drop_paths
    resfused.revert(model)
    assert _fused_count(model) == 0
    assert [b.drop_path for b in _stock_blocks(model)] == drop_paths
    assert [type(m) for m in model.modules()] == [type(m) for m in _model("resnet18", drop_path_rate=0.2).modules()]


@pytest.mark.parametrize("kw,match", [
    (dict(attn_layer="se"), "attn_layer must be None in a fused block"),
    (dict(act_layer=nn.SiLU), "act_layer must be nn.ReLU"),
    (dict(norm_layer=nn.GroupNorm), "norm_layer must be nn.BatchNorm2d"),
    (dict(drop_path=nn.Identity()), "drop_path must be None or a timm.layers.DropPath"),
])
def test_fused_block_rejects_non_plain_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        TimmBasicBlock(8, 8, **kw)


def test_resfused_does_not_import_timm():
    code = ("import sys, torchvision, resfused; assert 'timm' not in sys.modules; "
            "resfused.convert(torchvision.models.resnet18()); resfused.revert(torchvision.models.resnet18()); "
            "assert 'timm' not in sys.modules, 'convert imported timm'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
