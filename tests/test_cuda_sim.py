"""The CUDA C++ BN + add + ReLU kernels (csrc/bn_add_relu/) executed on CPU by the SIMT runtime of
csrc/sim/ (backend "cuda_sim", resfused/_cuda_sim.py), against the float64 composite of tests/_oracle.py.

The planner is the GPU's, fed H100's properties, and both schemes are forced (RESFUSED_CUDA_SCHEME); the
shapes are small and chosen to hit every tail: C = 1, 3, 13 (channel tails, channels_last groups off a
16-byte boundary), H*W odd (nchw row tails), N*H*W and N*ceil(H*W/8) past one block's rows (several splits
in both schemes), storage offsets (misaligned views), and the persistent kernels' re-read path
(RESFUSED_CUDA_PERSISTENT_CACHE_BYTES). Every kernel runs with the race and bounds checks on; thread orders
forward, reverse and random must give bit-identical results. Planted bugs (a race, an out-of-bounds write,
a divergent __syncthreads) must be caught.

Tolerances: tests/_oracle.assert_close (twice stock PyTorch's own error in the test dtype, a few ulps
floor); masks bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import pytest
import torch

import resfused
from resfused import _backend, _cuda_sim as sim, _layout
from resfused.ops import bn_add_relu as op
from resfused.reference import bn_add_relu as ref

from _oracle import assert_close, composite

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
SCHEMES = ["two_pass", "persistent"]
ORDERS = ["forward", "reverse", "random"]
SHAPES = {
    "C13_tails": (3, 13, 3, 5),
    "C1": (3, 1, 3, 3),
    "HW1": (8, 16, 1, 1),
}
# several blocks per channel (splits > 1) in both schemes and layouts on H100's plan
SPLIT_SHAPES = {"cl_splits": (2, 24, 16, 20), "nchw_splits": (12, 3, 24, 32)}


@pytest.fixture(scope="module", autouse=True)
def _built():
    t = time.time()
    sim.build()
    print(f"cuda_sim build/load: {time.time() - t:.1f} s")


@pytest.fixture(autouse=True)
def _kernel_log(request):
    """RESFUSED_SIM_KERNEL_LOG=path appends, per test, the kernels it launched (JSON lines): the record
    of which tests executed which kernel."""
    path = os.environ.get("RESFUSED_SIM_KERNEL_LOG")
    if not path:
        yield
        return
    before = sim.kernel_counts()
    yield
    after = sim.kernel_counts()
    ran = sorted(k for k in after if after[k] > before.get(k, 0))
    with open(path, "a") as f:
        f.write(json.dumps({"test": request.node.nodeid, "kernels": ran}) + "\n")


@pytest.fixture
def scheme(request, monkeypatch):
    monkeypatch.setenv("RESFUSED_CUDA_SCHEME", request.param)
    return request.param


def _inputs(shape, dtype, layout, seed=0, offset=False, mean=0.0):
    """``offset``: x, z and dy in views one element into their storage; ``mean``: added to x, z and dy."""
    g = torch.Generator().manual_seed(seed)
    fmt = LAYOUTS[layout]
    c = shape[1]

    def act():
        t = (torch.randn(shape, generator=g) + mean).to(dtype).contiguous(memory_format=fmt)
        if not offset:
            return t
        # the same values in a view that starts one element into its storage (off 16-byte alignment)
        base = torch.empty(t.numel() + 1, dtype=dtype)
        view = base[1:].as_strided(t.shape, t.stride())
        view.copy_(t)
        return view

    x, z, dy = act(), act(), act()
    w = torch.randn(c, generator=g) * 0.5 + 1
    b = torch.randn(c, generator=g) * 0.5
    rm = torch.randn(c, generator=g) * 0.1
    rv = torch.rand(c, generator=g) + 0.5
    return x, z, w, b, rm, rv, dy


def _clone(t, dtype=None, grad=False):
    if t is None:
        return None
    t = t.detach().clone(memory_format=torch.preserve_format)
    return (t if dtype is None else t.to(dtype)).requires_grad_(grad)


def _train_case(shape, dtype, layout, residual=True, relu=True, affine=True, momentum=0.1, offset=False, seed=0,
                mean=0.0):
    """Forward (training) + backward through the public op on cuda_sim vs the float64 composite; returns
    the sim's results (for bitwise comparisons)."""
    x, z, w, b, rm, rv, dy = _inputs(shape, dtype, layout, seed, offset, mean)
    dy = dy - mean  # a gradient of unit spread around 0
    z = z if residual else None
    w, b = (w, b) if affine else (None, None)

    def run(fn, act_dtype, p_dtype, clone_x=True):
        args = [_clone(x, act_dtype, True), _clone(z, act_dtype, True), _clone(rm, p_dtype), _clone(rv, p_dtype),
                _clone(w, p_dtype, True), _clone(b, p_dtype, True)]
        if not clone_x:  # keep the (possibly offset) view itself
            args[0] = x.detach().requires_grad_(True)
        y = fn(*args)
        leaves = [a for a in (args[0], args[1], args[4], args[5]) if a is not None]
        return [y, *torch.autograd.grad(y, leaves, dy.to(act_dtype)), args[2], args[3]]

    ours = run(lambda *a: op.batch_norm_add_relu(*a, training=True, momentum=momentum, relu=relu,
                                                 backend="cuda_sim"), dtype, torch.float32, clone_x=not offset)
    want = run(lambda *a: composite(*a, True, momentum, 1e-5, relu), torch.float64, torch.float64)
    stock = run(lambda *a: composite(*a, True, momentum, 1e-5, relu), dtype, torch.float32)
    names = ["output", "grad_input"] + (["grad_residual"] if residual else []) + \
        (["grad_weight", "grad_bias"] if affine else []) + ["running_mean", "running_var"]
    assert ours[0].is_contiguous(memory_format=LAYOUTS[layout])
    for nm, got, exp, base in zip(names, ours, want, stock):
        assert_close(nm, got, exp, got.dtype, base)
    return ours


