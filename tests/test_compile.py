"""torch.compile: converted models compile with fullgraph=True, one graph per train/eval mode."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

import resfused
from resfused.functional import batch_norm_add_relu

from conftest import DEVICE, usable_backends

torchvision = pytest.importorskip("torchvision")


@pytest.mark.parametrize("backend", usable_backends())
def test_functional_fullgraph_matches_eager(backend):
    def f(x, z, rm, rv, w, b):
        return batch_norm_add_relu(x, z, rm, rv, w, b, training=True, backend=backend)

    args = [torch.randn(2, 4, 3, 3, device=DEVICE), torch.randn(2, 4, 3, 3, device=DEVICE),
            torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE), torch.rand(4, device=DEVICE),
            torch.randn(4, device=DEVICE)]
    eager_args = [a.clone() for a in args]
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), f(*eager_args))
    # the running-stats mutation survives functionalization
    torch.testing.assert_close(args[2], eager_args[2])
    torch.testing.assert_close(args[3], eager_args[3])


@pytest.mark.parametrize("backend", [b for b in usable_backends() if b != "cuda"])
def test_functional_sample_scale_fullgraph_matches_eager(backend):
    """A per-sample scale (drop-path) is one more op argument: one graph, eager's output and gradients."""
    def f(x, z, rm, rv, w, b, s):
        return batch_norm_add_relu(x, z, rm, rv, w, b, training=True, backend=backend, sample_scale=s)

    args = [torch.randn(3, 4, 3, 3, device=DEVICE), torch.randn(3, 4, 3, 3, device=DEVICE),
            torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE), torch.rand(4, device=DEVICE),
            torch.randn(4, device=DEVICE), torch.tensor([0.0, 1.25, 1.25], device=DEVICE)]
    results = []
    for fn in (torch.compile(f, backend="aot_eager", fullgraph=True), f):
        a = [t.clone().requires_grad_(i in (0, 1, 4, 5)) for i, t in enumerate(args)]
        y = fn(*a)
        results.append([y, *torch.autograd.grad(y.square().sum(), [a[i] for i in (0, 1, 4, 5)]), a[2], a[3]])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_timm_drop_path_block_fullgraph_matches_eager():
    """A converted timm block with an active DropPath compiles in one graph; the keep mask is drawn inside
    it, from the same RNG stream: same seed, same output and gradients as eager."""
    timm = pytest.importorskip("timm")
    from timm.models import resnet as timm_resnet

    torch.manual_seed(0)
    block = resfused.convert(torch.nn.Sequential(
        timm_resnet.BasicBlock(8, 8, drop_path=timm.layers.DropPath(0.5))), backend="reference").to(DEVICE)
    assert type(block[0]).__name__ == "TimmBasicBlock"
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    x = torch.randn(8, 8, 4, 4, device=DEVICE)
    results = []
    for fn in (compiled, block):
        torch.manual_seed(1)
        y = fn(x)
        results.append([y, *torch.autograd.grad(y.square().sum(), list(block.parameters()))])
    assert counter.frame_count == 1
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_backend_resolution_traces_without_graph_breaks():
    """Resolving a backend for CUDA tensors inside a compiled region (auto, or an explicit name) probes
    imports and the dispatcher: those probes are constants to dynamo, never traced (no graph break)."""
    from resfused import _backend
    from resfused.ops import conv_bias_act

    cuda = torch.device("cuda")

    def f(x):
        reasons = [_backend.unavailable_reason(b, cuda, torch.float16) for b in ("cuda", "triton")]
        reasons += [conv_bias_act.unavailable_reason(b, cuda, torch.float16) for b in ("cuda", "triton")]
        return x + sum(r is None for r in reasons)

    x = torch.zeros(3)
    torch.testing.assert_close(torch.compile(f, backend="eager", fullgraph=True)(x), f(x))


def test_converted_resnet_fullgraph_one_compile_per_mode():
    model = resfused.convert(torchvision.models.resnet18(num_classes=10)).to(DEVICE)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    for mode in ("train", "eval", "train", "eval"):
        model.train(mode == "train")
        y = compiled(x)
        if mode == "train":
            y.sum().backward()
    assert counter.frame_count == 2
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.cuda
def test_inductor_training_step_matches_eager():
    torch.manual_seed(0)
    model = resfused.convert(torchvision.models.resnet18(num_classes=10)).cuda()
    twin = resfused.convert(torchvision.models.resnet18(num_classes=10)).cuda()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(8, 3, 64, 64, device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    compiled(x).sum().backward()
    twin(x).sum().backward()
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-3, msg=n)
    for (n, a), b in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
