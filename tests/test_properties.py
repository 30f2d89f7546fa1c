"""Property-based tests (hypothesis) of batch_norm_add_relu: inputs no one thought of.

Each example draws a shape (C=1, H*W=1, odd sizes, an empty batch), the input's and the residual's strides
(contiguous, channels_last, sliced, expanded, at a storage offset), a dtype, the residual / affine (with or
without bias) / running-stats / momentum / ReLU flags, training or eval, and whether to differentiate; then
runs every backend usable here against the oracle (tests/_oracle.py: float64 composite, elementwise within
twice stock's error in that dtype), or, for arguments the op documents as invalid, checks the documented
error and that nothing changed. The eps drawn includes 0 and negatives: what the installed F.batch_norm
rejects in that mode must be rejected with its error type.

Backends: every one usable here (tests/conftest.py), and on a machine without a GPU also "auto" (drawn in
float32/float64, where it resolves to "native", aten's batch norm: what a CPU user gets) and "cuda_sim" (the
CUDA C++ kernels on the CPU SIMT runtime, float64 drawn as float32 as for cuda).

Cost (profiles registered in tests/conftest.py; pick one with ``pytest --hypothesis-profile=NAME``):
  ci (default)   derandomized; 300 examples per backend: about 4 s of CPU each for reference, auto and
                 cuda_sim, 35 s for triton in the interpreter (this 2-core machine, 2026-12-07)
  long           10x, random draws: for a long run (minutes of CPU on the interpreter)
"""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from resfused import _backend, _layout  # noqa: E402
from resfused.functional import batch_norm_add_relu  # noqa: E402

from _oracle import assert_close, composite  # noqa: E402
from conftest import CPU_EXTRA_BACKENDS, DEVICE, prepare_backend, usable_backends  # noqa: E402

BACKENDS = usable_backends()
_SCALE = 10 if settings().max_examples >= 1000 else 1  # the "long" profile
REFERENCE_EXAMPLES = 300 * _SCALE
TRITON_EXAMPLES = 300 * _SCALE
EXAMPLES = {"reference": REFERENCE_EXAMPLES, "auto": REFERENCE_EXAMPLES, "cuda_sim": 300 * _SCALE}
EPS = (1e-5, 1e-5, 1e-5, 1e-3, 0.0, -1e-5)  # mostly valid: the invalid ones end in one check