def _backend_forward(x, z, w, b, rm, rv, relu=True):
    return sim.forward_train(x, z, w, b, rm, rv, 0.1, 1e-5, relu)


def _assert_mask_exact(mask, y, x, z, w, b, layout, relu=True):
    """The mask is (y > 0) packed bit for bit (padding bits zero) and agrees with the reference's mask
    wherever the float64 pre-activation is not within rounding of zero."""
    assert mask.dtype == torch.uint8
    assert torch.equal(mask, _layout.pack_mask(y > 0, layout)), "mask bits != packed (y > 0)"
    x64 = x.double()
    mean, var = x64.mean((0, 2, 3), keepdim=True), x64.var((0, 2, 3), unbiased=False, keepdim=True)
    pre = (x64 - mean) / torch.sqrt(var + 1e-5) * w.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1)
    pre = pre + (z.double() if z is not None else 0)
    ref_mask = ref.forward_train(x, z, w, b, None, None, 0.1, 1e-5, relu)[1]
    near_zero = pre.abs() <= 1e-2 * max(1.0, pre.abs().max().item())
    differ = _layout.unpack_mask(mask ^ ref_mask, x.shape, layout)
    assert not (differ & ~near_zero).any(), "mask differs from the reference away from zero"


# ---------------------------------------------------------------------------------------------------
# the backend in the registry
# ---------------------------------------------------------------------------------------------------

