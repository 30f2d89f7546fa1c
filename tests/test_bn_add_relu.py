"""batch_norm_add_relu against stock PyTorch, on every backend usable here.

On CPU: reference, triton (interpreter) and cuda_sim (the csrc kernels on the CPU SIMT runtime, built here by
the system C++ compiler); on a GPU: reference, triton and cuda, on CUDA tensors. Each case checks the output, the
gradients of input, residual, weight and bias, and the running stats. The csrc backends (cuda, cuda_sim) take
fp32/fp16/bf16 and no sample_scale: where a case needs either, they must raise the documented error instead.
"""

from __future__ import annotations

import pytest
import torch

from resfused import _layout
from resfused.functional import batch_norm_add_relu
from resfused.ops import bn_add_relu as op

from _oracle import assert_close, composite
from conftest import DEVICE, HAS_CUDA, usable_backends


def _backends():
    backends = usable_backends()
    if not HAS_CUDA:
        from resfused import _cuda_sim

        _cuda_sim.build()  # cached by source; seconds the first time
        backends.append("cuda_sim")
    return backends


BACKENDS = _backends()
CSRC_BACKENDS = ("cuda", "cuda_sim")  # fp32/fp16/bf16 only, no sample_scale
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}

# Labelled edge shapes (N, C, H, W). Kernel blocks are powers of two, so C=13/40 leave channel tails and
# N*H*W = 45/21 leave row tails.
SHAPES = {
    "basic": (2, 8, 4, 4),
    "C1": (3, 1, 3, 3),
    "C3": (2, 3, 5, 5),
    "C13_row_tail": (3, 13, 3, 5),
    "C40_row_tail": (1, 40, 3, 7),
    "HW1": (8, 16, 1, 1),
}


def _inputs(shape, dtype, layout, *, residual=True, affine=True, running=True, offset=0.0, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    fmt = LAYOUTS[layout]
    n, c, h, w = shape

    def act(s=1.0, off=0.0):
        return (torch.randn(shape, generator=g) * s + off).to(dtype).to(DEVICE).contiguous(memory_format=fmt)

    x = act(scale, offset)
    z = act() if residual else None
    weight = (torch.randn(c, generator=g) * 0.5 + 1).to(DEVICE) if affine else None
    bias = (torch.randn(c, generator=g) * 0.5).to(DEVICE) if affine else None
    rm = (torch.randn(c, generator=g) * 0.1).to(DEVICE) if running else None
    rv = (torch.rand(c, generator=g) + 0.5).to(DEVICE) if running else None
    dy = act()
    return x, z, weight, bias, rm, rv, dy


def _clone(t, dtype=None, grad=False):
    if t is None:
        return None
    t = t.detach().clone()
    if dtype is not None:
        t = t.to(dtype)
    return t.requires_grad_(grad)


def run_case(backend, dtype, layout, shape, *, residual=True, relu=True, affine=True, running=True, training=True,
             momentum=0.1, eps=1e-5, offset=0.0, scale=1.0, seed=0, sample_scale=None):
    """``sample_scale``: None or N floats, the per-sample factor on the BN output (drop-path)."""
    x, z, weight, bias, rm, rv, dy = _inputs(shape, dtype, layout, residual=residual, affine=affine,
                                              running=running, offset=offset, scale=scale, seed=seed)
    stats_dtype = _layout.stats_dtype(dtype)
    ss = None if sample_scale is None else torch.tensor(sample_scale, dtype=stats_dtype, device=DEVICE)

    def run(fn, act_dtype, param_dtype):
        args = [_clone(x, act_dtype, True), _clone(z, act_dtype, True), _clone(rm, param_dtype),
                _clone(rv, param_dtype), _clone(weight, param_dtype, True), _clone(bias, param_dtype, True)]
        out = fn(*args)
        leaves = [a for a in (args[0], args[1], args[4], args[5]) if a is not None]
        grads = torch.autograd.grad(out, leaves, dy.to(act_dtype))
        return out, grads, args[2], args[3]

    ours = run(lambda *a: batch_norm_add_relu(*a, training=training, momentum=momentum, eps=eps, relu=relu,
                                              backend=backend, sample_scale=ss), dtype, stats_dtype)
    ref = run(lambda *a: composite(*a, training, momentum, eps, relu, _clone(ss, torch.float64)), torch.float64,
              torch.float64)
    stock = run(lambda *a: composite(*a, training, momentum, eps, relu, ss), dtype, stats_dtype)

    y, grads, out_rm, out_rv = ours
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=LAYOUTS[layout]), "output must keep the input's memory format"
    assert_close("output", y, ref[0], dtype, stock[0])
    names = ["grad_input", "grad_residual", "grad_weight", "grad_bias"]
    names = [nm for nm, t in zip(names, (x, z, weight, bias)) if t is not None]
    for nm, got, want, base in zip(names, grads, ref[1], stock[1]):
        assert got.dtype == (dtype if nm in ("grad_input", "grad_residual") else stats_dtype), nm
        assert_close(nm, got, want, got.dtype, base)
    if running:
        assert_close("running_mean", out_rm, ref[2], torch.float32, stock[2])
        assert_close("running_var", out_rv, ref[3], torch.float32, stock[3])


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_train_matches_torch(backend, dtype, layout, shape):
    run_case(backend, dtype, layout, shape)


