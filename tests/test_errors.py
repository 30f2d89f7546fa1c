"""Bad input: a clear error naming the argument, and no state change (running stats, num_batches_tracked)."""

from __future__ import annotations

import pytest
import torch

import resfused
from resfused.functional import batch_norm_add_relu
from resfused.nn import BatchNormAddReLU2d

from conftest import DEVICE


def _args(c=4, shape=None, device=DEVICE):
    shape = shape or (2, c, 3, 3)
    return dict(input=torch.randn(shape, device=device), residual=torch.randn(shape, device=device),
                running_mean=torch.randn(c, device=device), running_var=torch.rand(c, device=device) + 0.5,
                weight=torch.randn(c, device=device), bias=torch.randn(c, device=device), training=True)


def _expect(exc, match, device=DEVICE, **changes):
    kw = _args(device=device)
    kw.update(changes)
    before = {k: v.clone() for k, v in kw.items() if k.startswith("running") and v is not None and not v.is_meta}
    with pytest.raises(exc, match=match):
        batch_norm_add_relu(**kw)
    for k, v in before.items():
        assert torch.equal(kw[k], v), f"{k} was modified by a failing call"


def test_residual_wrong_shape():
    _expect(ValueError, r"residual must have input's shape \(2, 4, 3, 3\)", residual=torch.randn(2, 4, 3, 2))


def test_residual_wrong_dtype():
    _expect(TypeError, "residual must have input's dtype torch.float32, got torch.float16",
            residual=torch.randn(2, 4, 3, 3, device=DEVICE).half())


def test_residual_wrong_device():
    _expect(ValueError, "residual is on meta", residual=torch.empty(2, 4, 3, 3, device="meta"))


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_channel_vectors_wrong_length(name):
    _expect(ValueError, rf"{name} must have shape \(4,\)", **{name: torch.ones(5, device=DEVICE)})


def test_running_stats_on_wrong_device():
    _expect(ValueError, "running_var is on meta", running_var=torch.empty(4, device="meta"))


def test_only_one_running_stat():
    _expect(ValueError, "running_mean and running_var must both", running_var=None)


def test_eval_needs_running_stats():
    _expect(ValueError, "must be given when training=False", training=False, running_mean=None, running_var=None)


@pytest.mark.parametrize("shape", [(2, 4, 9), (2, 4, 3, 3, 1)])
def test_input_not_4d(shape):
    kw = _args()
    with pytest.raises(ValueError, match=r"input must be 4-D \(N, C, H, W\)"):
        batch_norm_add_relu(torch.randn(shape, device=DEVICE), None, kw["running_mean"], kw["running_var"],
                            training=True)


def test_integer_input():
    _expect(TypeError, "input must be float16, bfloat16, float32 or float64, got torch.int64",
            input=torch.ones(2, 4, 3, 3, dtype=torch.long, device=DEVICE), residual=None)


def test_one_value_per_channel_when_training():
    """Same ValueError (type and message) as torch."""
    x = torch.randn(1, 4, 1, 1, device=DEVICE)
    with pytest.raises(ValueError) as torch_err:
        torch.nn.functional.batch_norm(x, None, None, training=True)
    _expect(ValueError, "Expected more than 1 value per channel when training", input=x, residual=None)
    with pytest.raises(ValueError) as ours:
        batch_norm_add_relu(x, None, None, None, training=True)
    assert str(ours.value) == str(torch_err.value)


def test_unknown_backend_name():
    _expect(ValueError, r"backend must be one of \('auto', 'cuda', 'triton', 'reference', 'cuda_sim'\), got 'cudnn'",
            backend="cudnn")
    with pytest.raises(ValueError, match="got 'fast'"):
        resfused.set_backend("fast")
    assert resfused.get_backend() == "auto"


def test_unknown_backend_from_env(monkeypatch):
    monkeypatch.setenv("RESFUSED_BACKEND", "fastest")
    with pytest.raises(ValueError, match="RESFUSED_BACKEND must be one of"):
        resfused.get_backend()


def test_cpu_tensor_to_triton_outside_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _expect(RuntimeError, "backend 'triton' is unavailable: .*CPU tensors only with TRITON_INTERPRET=1",
            device="cpu", backend="triton")


def test_cuda_backend_on_cpu_tensor():
    _expect(RuntimeError, "backend 'cuda' is unavailable", device="cpu", backend="cuda")


def test_module_bad_input_changes_no_state():
    bn = BatchNormAddReLU2d(4).to(DEVICE).train()
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match="residual must have input's shape"):
        bn(torch.randn(2, 4, 3, 3, device=DEVICE), torch.randn(2, 4, 3, 1, device=DEVICE))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn(torch.randn(1, 4, 1, 1, device=DEVICE))
    with pytest.raises(ValueError, match="expected 4D input"):
        bn(torch.randn(2, 4, 3, device=DEVICE))
    bn.backend = "nonsense"
    with pytest.raises(ValueError, match="backend must be one of"):
        bn(torch.randn(2, 4, 3, 3, device=DEVICE))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed"


def test_convert_unknown_backend():
    torchvision = pytest.importorskip("torchvision")
    with pytest.raises(ValueError, match="backend must be one of"):
        resfused.convert(torchvision.models.resnet18(), backend="tensorrt")


def test_sample_scale_wrong_shape():
    _expect(ValueError, r"sample_scale must have shape \(2,\) to match input's batch of 2, got \(3,\)",
            sample_scale=torch.ones(3, device=DEVICE))
    _expect(ValueError, r"sample_scale must have shape \(2,\)", sample_scale=torch.ones(2, 1, device=DEVICE))


def test_sample_scale_wrong_dtype():
    _expect(ValueError, "sample_scale must have the statistics dtype torch.float32 for torch.float32 input, got "
            "torch.float16", sample_scale=torch.ones(2, dtype=torch.float16, device=DEVICE))


def test_sample_scale_wrong_device():
    _expect(ValueError, "sample_scale is on meta", sample_scale=torch.empty(2, device="meta"))


def test_sample_scale_requires_grad():
    _expect(ValueError, "sample_scale must not require grad: it is not differentiable",
            sample_scale=torch.ones(2, device=DEVICE, requires_grad=True))


def test_sample_scale_not_a_tensor():
    _expect(TypeError, "sample_scale must be a Tensor or None, got list", sample_scale=[1.0, 1.0])


def test_module_bad_sample_scale_changes_no_state():
    bn = BatchNormAddReLU2d(4).to(DEVICE).train()
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match="sample_scale must have shape"):
        bn(torch.randn(2, 4, 3, 3, device=DEVICE), None, sample_scale=torch.ones(4, device=DEVICE))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed"