def test_listed_when_built_never_auto():
    assert "cuda_sim" in resfused.available_backends()
    x = torch.randn(2, 3, 4, 4)
    assert _backend.resolve("auto", x) == "native"  # auto's CPU fast path (aten BN), never the sim
    assert _backend.resolve("auto", x, native=False) == "reference"
    assert _backend.resolve("cuda_sim", x) == "cuda_sim"
    resfused.set_backend("cuda_sim")
    try:
        assert _backend.resolve(None, x) == "cuda_sim"
    finally:
        resfused.set_backend(None)
    with pytest.raises(RuntimeError, match="cuda_sim.*BN \\+ add \\+ ReLU ops, not conv"):
        _backend.resolve_with(lambda *a: None, "cuda_sim", x, "conv_bn")
    with pytest.raises(RuntimeError, match="float32, float16 and bfloat16"):
        _backend.resolve("cuda_sim", x.double())
    with pytest.raises(RuntimeError, match="sample_scale"):
        _backend.resolve("cuda_sim", x, sample_scale=True)


def test_module_backend_argument_and_momentum_none():
    """BatchNormAddReLU2d(backend="cuda_sim", momentum=None): cumulative running stats over two steps."""
    torch.manual_seed(0)
    ours = resfused.nn.BatchNormAddReLU2d(5, momentum=None, backend="cuda_sim")
    stock = torch.nn.BatchNorm2d(5, momentum=None)
    for step in range(2):
        x, z = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)
        y = ours(x, z)
        assert_close(f"step {step} output", y, torch.relu(stock(x.double().float()) + z), torch.float32)
    assert ours.num_batches_tracked.item() == 2
    assert_close("running_mean", ours.running_mean, stock.running_mean, torch.float32)
    assert_close("running_var", ours.running_var, stock.running_var, torch.float32)