VARIANTS = {
    "no_residual": dict(residual=False),
    "no_relu": dict(relu=False),
    "no_residual_no_relu": dict(residual=False, relu=False),
    "no_affine": dict(affine=False),
    "no_running_stats": dict(running=False),
    "eval": dict(training=False),
    "eval_no_residual_no_relu": dict(training=False, residual=False, relu=False),
    "eval_no_affine": dict(training=False, affine=False),
    "momentum_0.3_eps_1e-3": dict(momentum=0.3, eps=1e-3),
    "momentum_1": dict(momentum=1.0),
}


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_variants_match_torch(backend, dtype, layout, variant):
    run_case(backend, dtype, layout, (2, 12, 3, 5), **variant)


# Per-sample scales (drop-path): zeros for dropped samples, 1/keep_prob for kept ones, and arbitrary values.
# (3, 13, 3, 5): channels_last row tiles straddle samples, NCHW planes split into several tiles; HW1: every
# channels_last row is a different sample.
SAMPLE_SCALE_CASES = {
    "drop_keep_C13": ((3, 13, 3, 5), [0.0, 1.25, 1.25], {}),
    "arbitrary_C13": ((3, 13, 3, 5), [0.5, 0.0, 2.0], {}),
    "drop_keep_HW1": ((8, 16, 1, 1), [1.25, 0.0, 1.25, 1.25, 0.0, 0.0, 1.25, 1.25], {}),
    "all_dropped": ((2, 12, 3, 5), [0.0, 0.0], {}),
    "no_residual_no_relu": ((3, 12, 3, 5), [0.0, 1.25, 0.5], dict(residual=False, relu=False)),
    "eval": ((3, 13, 3, 5), [0.0, 1.25, 0.5], dict(training=False)),
    "no_affine_no_running": ((3, 13, 3, 5), [1.25, 0.0, 1.25], dict(affine=False, running=False)),
}


@pytest.mark.parametrize("case", SAMPLE_SCALE_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_scale_matches_torch(backend, dtype, layout, case):
    """relu(s[n] * bn(x) + z) against the composite: output, every gradient, running stats (batch statistics
    are x's, whatever s)."""
    shape, ss, kw = SAMPLE_SCALE_CASES[case]
    if backend in CSRC_BACKENDS:
        match = "float64" if dtype == torch.float64 else "does not implement sample_scale"
        with pytest.raises(RuntimeError, match=match):
            run_case(backend, dtype, layout, shape, sample_scale=ss, **kw)
        return
    run_case(backend, dtype, layout, shape, sample_scale=ss, **kw)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in CSRC_BACKENDS])
def test_sample_scale_gradcheck_float64(backend, layout, training):
    g = torch.Generator().manual_seed(2)
    fmt = LAYOUTS[layout]
    shape = (3, 3, 2, 3)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE).contiguous(memory_format=fmt)
    z = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE).contiguous(memory_format=fmt)
    w = torch.randn(3, generator=g, dtype=torch.float64).to(DEVICE)
    b = torch.randn(3, generator=g, dtype=torch.float64).to(DEVICE)
    ss = torch.tensor([0.0, 1.25, 0.5], dtype=torch.float64, device=DEVICE)
    leaves = [t.requires_grad_() for t in (x, z, w, b)]

    def fn(x, z, w, b):
        return batch_norm_add_relu(x, z, torch.zeros(3, dtype=torch.float64, device=DEVICE),
                                   torch.ones(3, dtype=torch.float64, device=DEVICE), w, b, training=training,
                                   backend=backend, sample_scale=ss)

    # Triton: fast mode (a random projection of the Jacobian); the full check takes minutes in the interpreter
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=backend != "reference")