LAYOUTS = ("contiguous", "channels_last", "sliced", "expanded", "offset", "channels_last_sliced")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _strided(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` (N, C, H, W) laid out as ``layout``, same values."""
    n, c, h, w = values.shape
    if layout == "contiguous":
        return values.contiguous()
    if layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # every other row of a taller tensor, one column cut off a wider one
        big = values.new_zeros((n, c, 2 * h, w + 1))
        big[:, :, ::2, :w] = values
        return big[:, :, ::2, :w]
    if layout == "channels_last_sliced":
        big = values.new_zeros((n, c, h, w + 2)).contiguous(memory_format=torch.channels_last)
        big[..., 1:w + 1] = values
        return big[..., 1:w + 1]
    if layout == "expanded":  # one sample broadcast over the batch (stride 0)
        return values[:1].expand(n, c, h, w) if n > 0 else values
    if layout == "offset":
        buf = values.new_zeros(values.numel() + 3)
        view = buf[3:].view(n, c, h, w)
        view.copy_(values)
        return view
    raise AssertionError(layout)


@st.composite
def cases(draw, backend: str):
    n = draw(st.sampled_from([0, 1, 2, 3]))
    c = draw(st.sampled_from([1, 2, 3, 5, 8, 13]))
    h = draw(st.sampled_from([1, 2, 3, 5]))
    w = draw(st.sampled_from([1, 2, 3, 7]))
    dtype = draw(st.sampled_from(_backend.NATIVE_DTYPES if backend == "auto" else DTYPES))
    if backend in ("cuda", "cuda_sim") and dtype == torch.float64:
        dtype = torch.float32  # the csrc backends take fp32/fp16/bf16 (float64 is a documented error there)
    return dict(
        shape=(n, c, h, w), dtype=dtype,
        layout=draw(st.sampled_from(LAYOUTS)),
        residual=draw(st.sampled_from([None, *LAYOUTS])),
        affine=draw(st.sampled_from(["weight_bias", "weight_only", "none"])),
        running=draw(st.booleans()),
        training=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.1, 0.0, 1.0, 0.37])),
        relu=draw(st.booleans()),
        grad=draw(st.booleans()),
        offset=draw(st.sampled_from([0.0, 3.0, -50.0])),
        eps=draw(st.sampled_from(EPS)),
        seed=draw(st.integers(0, 2**16)),
    )


def _stock_rejects_eps(eps: float, batch_stats: bool) -> bool:
    """Whether the installed F.batch_norm rejects ``eps`` (with batch statistics or with running ones)."""
    x = torch.randn(2, 1, 2, 2)
    running = (None, None) if batch_stats else (torch.zeros(1), torch.ones(1))
    try:
        F.batch_norm(x, *running, None, None, batch_stats, 0.1, eps)
    except ValueError:
        return True
    return False


def _expected_error(case) -> str | None:
    """The documented ValueError of this case (its message start), or None for a valid call."""
    n, c, h, w = case["shape"]
    if not case["training"] and not case["running"]:
        return "running_mean and running_var must be given"
    if _stock_rejects_eps(case["eps"], case["training"]):
        return "eps must be"
    if case["training"] and n * h * w == 1:
        return "Expected more than 1 value per channel"
    return None


def _run(backend, case):
    n, c, h, w = case["shape"]
    dtype = case["dtype"]
    stats = _layout.stats_dtype(dtype)
    g = torch.Generator().manual_seed(case["seed"])
    x_values = torch.randn(case["shape"], generator=g, dtype=torch.float64) * 2 + case["offset"]
    z_values = torch.randn(case["shape"], generator=g, dtype=torch.float64)
    dy = torch.randn(case["shape"], generator=g, dtype=torch.float64)
    weight = torch.rand(c, generator=g, dtype=torch.float64) + 0.5 if case["affine"] != "none" else None
    bias = torch.randn(c, generator=g, dtype=torch.float64) * 0.5 if case["affine"] == "weight_bias" else None
    rm = torch.randn(c, generator=g, dtype=torch.float64) * 0.1 if case["running"] else None
    rv = torch.rand(c, generator=g, dtype=torch.float64) + 0.5 if case["running"] else None

    def make(act_dtype, vec_dtype, grad):
        """The arguments in (act_dtype, vec_dtype), from the same values: those of (dtype, stats)."""
        x = _strided(x_values.to(dtype).to(act_dtype), case["layout"]).to(DEVICE)
        z = None if case["residual"] is None else _strided(z_values.to(dtype).to(act_dtype),
                                                           case["residual"]).to(DEVICE)
        vec = lambda t, leaf: None if t is None else t.to(stats).to(DEVICE, vec_dtype).requires_grad_(leaf)  # noqa: E731
        args = [x.requires_grad_(grad), None if z is None else z.requires_grad_(grad), vec(rm, False),
                vec(rv, False), vec(weight, grad), vec(bias, grad)]
        return args

    kw = dict(training=case["training"], momentum=case["momentum"], eps=case["eps"], relu=case["relu"])
    grad = case["grad"] and n > 0
    why = _expected_error(case)
    ours_args = make(dtype, stats, grad)
    if why is not None:
        before = [None if t is None else t.detach().clone() for t in ours_args]
        with pytest.raises(ValueError, match=why):
            batch_norm_add_relu(*ours_args, **kw, backend=backend)
        for t, b in zip(ours_args, before):
            assert t is None or torch.equal(t.detach(), b), "a rejected call changed an argument"
        return

    y = batch_norm_add_relu(*ours_args, **kw, backend=backend)
    assert y.shape == x_values.shape and y.dtype == dtype and y.device.type == DEVICE.type
    if ours_args[0].is_contiguous(memory_format=torch.channels_last) and c > 1 and h * w > 1 and n > 0:
        assert y.is_contiguous(memory_format=torch.channels_last), "channels_last input, output not channels_last"

    ref_args = make(torch.float64, torch.float64, grad)
    stock_args = make(dtype, stats, grad)
    ref = composite(*ref_args, kw["training"], kw["momentum"], kw["eps"], kw["relu"])
    stock = composite(*stock_args, kw["training"], kw["momentum"], kw["eps"], kw["relu"])
    assert_close("output", y, ref, dtype, stock)
    if case["running"] and case["training"]:
        assert_close("running_mean", ours_args[2], ref_args[2], stats, stock_args[2])
        assert_close("running_var", ours_args[3], ref_args[3], stats, stock_args[3])
    elif case["running"]:
        assert torch.equal(ours_args[2], stock_args[2]) and torch.equal(ours_args[3], stock_args[3])
    if not grad:
        return
    names = ["grad_input", "grad_residual", None, None, "grad_weight", "grad_bias"]
    picked = [i for i, t in enumerate(ours_args) if names[i] and t is not None]
    outs = []
    for out, args, d in ((y, ours_args, dtype), (ref, ref_args, torch.float64), (stock, stock_args, dtype)):
        outs.append(torch.autograd.grad(out, [args[i] for i in picked], dy.to(dtype).to(DEVICE, d)))
    # grad_input's operands, per channel: invstd * |weight| * max |dy| (a channel of two values cancels to
    # almost nothing; its elements are rounding residue of these terms: tests/_oracle.py, operand_scale)
    x64 = x_values.to(dtype).double()
    if case["training"]:
        var = x64.var(dim=(0, 2, 3), unbiased=False)
    else:
        var = rv.to(stats).double()
    w_abs = weight.to(stats).double().abs() if weight is not None else torch.ones(c, dtype=torch.float64)
    dy_max = dy.to(dtype).double().abs().amax(dim=(0, 2, 3))
    grad_input_terms = ((var + kw["eps"]).rsqrt() * w_abs * dy_max).view(1, c, 1, 1).to(DEVICE)
    for k, i in enumerate(picked):
        assert_close(names[i], outs[0][k], outs[1][k], outs[0][k].dtype, outs[2][k],
                     operand_scale=grad_input_terms if names[i] == "grad_input" else None)


@pytest.mark.parametrize("backend", BACKENDS + CPU_EXTRA_BACKENDS)
def test_random_inputs_match_the_oracle(backend):
    examples = EXAMPLES.get(backend, TRITON_EXAMPLES)
    prepare_backend(backend)
    if backend == "auto":  # what a CPU user gets: aten's batch norm, not the reference composite
        assert _backend.resolve("auto", torch.empty(1, 1, 1, 1)) == _backend.NATIVE

    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow],
              database=None)
    @given(case=cases(backend))
    def check(case):
        _run(backend, case)

    check()