# ---------------------------------------------------------------------------------------------------
# training forward + backward against the oracle, both schemes, every dtype and layout
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scheme", SCHEMES, indirect=True)
def test_train_matches_oracle(scheme, dtype, layout, shape):
    x = torch.empty(shape, dtype=dtype).contiguous(memory_format=LAYOUTS[layout])
    assert sim.plan(x, "forward_train").startswith(scheme)
    assert sim.plan(x, "backward").startswith(scheme)
    _train_case(shape, dtype, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scheme", SCHEMES, indirect=True)
def test_many_channels(scheme, layout):
    """C = 264: more than one channels_last channel tile (256 channels a tile) and more than one finalize block
    (32 channels a block), with a tail in each, as ResNet's 512-2048-channel layers have."""
    _train_case((2, 264, 2, 3), torch.bfloat16, layout)


@pytest.mark.parametrize("shape", {"one_split": (4, 8, 4, 4), **SPLIT_SHAPES}.values(),
                         ids=["one_split", *SPLIT_SHAPES])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scheme", SCHEMES, indirect=True)
def test_large_mean(scheme, layout, shape):
    """fp32 inputs around 1e4 with unit spread (test_bn_add_relu's test_large_mean, which the sim found failing:
    a Welford mean kept near 1e4 in fp32 is rounded at every update and ended 1.3 ulp of 1e4 off, where stock is
    within half of one), in one split and across several."""
    _train_case(shape, torch.float32, layout, mean=1e4)


@pytest.mark.parametrize("shape", SPLIT_SHAPES.values(), ids=SPLIT_SHAPES.keys())
@pytest.mark.parametrize("scheme", SCHEMES, indirect=True)
def test_several_splits(scheme, shape):
    layout = "cl" if shape == SPLIT_SHAPES["cl_splits"] else "nchw"
    x = torch.empty(shape).contiguous(memory_format=LAYOUTS[layout])
    plan = sim.plan(x, "forward_train")
    if scheme == "persistent":
        assert plan.startswith("persistent grid=") and int(plan.split("grid=")[1].split()[0]) > (
            1 if layout == "cl" else 3), plan
    else:
        assert plan.startswith("two_pass") and int(plan.split("splits=")[1].split()[0]) > 1, plan
    _train_case(shape, torch.float16, layout)


@pytest.mark.parametrize("cap", [0, 20000])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_persistent_reread_path(monkeypatch, layout, cap):
    """A capped shared-memory cache: none (cap 0) or part (one of several iterations) of each thread's
    slice re-read from memory, on a 2-SM device (several iterations per thread at a small shape)."""
    monkeypatch.setenv("RESFUSED_CUDA_SCHEME", "persistent")
    monkeypatch.setenv("RESFUSED_CUDA_PERSISTENT_CACHE_BYTES", str(cap))
    shape = SPLIT_SHAPES["cl_splits"] if layout == "cl" else SPLIT_SHAPES["nchw_splits"]
    x = torch.empty(shape).contiguous(memory_format=LAYOUTS[layout])
    with sim.settings(device=dataclasses.replace(sim.H100, sms=2)):
        plan = sim.plan(x, "forward_train")
        fields = dict(kv.split("=") for kv in plan.split()[1:])
        cache_iters, iters = int(fields["cache_iters"]), int(fields["iters"])
        assert plan.startswith("persistent") and cache_iters < iters and (cache_iters > 0) == (cap > 0), plan
        _train_case(shape, torch.float32, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scheme", SCHEMES, indirect=True)
@pytest.mark.parametrize("variant", ["no_residual", "no_relu", "no_affine"])
def test_train_variants(scheme, layout, variant):
    _train_case((2, 13, 3, 5), torch.float32, layout, residual=variant != "no_residual", relu=variant != "no_relu",
                affine=variant != "no_affine")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scheme", SCHEMES, indirect=True)
def test_misaligned_views(scheme, layout, dtype):
    """Tensors starting one element into their storage: vector accesses fall back, bounds stay inside."""
    _train_case((2, 16, 3, 8), dtype, layout, offset=True)


# ---------------------------------------------------------------------------------------------------
# masks, eval, backward variants
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scheme", SCHEMES, indirect=True)
def test_mask_bits(scheme, layout, dtype):
    x, z, w, b, rm, rv, _ = _inputs((3, 13, 3, 5), dtype, layout)
    y, mask, mean, invstd = _backend_forward(x, z, w, b, rm, rv)
    assert mask.shape == _layout.mask_shape(x.shape, layout)
    _assert_mask_exact(mask, y, x, z, w, b, layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_eval(layout, dtype):
    x, z, w, b, rm, rv, _ = _inputs((3, 13, 3, 5), dtype, layout)
    y, mask = sim.forward_eval(x, z, w, b, rm, rv, 1e-5, True, True)
    want = composite(x.double(), z.double(), rm.double(), rv.double(), w.double(), b.double(), False, 0.1, 1e-5, True)
    stock = composite(x, z, rm, rv, w, b, False, 0.1, 1e-5, True)
    assert_close("eval output", y, want, dtype, stock)
    assert torch.equal(mask, _layout.pack_mask(y > 0, layout))
    y2, mask2 = sim.forward_eval(x, None, None, None, rm, rv, 1e-5, False, False)
    assert mask2.numel() == 0
    assert_close("eval output, no residual/affine/relu", y2,
                 composite(x.double(), None, rm.double(), rv.double(), None, None, False, 0.1, 1e-5, False), dtype,
                 composite(x, None, rm, rv, None, None, False, 0.1, 1e-5, False))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scheme", SCHEMES, indirect=True)
@pytest.mark.parametrize("what", ["all", "no_input_grad", "no_residual_grad", "no_weight_grad", "eval"])
def test_backward_variants(scheme, layout, what):
    """The backend's backward for each combination of requested gradients against the reference
    backend's (float64 inputs cast to float32)."""
    x, z, w, b, rm, rv, dy = _inputs((3, 13, 3, 5), torch.float32, layout)
    _, mask, mean, invstd = ref.forward_train(x, z, w, b, None, None, 0.1, 1e-5, True)
    training = what != "eval"
    flags = dict(need_input_grad=what != "no_input_grad", need_residual_grad=what != "no_residual_grad",
                 need_weight_grad=what != "no_weight_grad")
    got = sim.backward(dy, x, mask, mean, invstd, w, True, training, *flags.values())
    want = ref.backward(dy.double(), x.double(), mask, mean.double(), invstd.double(), w.double(), True, training,
                        *flags.values())
    stock = ref.backward(dy, x, mask, mean, invstd, w, True, training, *flags.values())
    for nm, g, e, s in zip(("grad_input", "grad_residual", "grad_weight", "grad_bias"), got, want, stock):
        assert g.numel() == e.numel(), nm
        if g.numel():
            assert_close(nm, g, e, g.dtype, s)


# ---------------------------------------------------------------------------------------------------
# thread orders, reproducibility
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scheme", SCHEMES, indirect=True)
def test_thread_orders_bit_identical(scheme, layout):
    """Forward, reverse and random thread/block orders give the same bits (and each run passes the
    oracle); a second run in the same order too."""
    results = {}
    for order in ORDERS + ["forward"]:
        with sim.settings(order=order, seed=7):
            results.setdefault(order, []).append(_train_case((3, 13, 3, 5), torch.bfloat16, layout))
    first = results["forward"][0]
    for order, runs in results.items():
        for r in runs:
            for a, b in zip(first, r):
                assert torch.equal(a, b), f"{order} order differs from forward"


# ---------------------------------------------------------------------------------------------------
# the checks: clean on every kernel, planted bugs caught
# ---------------------------------------------------------------------------------------------------

KERNELS = ["cl_stats_kernel", "nchw_stats_kernel", "cl_apply_kernel", "nchw_apply_kernel", "cl_bwd_reduce_kernel",
           "nchw_bwd_reduce_kernel", "cl_dx_kernel", "nchw_dx_kernel", "cl_fwd_persistent_kernel",
           "nchw_fwd_persistent_kernel", "cl_bwd_persistent_kernel", "nchw_bwd_persistent_kernel",
           "finalize_stats_kernel"]


@pytest.mark.parametrize("order", ORDERS)
def test_every_kernel_runs_clean(monkeypatch, order):
    """Every kernel of every dtype runs with the race and bounds checks on, in each thread order."""
    before = sim.kernel_counts()
    with sim.settings(order=order, seed=3, races=True, bounds=True):
        for scheme in SCHEMES:
            monkeypatch.setenv("RESFUSED_CUDA_SCHEME", scheme)
            for dtype in DTYPES:
                for layout in LAYOUTS:
                    x, z, w, b, rm, rv, dy = _inputs((2, 13, 3, 5), dtype, layout)
                    y, mask, mean, invstd = sim.forward_train(x, z, w, b, rm, rv, 0.1, 1e-5, True)
                    sim.forward_eval(x, z, w, b, rm, rv, 1e-5, True, True)
                    sim.backward(dy, x, mask, mean, invstd, w, True, True, True, True, True)
    after = sim.kernel_counts()
    ran = {k for k in after if after[k] > before.get(k, 0)}
    expected = {f"{k}<{e}>" for k in KERNELS for e in ("F32", "F16", "BF16")}
    expected |= {"finalize_sums_kernel"}
    assert expected <= ran, f"kernels that did not run: {sorted(expected - ran)}"


@pytest.mark.parametrize("order", ORDERS)
def test_planted_race_caught(order):
    v = torch.arange(64, dtype=torch.float32)
    with sim.settings(order=order, seed=1):
        assert sim.run_planted("clean", v)[0].item() == v.sum().item()
        with pytest.raises(sim.SimError, match=r"shared-memory race .* in kernel planted_sum_kernel, block "
                                               r"\(0, 0, 0\): thread \(\d+, 0, 0\) (reads|writes) shared byte offset \d+"):
            sim.run_planted("race", v)


@pytest.mark.parametrize("order", ORDERS)
def test_planted_out_of_bounds_write_caught(order):
    v = torch.arange(64, dtype=torch.float32)
    with sim.settings(order=order):
        with pytest.raises(sim.SimError, match=r"out-of-bounds global write in kernel planted_oob_kernel, .*thread "
                                               r"\(64, 0, 0\): 4 bytes at region 'out' of 256 bytes, 4 bytes past"):
            sim.run_planted("oob_write", v)


def test_planted_divergent_syncthreads_caught():
    with pytest.raises(sim.SimError, match=r"wait at different __syncthreads \(.*planted.cpp:\d+ and .*planted.cpp:\d+\)"):
        sim.run_planted("divergent_sync", torch.arange(64, dtype=torch.float32))


def test_race_shows_in_thread_order_without_the_detector():
    """Without the detector the planted race still changes the result with the thread order (NaN-filled
    shared memory in forward order): the orders are a second, independent net."""
    v = torch.arange(64, dtype=torch.float32)
    with sim.settings(races=False, order="forward"):
        fwd = sim.run_planted("race", v)[0].item()
    with sim.settings(races=False, order="reverse"):
        rev = sim.run_planted("race", v)[0].item()
    assert rev == v.sum().item() and fwd != fwd  # NaN: thread 0 read slots not yet written


# ---------------------------------------------------------------------------------------------------
# the cooperative launch refused at launch time (issue 13): fall back to two-pass, and remember it
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_refused_cooperative_launch_falls_back_and_is_remembered(monkeypatch, layout):
    monkeypatch.setenv("RESFUSED_CUDA_SCHEME", "persistent")
    shape = (2, 13, 3, 5)
    x = torch.empty(shape).contiguous(memory_format=LAYOUTS[layout])
    # the planner assumes 64 registers per thread; at launch the kernel "needs" 255: one 512-thread block
    # per SM no longer fits, and the planned co-resident grid is refused
    dev = dataclasses.replace(sim.H100, sms=8, launch_persistent_regs=255)
    with sim.settings(device=dev):
        assert sim.plan(x, "forward_train").startswith("persistent")
        monkeypatch.setenv("RESFUSED_CUDA_SCHEME", "auto")
        assert sim.plan(x, "forward_train").startswith("persistent")
        monkeypatch.setenv("RESFUSED_CUDA_SCHEME", "persistent")
        before = sim.kernel_counts()
        _train_case(shape, torch.float32, layout)
        after = sim.kernel_counts()
        ran = {k for k in after if after[k] > before.get(k, 0)}
        tag = "cl" if layout == "cl" else "nchw"
        assert not any("persistent" in k for k in ran), ran
        assert {f"{tag}_stats_kernel<F32>", f"{tag}_apply_kernel<F32>", f"{tag}_dx_kernel<F32>"} <= ran, ran
        assert sim.plan(x, "forward_train").startswith("two_pass")  # remembered for the shape
        assert sim.plan(x, "backward").startswith("two_pass")
        _train_case(shape, torch.float32, layout)  # later calls run two-pass at once
        monkeypatch.setenv("RESFUSED_CUDA_SCHEME", "auto")  # its cost model picked persistent before the refusal
        assert sim.plan(x, "forward_train").startswith("two_pass")
        assert sim.plan(x, "backward").startswith("two_pass")


_REFUSAL_PROBE = r"""
#include <cstdio>
#include "launch_refusal.h"
int main() {
  const cudaError_t refused[] = {cudaErrorCooperativeLaunchTooLarge, cudaErrorLaunchOutOfResources,
                                 cudaErrorInvalidConfiguration, cudaErrorNotSupported, cudaErrorNotPermitted};
  const cudaError_t thrown[] = {cudaSuccess, cudaErrorIllegalAddress, cudaErrorLaunchFailure,
                                cudaErrorMemoryAllocation, cudaErrorInvalidValue, cudaErrorLaunchTimeout,
                                cudaErrorInvalidDeviceFunction, cudaErrorUnknown};
  for (cudaError_t e : refused) std::printf("%d 1 %d\n", (int)e, (int)resfused::cooperative_launch_refused(e));
  for (cudaError_t e : thrown) std::printf("%d 0 %d\n", (int)e, (int)resfused::cooperative_launch_refused(e));
}
"""


def test_gpu_glue_falls_back_on_launch_refusals_only(tmp_path):
    """The GPU glue's classification of cudaLaunchCooperativeKernel's errors (csrc/bn_add_relu/launch_refusal.h):
    a refusal before anything ran (too large, out of resources, an invalid configuration, not supported or not
    permitted) falls back to two-pass as the simulated TooLarge above does; a sticky or unrelated error (an illegal
    address left by an earlier kernel, out of memory) is thrown, never hidden by a fallback."""
    import shutil
    import subprocess
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "g++"
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    if not os.path.exists(os.path.join(cuda_home, "include", "driver_types.h")):
        pytest.skip(f"no CUDA toolkit headers under {cuda_home} (the GPU glue is not built without them either)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "probe.cpp").write_text(_REFUSAL_PROBE)
    subprocess.run([cxx, "-std=c++17", f"-I{os.path.join(root, 'csrc', 'bn_add_relu')}",
                    f"-I{os.path.join(cuda_home, 'include')}", str(tmp_path / "probe.cpp"), "-o",
                    str(tmp_path / "probe")], check=True, timeout=120)
    out = subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True, check=True).stdout.split("\n")
    rows = [line.split() for line in out if line]
    assert len(rows) == 13
    wrong = [r[0] for r in rows if r[1] != r[2]]
    assert not wrong, f"cudaError codes classified wrongly: {wrong}"


# ---------------------------------------------------------------------------------------------------
# a real kernel with its barrier removed: caught by the detector in every order
# ---------------------------------------------------------------------------------------------------

_MISSING_BARRIER_SCRIPT = r"""
import json, os, sys
import torch
import resfused._cuda_sim as sim
sim.build()
out = {}
for scheme in ("two_pass", "persistent"):
    os.environ["RESFUSED_CUDA_SCHEME"] = scheme
    x = torch.randn(3, 13, 3, 5, generator=torch.Generator().manual_seed(0))
    for order in ("forward", "reverse", "random"):
        with sim.settings(order=order, seed=2, races=False):
            mean = sim.forward_train(x, None, None, None, None, None, 0.1, 1e-5, True)[2]
        err = (mean.double() - x.double().mean((0, 2, 3))).abs().max().item()
        with sim.settings(order=order, seed=2, races=True):
            try:
                sim.forward_train(x, None, None, None, None, None, 0.1, 1e-5, True)
                caught = ""
            except sim.SimError as e:
                caught = str(e)
        out[f"{scheme}/{order}"] = [err, caught]
print(json.dumps(out))
"""


def test_missing_barrier_in_block_tree_reduce_caught(tmp_path):
    """A copy of csrc/ whose block_tree_reduce lacks its second __syncthreads (the next level's stores
    overwrite slots other threads are still reading): without the detector only the forward order hides
    it; with the detector every order and both schemes report the race in the statistics kernels."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    csrc = tmp_path / "csrc"
    for sub in ("sim", "bn_add_relu"):
        shutil.copytree(os.path.join(root, "csrc", sub), csrc / sub)
    reduce_h = csrc / "bn_add_relu" / "reduce.cuh"
    text = reduce_h.read_text()
    intact = "      s.merge(o);\n    }\n    __syncthreads();\n  }\n}"
    assert intact in text, "block_tree_reduce changed: update this test's mutation"
    reduce_h.write_text(text.replace(intact, "      s.merge(o);\n    }\n  }\n}"))
    env = dict(os.environ, RESFUSED_SIM_CSRC=str(csrc), RESFUSED_SIM_CACHE=os.path.join(root, "build", "cuda_sim"))
    p = subprocess.run([sys.executable, "-c", _MISSING_BARRIER_SCRIPT], cwd=root, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    for key, (err, caught) in res.items():
        assert "shared-memory race" in caught and ("stats_kernel" in caught or "fwd_persistent_kernel" in caught), \
            (key, caught)
        if key.endswith("/reverse"):
            assert err > 1e-3, f"{key}: the missing barrier should corrupt the mean in reverse order ({err})"