def test_sample_scale_cuda_backend_refused_at_the_op():
    """torch.ops.resfused.* with a sample_scale never reach the cuda backend (its ops have no such argument)."""
    x, z, weight, bias, rm, rv, _ = _inputs((2, 4, 3, 3), torch.float32, "nchw")
    rm0 = rm.clone()
    with pytest.raises(RuntimeError, match="backend 'cuda' does not implement sample_scale"):
        torch.ops.resfused.bn_add_relu_forward_train(x, z, weight, bias, rm, rv, 0.1, 1e-5, True,
                                                     torch.ones(2, device=DEVICE), "cuda")
    assert torch.equal(rm, rm0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean(backend, layout):
    """Inputs around 1e4 with unit spread: E[x^2]-E[x]^2 would lose every digit of the variance in fp32."""
    run_case(backend, torch.float32, layout, (4, 8, 4, 4), offset=1e4)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_sums_overflow_fp16(backend, layout):
    """Values near 300 over 4096 elements per channel: the channel sums (~1.2e6) overflow fp16 (max 65504)."""
    run_case(backend, torch.float16, layout, (4, 4, 32, 32), offset=300.0, scale=20.0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_mask_and_stats_match_reference(backend, layout):
    """The packed ReLU mask is one layout for all backends: equal to the reference's bit for bit, except
    where the pre-activation is within rounding of zero."""
    x, z, weight, bias, rm, rv, _ = _inputs((3, 13, 3, 5), torch.float32, layout)
    args = (x, z, weight, bias)
    y, mask, mean, invstd = torch.ops.resfused.bn_add_relu_forward_train(*args, rm.clone(), rv.clone(), 0.1, 1e-5,
                                                                        True, None, backend)
    y_r, mask_r, mean_r, invstd_r = torch.ops.resfused.bn_add_relu_forward_train(*args, rm.clone(), rv.clone(), 0.1,
                                                                                1e-5, True, None, "reference")
    assert mask.dtype == torch.uint8 and mask.shape == mask_r.shape
    torch.testing.assert_close(mean, mean_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(invstd, invstd_r, rtol=1e-5, atol=1e-6)
    bits = _layout.unpack_mask(mask, x.shape, _layout.layout_of(x))
    bits_r = _layout.unpack_mask(mask_r, x.shape, _layout.layout_of(x))
    pre = (x.double() - mean_r.double().view(1, -1, 1, 1)) * (invstd_r * weight).double().view(1, -1, 1, 1)
    pre = pre + bias.double().view(1, -1, 1, 1) + z.double()
    differ = bits != bits_r
    assert (pre[differ].abs() < 1e-5).all(), f"{int(differ.sum())} mask bits differ away from zero"
    # padding bits past the end of the packed axis are zero
    assert torch.equal(mask, _layout.pack_mask(bits, _layout.layout_of(x)))
    # the backward of this backend accepts the reference's saved tensors (same contract)
    dy = torch.randn_like(x)
    outs = torch.ops.resfused.bn_add_relu_backward(dy, x, mask_r, mean_r, invstd_r, weight, True, True, True, True,
                                                   True, None, backend)
    outs_r = torch.ops.resfused.bn_add_relu_backward(dy, x, mask_r, mean_r, invstd_r, weight, True, True, True, True,
                                                     True, None, "reference")
    for a, b in zip(outs, outs_r):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_skips_unrequested_outputs(backend):
    x, z, weight, bias, rm, rv, dy = _inputs((2, 4, 3, 3), torch.float32, "nchw")
    _, mask, mean, invstd = torch.ops.resfused.bn_add_relu_forward_train(x, z, weight, bias, rm, rv, 0.1, 1e-5, True,
                                                                        None, backend)
    gx, gz, gw, gb = torch.ops.resfused.bn_add_relu_backward(dy, x, mask, mean, invstd, weight, True, True, True,
                                                             False, False, None, backend)
    assert gx.shape == x.shape and gz.numel() == 0 and gw.numel() == 0 and gb.numel() == 0
    gx, gz, gw, gb = torch.ops.resfused.bn_add_relu_backward(dy, x, mask, mean, invstd, weight, True, True, False,
                                                             True, True, None, backend)
    assert gx.numel() == 0 and gz.shape == x.shape and gw.shape == (4,) and gb.shape == (4,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    """No float atomics: two identical calls give bit-identical results."""
    outs = []
    for _ in range(2):
        x, z, weight, bias, rm, rv, dy = _inputs((4, 24, 5, 5), torch.float32, "cl", seed=3)
        leaves = [t.requires_grad_() for t in (x, z, weight, bias)]
        y = batch_norm_add_relu(x, z, rm, rv, weight, bias, training=True, backend=backend)
        outs.append([y, *torch.autograd.grad(y, leaves, dy), rm, rv])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend, layout, relu, training):
    g = torch.Generator().manual_seed(1)
    fmt = LAYOUTS[layout]
    shape = (2, 3, 2, 3)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE).contiguous(memory_format=fmt)
    z = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE).contiguous(memory_format=fmt)
    w = torch.randn(3, generator=g, dtype=torch.float64).to(DEVICE)
    b = torch.randn(3, generator=g, dtype=torch.float64).to(DEVICE)
    rm = torch.zeros(3, dtype=torch.float64, device=DEVICE)
    rv = torch.ones(3, dtype=torch.float64, device=DEVICE)
    leaves = [t.requires_grad_() for t in (x, z, w, b)]

    def fn(x, z, w, b):
        # running stats are cloned so repeated evaluations see the same state
        return batch_norm_add_relu(x, z, rm.clone(), rv.clone(), w, b, training=training, relu=relu, backend=backend)

    if backend in CSRC_BACKENDS:  # no float64 kernels: the documented error, not a gradcheck
        with pytest.raises(RuntimeError, match="supports float32, float16 and bfloat16, got torch.float64"):
            fn(*leaves)
        return
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def _op_samples(backend):
    for layout in LAYOUTS:
        x, z, weight, bias, rm, rv, dy = _inputs((2, 5, 3, 3), torch.float32, layout)
        yield "train", (x, z, weight, bias, rm, rv, 0.1, 1e-5, True, None, backend)
        yield "train_plain", (x, None, None, None, None, None, 0.1, 1e-5, False, None, backend)
        yield "eval", (x, z, weight, bias, rm, rv, 1e-5, True, True, None, backend)
        _, mask, mean, invstd = torch.ops.resfused.bn_add_relu_forward_train(x, z, weight, bias, rm.clone(),
                                                                            rv.clone(), 0.1, 1e-5, True, None, backend)
        yield "backward", (dy, x, mask, mean, invstd, weight, True, True, True, True, True, None, backend)
        yield "backward_eval", (dy, x, mask, mean, invstd, None, True, False, True, False, True, None, backend)
        if backend in CSRC_BACKENDS:
            continue  # no sample_scale on the csrc backends
        ss = torch.tensor([0.0, 1.25], device=DEVICE)
        yield "train", (x, z, weight, bias, rm, rv, 0.1, 1e-5, True, ss, backend)
        yield "eval", (x, z, weight, bias, rm, rv, 1e-5, True, True, ss, backend)
        _, mask, mean, invstd = torch.ops.resfused.bn_add_relu_forward_train(x, z, weight, bias, rm.clone(),
                                                                            rv.clone(), 0.1, 1e-5, True, ss, backend)
        yield "backward", (dy, x, mask, mean, invstd, weight, True, True, True, True, True, ss, backend)
        yield "backward_eval", (dy, x, mask, mean, invstd, None, True, False, True, False, True, ss, backend)


_OPS = {"train": op.bn_add_relu_forward_train, "train_plain": op.bn_add_relu_forward_train,
        "eval": op.bn_add_relu_forward_eval, "backward": op.bn_add_relu_backward,
        "backward_eval": op.bn_add_relu_backward}


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    for kind, args in _op_samples(backend):
        torch.library.opcheck(_OPS[kind], args)


def test_fake_outputs_keep_layout_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 16, 5, 3, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        w = torch.empty(16)
        y, mask, mean, invstd = torch.ops.resfused.bn_add_relu_forward_train(x, x, w, w, w, w, 0.1, 1e-5, True,
                                                                            None, "reference")
        assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.bfloat16
        assert mask.shape == (2 * 5 * 3, 2) and mask.dtype == torch.uint8
        assert mean.dtype == torch.float32 and invstd.shape == (16,)


def test_non_dense_input_is_copied_not_wrong():
    """A strided (non-dense) input is made contiguous first: results equal the dense computation."""
    base = torch.randn(2, 6, 4, 8, device=DEVICE)
    x = base[:, :, :, ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    z = torch.randn(2, 6, 4, 4, device=DEVICE).contiguous(memory_format=torch.channels_last)
    y = batch_norm_add_relu(x, z, None, None, training=True, backend="reference")
    y_ref = composite(x, z, None, None, None, None, True, 0.1, 1e-5, True)
    torch.testing.assert_close(y, y_ref)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_matches_torch(backend, layout, relu):
    """N == 0: an empty output, zero parameter gradients and, as in torch, running stats left untouched."""
    x, z, weight, bias, rm, rv, _ = _inputs((0, 5, 3, 3), torch.float32, layout)
    rm0, rv0 = rm.clone(), rv.clone()
    leaves = [t.requires_grad_() for t in (x, z, weight, bias)]
    y = batch_norm_add_relu(x, z, rm, rv, weight, bias, training=True, relu=relu, backend=backend)
    want = torch.nn.functional.batch_norm(x.detach(), rm0.clone(), rv0.clone(), weight.detach(), bias.detach(), True)
    assert y.shape == want.shape and y.is_contiguous(memory_format=LAYOUTS[layout])
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0), "an empty batch must not move the running stats"
    gx, gz, gw, gb = torch.autograd.grad(y.sum(), leaves)
    assert gx.shape == x.shape and gz.shape == z.shape
    assert torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros_like(gb))
