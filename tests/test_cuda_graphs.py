"""CUDA graphs: a converted ResNet training step captures and replays like eager (GPU only)."""

from __future__ import annotations

import pytest
import torch

import resfused

torchvision = pytest.importorskip("torchvision")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_training_step_graph_replay_matches_eager(backend, deterministic_cudnn):
    """Replaying the captured step gives eager's loss, gradients and running stats bit for bit (the same
    kernels on the same inputs: any difference is a kernel that reads or reduces differently when replayed)."""
    if backend not in resfused.available_backends():
        pytest.fail(f"backend {backend} unavailable on a GPU machine: "
                    f"{resfused._backend.unavailable_reason(backend)}")
    torch.manual_seed(0)
    model = resfused.convert(torchvision.models.resnet18(num_classes=10), backend=backend).cuda()
    twin = resfused.convert(torchvision.models.resnet18(num_classes=10), backend=backend).cuda()
    twin.load_state_dict(model.state_dict())
    static_x = torch.randn(8, 3, 64, 64, device="cuda")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotuning, allocator) outside the capture
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            model(static_x).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    twin.load_state_dict(model.state_dict())

    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = model(static_x).sum()
        static_loss.backward()

    for _ in range(2):
        x = torch.randn_like(static_x)
        static_x.copy_(x)
        graph.replay()
        twin.zero_grad(set_to_none=True)
        loss = twin(x).sum()
        loss.backward()
        assert torch.equal(static_loss, loss), (static_loss.item(), loss.item())
        for (n, a), b in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(a.grad, b.grad), f"grad {n}: max difference {(a.grad - b.grad).abs().max().item():.3e}"
        for (n, a), b in zip(model.named_buffers(), twin.buffers()):
            assert torch.equal(a, b), f"buffer {n}: max difference {(a.double() - b.double()).abs().max().item():.3e}"


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_compile_reduce_overhead_training_matches_eager(backend):
    """torch.compile(mode="reduce-overhead"): inductor captures the converted model's training step in CUDA
    graphs (no cudagraph skips: nothing syncs or allocates outside PyTorch) and replays it like eager."""
    from torch._dynamo.utils import counters

    if backend not in resfused.available_backends():
        pytest.fail(f"backend {backend} unavailable on a GPU machine: "
                    f"{resfused._backend.unavailable_reason(backend)}")
    torch.manual_seed(0)
    model = resfused.convert(torchvision.models.resnet18(num_classes=10), backend=backend).cuda()
    twin = resfused.convert(torchvision.models.resnet18(num_classes=10), backend=backend).cuda()
    twin.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for step in range(4):
        x = torch.randn(8, 3, 64, 64, device="cuda")
        torch.compiler.cudagraph_mark_step_begin()
        model.zero_grad(set_to_none=True)
        loss = compiled(x).sum()
        loss.backward()
        twin.zero_grad(set_to_none=True)
        twin_loss = twin(x).sum()
        twin_loss.backward()
        torch.testing.assert_close(loss, twin_loss, rtol=1e-3, atol=1e-3, msg=f"step {step}")
        for (n, a), b in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-2, atol=1e-3, msg=f"step {step}: {n}")
        for (n, a), b in zip(model.named_buffers(), twin.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"step {step}: {n}")
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
