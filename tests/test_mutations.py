"""The checks can fail: a deliberate 1 % error in one channel of an op's result fails the very test that checks
that op, for every op family (bn_add_relu, conv_bias_act, conv_bn, fuse_for_inference, the synchronised BN's
check).

Each case wraps the reference backend (CPU, cheap) so that one output channel comes out 1 % off, runs the
family's own test function on it and expects an AssertionError; the same test run without the mutation
passes (so the failure is the mutation's). Half precision included: there the old floors (4 ulps of the
largest output in bf16: about 3 %) let such an error through.
"""

from __future__ import annotations

import copy

import pytest
import torch

import resfused.fuse
from resfused.reference import bn_add_relu as ref_bn
from resfused.reference import conv_bias_act as ref_cba
from resfused.reference import conv_bn as ref_conv_bn

import test_bn_add_relu as t_bn
import test_conv_bias_act as t_cba
import test_conv_bn as t_conv_bn
import test_fuse_for_inference as t_fuse
from _oracle import check_close

ERROR = 1.01  # the deliberate error: 1 % in one channel
CHANNEL = 1


def _bump_channel(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``t`` with channel CHANNEL (along ``dim``) scaled by ERROR, same dtype and strides (an empty or shorter
    tensor, e.g. statistics not asked for, as it is)."""
    if t.dim() <= dim or t.shape[dim] <= CHANNEL:
        return t
    out = t.clone()
    index = [slice(None)] * t.dim()
    index[dim] = CHANNEL
    out[tuple(index)] = (t[tuple(index)].double() * ERROR).to(t.dtype)
    return out


def _mutating(fn, which: int = 0, dim: int = 1):
    """``fn`` whose output number ``which`` (or its only output) has one channel 1 % off."""

    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        if isinstance(out, tuple):
            out = list(out)
            out[which] = _bump_channel(out[which], dim)
            return tuple(out)
        return _bump_channel(out, dim)

    return wrapped


# ---------------------------------------------------------------------------------------------------
# bn_add_relu: output, input gradient, running variance
# ---------------------------------------------------------------------------------------------------

BN_MUTATIONS = {
    "y": ("forward_train", 0, 1),
    "grad_input": ("backward", 0, 1),
    "grad_weight": ("backward", 2, 0),
    "eval_y": ("forward_eval", 0, 1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("what", BN_MUTATIONS)
def test_bn_add_relu_one_channel_off_fails(monkeypatch, what, dtype):
    name, which, dim = BN_MUTATIONS[what]
    kw = dict(training=(what != "eval_y"))
    t_bn.run_case("reference", dtype, "cl", (2, 8, 4, 4), **kw)
    monkeypatch.setattr(ref_bn, name, _mutating(getattr(ref_bn, name), which, dim))
    with pytest.raises(AssertionError):
        t_bn.run_case("reference", dtype, "cl", (2, 8, 4, 4), **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bn_add_relu_running_var_one_channel_off_fails(monkeypatch, dtype):
    real = ref_bn.forward_train

    def forward_train(*args, **kwargs):
        out = real(*args, **kwargs)
        running_var = args[5]
        running_var[CHANNEL] *= ERROR
        return out

    t_bn.run_case("reference", dtype, "nchw", (2, 8, 4, 4))
    monkeypatch.setattr(ref_bn, "forward_train", forward_train)
    with pytest.raises(AssertionError, match="running_var"):
        t_bn.run_case("reference", dtype, "nchw", (2, 8, 4, 4))


# ---------------------------------------------------------------------------------------------------
# conv_bias_act
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_conv_bias_act_one_channel_off_fails(monkeypatch, dtype):
    spec = t_cba.VARIANTS["3x3_s1"]
    t_cba._check("reference", spec, dtype, "cl")
    monkeypatch.setattr(ref_cba, "conv_bias_act", _mutating(ref_cba.conv_bias_act))
    with pytest.raises(AssertionError):
        t_cba._check("reference", spec, dtype, "cl")


# ---------------------------------------------------------------------------------------------------
# conv_bn: y and the batch statistics
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", [0, 2], ids=["y", "invstd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_conv_bn_one_channel_off_fails(monkeypatch, dtype, which):
    dim = 1 if which == 0 else 0

    def run():
        if dtype == torch.float32:
            t_conv_bn.test_forward_matches_stock("reference", "3x3_s1", "cl", True, None)
        else:
            t_conv_bn.test_half_precision("reference", dtype, None)

    run()
    monkeypatch.setattr(ref_conv_bn, "forward", _mutating(ref_conv_bn.forward, which, dim))
    with pytest.raises(AssertionError):
        run()


# ---------------------------------------------------------------------------------------------------
# fuse_for_inference: one folded channel 1 % off
# ---------------------------------------------------------------------------------------------------

def test_fold_one_channel_off_fails(monkeypatch):
    real = resfused.fuse._fold

    def fold(conv, bn):
        w, b = real(conv, bn)
        w = w.clone()
        w[CHANNEL] *= ERROR
        return w, b

    t_fuse.test_fold_extreme_running_stats("reference", "large_eps")
    monkeypatch.setattr(resfused.fuse, "_fold", fold)
    with pytest.raises(AssertionError):
        t_fuse.test_fold_extreme_running_stats("reference", "large_eps")


@pytest.mark.parametrize("dtype", [torch.float32], ids=str)
def test_fused_block_one_channel_off_fails(monkeypatch, dtype):
    """A fused torchvision Bottleneck (three folded convs, the block's own check), its output one channel off.

    float32 only: a half-precision fused model's weights are the folded ones rounded to that dtype, so its error
    at one output is a sum of K independent roundings that stock's error there (other weights, rounded
    elsewhere) does not predict; tests/test_fuse_for_inference.py bounds half-precision models by stock's
    largest error instead (pointwise=False), which a 1 % error in one channel can pass. The kernels
    themselves are held elementwise in half precision by the conv_bias_act case above."""
    import torchvision

    torch.manual_seed(0)
    block = t_fuse._randomize_bn(torchvision.models.resnet.Bottleneck(16, 4)).eval()
    x = torch.randn(2, 16, 6, 6)
    fused = resfused.fuse.fuse_for_inference(copy.deepcopy(block).to(dtype), backend="reference")
    with torch.no_grad():
        ref = copy.deepcopy(block).double()(x.double())
        stock = copy.deepcopy(block).to(dtype)(x.to(dtype))
    with torch.no_grad():
        y = fused(x.to(dtype))
    assert check_close(y, ref, dtype, stock) is None
    assert check_close(_bump_channel(y), ref, dtype, stock) is not None


# ---------------------------------------------------------------------------------------------------
# the synchronised BN's check (tests/test_distributed.py _check), on the oracle's own results
# ---------------------------------------------------------------------------------------------------

def test_sync_bn_check_one_channel_off_fails():
    t_dist = pytest.importorskip("test_distributed")
    case = dict(t_dist.CASES["nchw_relu_residual_uneven"], dtype=torch.bfloat16)
    results = t_dist._oracle(case)
    ref64, low = results[torch.float64]["steps"][0], results[torch.bfloat16]["steps"][0]
    for name in ("y", "grad_x"):
        t_dist._check(name, low[name], ref64[name], low[name], torch.bfloat16)
        with pytest.raises(AssertionError):
            t_dist._check(name, _bump_channel(low[name]), ref64[name], low[name], torch.bfloat16)
