"""bench/ on CPU: the bytes model, timers, both suites with a fake timer, the correctness gate, the JSON schema
and its per-row rewrite, the markdown and PNG report, `bench/run.py` without a GPU and the pytest-benchmark entry.
bench/gpu_check.sh (its plan, --simulate, --dry-run, a kill in the middle) is tests/test_gpu_check.py's.

GPU timing itself (CUDA events, rotation against L2, the model suite at batch 256) runs only on a GPU,
through bench/run.py and bench/gpu_check.sh.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import _gate, _harness, _schema, report  # noqa: E402
from bench import bench_bn_add_relu as kb  # noqa: E402
from bench import bench_conv_bias_act as kc  # noqa: E402
from bench import bench_resnet as mb  # noqa: E402

CPU = torch.device("cpu")
# One thread per process: `make test` runs two xdist workers on two cores.
# PYTEST_* variables are dropped: an xdist worker's would make the child pytest think it is one.
NO_GPU_ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")},
              "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _doc(**kw):
    return _harness.new_result(CPU, kw.pop("copy_bw", 10.0), **kw)


# ---------------------------------------------------------------------------------------------------
# bytes model, statistics, rotation
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op,mode,dtype,expected", [
    # E = 2*8*4*4 = 256 elements
    ("batch_norm_add_relu", "eval_fwd", "fp32", 3 * 256 * 4),                       # x, z, y
    ("batch_norm_add_relu", "train_fwd", "fp32", 3 * 256 * 4),                      # same floor as eval
    ("batch_norm_add_relu", "train_fwd_bwd", "fp32", 3 * 1024 + 4 * 1024 + 2 * 32),  # + g, x, dx, dz + 2 masks
    ("batch_norm_relu", "train_fwd_bwd", "bf16", 2 * 512 + 3 * 512 + 2 * 32),       # no z, no dz
    ("batch_norm_add", "train_fwd_bwd", "fp32", 3 * 1024 + 3 * 1024),               # dz is grad_y: not written
    ("batch_norm", "train_fwd_bwd", "fp16", 2 * 512 + 3 * 512),
    ("batch_norm", "eval_fwd", "bf16", 2 * 512),
])
def test_min_bytes_model(op, mode, dtype, expected):
    assert kb.min_bytes(kb.KernelCase(op, mode, 2, 8, 4, 4, dtype)) == expected


def test_min_bytes_mask_rounds_up_to_whole_bytes():
    case = kb.KernelCase("batch_norm_relu", "train_fwd_bwd", 1, 1, 3, 3, "fp32")  # E = 9: 2 bytes of mask
    assert kb.min_bytes(case) == 2 * 9 * 4 + 3 * 9 * 4 + 2 * 2


def test_cases_cover_the_issue_matrix():
    full = kb.SELECTIONS[(True, False)]
    cases = kb.kernel_cases(**full)
    assert len(cases) == 4 * 3 * 9 * 3
    assert {c.shape for c in cases if c.op == "batch_norm_add_relu" and c.mode == "eval_fwd" and c.dtype == "bf16"} == {
        (256, 64, 112, 112), (256, 64, 56, 56), (256, 256, 56, 56), (256, 128, 28, 28), (256, 512, 28, 28),
        (256, 256, 14, 14), (256, 1024, 14, 14), (256, 512, 7, 7), (256, 2048, 7, 7)}
    assert {(c.dtype, c.layout) for c in cases} == {("bf16", "channels_last"), ("fp16", "channels_last"), ("fp32", "nchw")}
    quick = kb.kernel_cases(**kb.SELECTIONS[(True, True)])
    assert set(quick) < set(cases) and set(kb.MODES) == {c.mode for c in quick}


def test_quantiles_and_timing():
    assert _harness.quantile([5, 1, 3, 2, 4], 0.5) == 3
    assert _harness.quantile([1, 2, 3, 4, 5], 0.2) == pytest.approx(1.8)
    assert _harness.quantile([1, 2, 3, 4, 5], 0.8) == pytest.approx(4.2)
    assert _harness.quantile([7.0], 0.2) == 7.0
    t = _harness.Timing.from_samples([3.0, 1.0, 2.0])
    assert (t.p20_ms, t.p50_ms, t.p80_ms, t.reps) == (pytest.approx(1.4), 2.0, pytest.approx(2.6), 3)


def test_rotation_sets():
    l2 = 50 << 20
    assert _harness.rotation_sets(10 << 20, l2) == 20          # 4 x L2 covered
    assert _harness.rotation_sets(300 << 20, l2) == 1          # larger than 4 x L2: no rotation needed
    assert _harness.rotation_sets(1, l2) == 64                 # capped
    assert _harness.rotation_sets(10 << 20, 0) == 1            # CPU: no L2 figure


def test_wall_timer_rotates_inputs():
    seen = []
    t = _harness.WallTimer(warmup=1, min_reps=4, max_reps=4, budget_s=0.0)(seen.append, 3)
    assert seen == [0, 1, 2, 0, 1, 2]                          # first call, warm-up, then 4 timed calls
    assert t.reps == 4 and 0 <= t.p20_ms <= t.p50_ms <= t.p80_ms


class _FakeEvent:
    """Stands in for torch.cuda.Event on CPU: records wall time."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def test_cuda_event_timer_control_flow(monkeypatch):
    """The GPU timer's logic (first call, estimate, warm-up, per-call events, prefill sleeps, rotation)
    with CUDA events replaced by wall-clock stand-ins."""
    sleeps = []
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: sleeps.append(cycles), raising=False)
    monkeypatch.setattr(_harness, "_sleep_cycles_per_ms", 1000.0)
    seen = []

    def fn(i):
        seen.append(i)
        time.sleep(0.002)

    timer = _harness.CudaEventTimer(warmup_ms=5, rep_ms=20, min_reps=7, max_reps=9, chunk=4)
    t = timer(fn, 3)
    assert 7 <= t.reps <= 9 and 1.5 <= t.p20_ms <= t.p50_ms <= t.p80_ms < 50
    assert seen[:6] == [0, 1, 2, 0, 1, 2]                      # rotation from the first call on
    assert len(seen) > 1 + 3 + t.reps                           # first call, estimate, warm-up, timed calls
    assert len(sleeps) == math.ceil(t.reps / 4) and all(c > 0 for c in sleeps)
    sleeps.clear()
    _harness.CudaEventTimer(warmup_ms=0, rep_ms=1, min_reps=3, prefill=False)(fn, 1)
    assert sleeps == []


def test_do_bench_timer_asks_for_quantiles(monkeypatch):
    triton_testing = pytest.importorskip("triton.testing")
    calls = {}

    def fake_do_bench(fn, warmup, rep, quantiles):
        calls.update(warmup=warmup, rep=rep, quantiles=quantiles)
        fn(), fn()
        return [1.0, 2.0, 3.0]

    monkeypatch.setattr(triton_testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    seen = []
    t = _harness.DoBenchTimer(5, 50)(seen.append, 2)
    assert (t.p20_ms, t.p50_ms, t.p80_ms) == (1.0, 2.0, 3.0)
    assert calls == {"warmup": 5, "rep": 50, "quantiles": [0.2, 0.5, 0.8]} and seen == [0, 1, 0]


def test_copy_bandwidth_counts_read_and_write():
    bw = _harness.copy_bandwidth_GBps(CPU, _harness.FakeTimer(ms=1.0), nbytes=1000)
    assert bw == pytest.approx(2 * 1000 / 1e-3 / 1e9)


# ---------------------------------------------------------------------------------------------------
# kernel suite
# ---------------------------------------------------------------------------------------------------

def _tiny_cases(dtypes=("fp32", "bf16")):
    return kb.kernel_cases(ops=tuple(kb.OPS), modes=kb.MODES, shapes=((8, 4, 4),), dtypes=dtypes, batch=2)


def test_kernel_suite_rows_skips_and_speedups(one_thread):
    cases = _tiny_cases()
    doc = _doc(copy_bw=4.0)
    timer = _harness.FakeTimer(ms=lambda key: 2.0 if key[1] == "eager" else 1.0)
    kb.run_kernel_suite(doc, cases, kb.CPU_IMPLS, CPU, timer, show_progress=False)
    assert doc["errors"] == []
    assert len(doc["rows"]) == 2 * len(cases)
    assert {r["impl"] for r in doc["rows"]} == {"eager", "resfused-reference"}
    skipped = {s["impl"]: s for s in doc["skipped"]}
    assert set(skipped) == {"compile", "resfused-cuda", "resfused-triton"}
    assert all(s["cases"] == len(cases) and s["reason"] for s in skipped.values())
    assert "CPU" in skipped["compile"]["reason"]
    _harness.add_derived(doc)
    assert _harness.validate(doc) == []
    for r in doc["rows"]:
        case = next(c for c in cases if c.row_fields() == {k: r[k] for k in c.row_fields()})
        assert r["bytes"] == kb.min_bytes(case)
        assert r["GBps"] == pytest.approx(r["bytes"] / (r["p50_ms"] * 1e-3) / 1e9)
        assert r["frac_copy_bw"] == pytest.approx(r["GBps"] / 4.0)
        assert r["speedup_vs_eager"] == pytest.approx(1.0 if r["impl"] == "eager" else 2.0)
        assert r["input_sets"] == 1 and r["device_type"] == "cpu"


def test_kernel_suite_refuses_to_time_a_wrong_result(monkeypatch):
    real = kb.make_forward

    def broken(impl):
        f = real(impl)
        if impl != "resfused-reference":
            return f
        return lambda *args: f(*args) * 1.5

    monkeypatch.setattr(kb, "make_forward", broken)
    doc = _doc()
    timer = _harness.FakeTimer()
    case = kb.KernelCase("batch_norm_add_relu", "eval_fwd", 2, 8, 4, 4, "fp32")
    kb.run_kernel_suite(doc, [case], ["eager", "resfused-reference"], CPU, timer, show_progress=False)
    assert [r["impl"] for r in doc["rows"]] == ["eager"]
    (err,) = doc["errors"]
    assert err["impl"] == "resfused-reference" and "against float64" in err["error"] and "not timed" in err["error"]
    assert [k[1] for k in timer.keys] == ["eager"]


def test_kernel_suite_records_an_exception_and_goes_on(monkeypatch):
    def raising(*args):
        raise RuntimeError("kernel launch failed")

    real = kb.make_forward
    monkeypatch.setattr(kb, "make_forward", lambda impl: raising if impl == "resfused-reference" else real(impl))
    doc = _doc()
    cases = _tiny_cases(("fp32",))[:2]
    kb.run_kernel_suite(doc, cases, ["eager", "resfused-reference"], CPU, _harness.FakeTimer(), show_progress=False)
    assert len(doc["rows"]) == 2 and len(doc["errors"]) == 2
    assert doc["errors"][0]["error"] == "RuntimeError: kernel launch failed"


@pytest.mark.parametrize("mode", kb.MODES)
def test_step_outputs_match_eager(mode):
    """The check the suite runs before timing: the reference backend agrees with the eager composite."""
    case = kb.KernelCase("batch_norm_add_relu", mode, 2, 16, 3, 5, "bf16")
    inp = kb.make_inputs(case, CPU, n_sets=2)
    assert inp.xs[0].is_contiguous(memory_format=torch.channels_last) and inp.n_sets == 2
    refs = kb.reference_outputs(case, inp)
    out = kb.make_step(kb.make_forward("resfused-reference"), case, inp)(0)
    assert _gate.check_kernel(out, *refs) <= 1
    if mode == "train_fwd_bwd":
        assert len(out) == 4  # x, z, weight, bias


# ---------------------------------------------------------------------------------------------------
# fused-conv kernel suite
# ---------------------------------------------------------------------------------------------------

def _conv_case(dtype="fp32", n=2, **geometry):
    base = dict(layer="t", c_in=8, h=6, w=6, c_out=4, k=3)
    return kc.ConvCase(kc.ConvGeometry(**{**base, **geometry}), n, dtype)


@pytest.mark.parametrize("geometry,dtype,flops,nbytes", [
    # 3x3/1 pad 1, 2x8x6x6 -> 2x4x6x6: x, w, bias, y
    (dict(), "fp32", 2 * 2 * 36 * 4 * 8 * 9, 4 * (2 * 8 * 36 + 4 * 8 * 9 + 4 + 2 * 4 * 36)),
    # 3x3/2 -> 3x3 output: every input row and column is still read; bf16 halves the bytes
    (dict(stride=2), "bf16", 2 * 2 * 9 * 4 * 8 * 9, 2 * (2 * 8 * 36 + 4 * 8 * 9 + 4 + 2 * 4 * 9)),
    # 1x1 expand + residual: z read once more
    (dict(k=1, residual=True), "fp16", 2 * 2 * 36 * 4 * 8, 2 * (2 * 8 * 36 + 4 * 8 + 4 + 2 * 2 * 4 * 36)),
    # 1x1 + projection shortcut 1x1/2 from 2x6x12x12: only every other row and column of its input is read,
    # its output stays on chip (no write, no read), its weight is read
    (dict(k=1, shortcut=(6, 12, 12, 2)), "fp32", 2 * 2 * 36 * 4 * 8 + 2 * 2 * 36 * 4 * 6,
     4 * (2 * 8 * 36 + 4 * 8 + 4 + 2 * 4 * 36 + 2 * 6 * 36 + 4 * 6)),
    # 1x1/2 on an odd size: 7 -> 4 positions used
    (dict(k=1, stride=2, h=7, w=7), "fp32", 2 * 2 * 16 * 4 * 8, 4 * (2 * 8 * 16 + 4 * 8 + 4 + 2 * 4 * 16)),
])
def test_conv_flop_and_bytes_models(geometry, dtype, flops, nbytes):
    case = _conv_case(dtype, **geometry)
    assert kc.flops(case) == flops
    assert kc.min_bytes(case) == nbytes


def test_conv_shapes_are_resnet50s():
    """Every geometry is a conv of torchvision's ResNet-50 at 224x224 with that input size, kernel, stride and
    channels; residual and shortcut flags match the block (traced on the meta device: no compute)."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet50()
    seen = {}

    def record(name):
        def hook(mod, args, out):
            seen[name] = tuple(args[0].shape)
        return hook

    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torchvision.models.resnet.Bottleneck)):
            m.register_forward_hook(record(name))
    with torch.no_grad():
        model(torch.empty(1, 3, 224, 224, device="meta"))
    modules = dict(model.named_modules())
    assert len(kc.RESNET50_CONVS) == 19 and len(kc.LAYERS) == 19
    for g in kc.RESNET50_CONVS:
        conv = modules[g.layer]
        assert seen[g.layer] == (1, g.c_in, g.h, g.w), g.layer
        assert (conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (
            g.c_out, (g.k, g.k), (g.stride, g.stride), (g.padding, g.padding)), g.layer
        block_name = g.layer.rsplit(".", 1)[0]
        block = modules[block_name]
        is_last = g.layer.endswith("conv3")
        assert g.residual == (is_last and block.downsample is None), g.layer
        if g.shortcut is not None:
            ds = block.downsample[0]
            assert is_last and (ds.in_channels, ds.stride[0]) == (g.shortcut[0], g.shortcut[3])
            assert seen[block_name][1:] == g.shortcut[:3]
    for i in (1, 2, 3, 4):
        ops = {g.op for g in kc.RESNET50_CONVS if g.layer.startswith(f"layer{i}.")}
        assert ops == set(kc.CONV_OPS)
        assert any(g.k == 3 and g.stride == 2 for g in kc.RESNET50_CONVS if g.layer.startswith(f"layer{i}.")) == (i > 1)


def test_conv_cases_full_and_quick():
    full = kc.conv_cases(**kc.SELECTIONS[(True, False)])
    assert len(full) == 19 * 3 and {c.n for c in full} == {256}
    assert {(c.dtype, c.layout) for c in full} == {("bf16", "channels_last"), ("fp16", "channels_last"),
                                                   ("fp32", "nchw")}
    quick = kc.conv_cases(**kc.SELECTIONS[(True, True)])
    assert set(quick) < set(full) and {c.dtype for c in quick} == {"bf16"} and len(quick) <= 4
    assert {c.op for c in quick} == set(kc.CONV_OPS)                   # every op, in a few shapes
    assert {c.n for c in kc.conv_cases(**kc.SELECTIONS[(False, True)])} == {2}
    with pytest.raises(ValueError, match="unknown conv layer"):
        kc.conv_cases(["layer5.0.conv1"], ["bf16"], 2)
    case = kc.ConvCase(kc.LAYERS["layer2.0.conv3"], 256, "bf16")
    assert case.shape_str == "256x128x28x28-k1s1-c512+sc256x56x56s2"
    assert case.id == "conv_bias_shortcut_add_relu-layer2.0.conv3-256x128x28x28-k1s1-c512+sc256x56x56s2-bf16-channels_last"


def _tiny_conv_cases():
    return [_conv_case("fp32"), _conv_case("bf16", stride=2), _conv_case("fp32", k=1, residual=True),
            _conv_case("bf16", k=1, c_in=4, h=3, w=3, c_out=8, shortcut=(6, 6, 6, 2))]


def test_conv_suite_rows_skips_and_speedups(one_thread):
    cases = _tiny_conv_cases()
    doc = _doc(copy_bw=4.0)
    timer = _harness.FakeTimer(ms=lambda key: 2.0 if key[1] == "eager" else 1.0)
    kc.run_conv_suite(doc, cases, kc.CPU_IMPLS, CPU, timer, show_progress=False)
    assert doc["errors"] == []
    assert [(r["layer"], r["impl"]) for r in doc["rows"]] == [("t", i) for _ in cases
                                                              for i in ("eager", "resfused-reference")]
    skipped = {s["impl"]: s for s in doc["skipped"]}
    assert set(skipped) == {"cudnn-fused", "compile", "resfused-cuda", "resfused-triton"}
    assert all(s["cases"] == len(cases) and s["reason"] for s in skipped.values())
    assert "cudnn_convolution_add_relu" in skipped["cudnn-fused"]["reason"]
    _harness.add_derived(doc)
    assert _harness.validate(doc) == []
    for r, case in zip(doc["rows"], [c for c in cases for _ in range(2)]):
        assert (r["op"], r["shape"], r["dtype"], r["layout"]) == (case.op, case.shape_str, case.dtype, case.layout)
        assert r["flops"] == kc.flops(case) and r["bytes"] == kc.min_bytes(case)
        assert r["TFLOPS"] == pytest.approx(r["flops"] / (r["p50_ms"] * 1e-3) / 1e12)
        assert r["GBps"] == pytest.approx(r["bytes"] / (r["p50_ms"] * 1e-3) / 1e9)
        assert r["speedup_vs_eager"] == pytest.approx(1.0 if r["impl"] == "eager" else 2.0)
        assert r["speedup_vs_cudnn_fused"] is None                      # no cudnn-fused row on CPU
    bad = dict(doc, rows=[{k: v for k, v in doc["rows"][0].items() if k != "TFLOPS"}])
    assert _schema.validate(bad) == ["row 0: a fused-conv kernel row (conv_bias_relu) needs TFLOPS"]


@pytest.mark.parametrize("case", _tiny_conv_cases(), ids=lambda c: c.op + "-" + c.dtype)
def test_conv_impls_agree_with_eager(case):
    """eager (conv, then bias / shortcut / residual / ReLU), the reference backend, and the cudnn-fused
    wrapper with torch.cudnn_convolution_*_relu replaced by what those ops compute, called with the
    argument order of their real schemas."""
    schemas = {op: [a.name for a in torch._C._jit_get_schemas_for_operator(f"aten::{op}")[-1].arguments]
               for op in ("cudnn_convolution_add_relu", "cudnn_convolution_relu")}
    assert schemas == {"cudnn_convolution_add_relu": ["self", "weight", "z", "alpha", "bias", "stride", "padding",
                                                      "dilation", "groups"],
                       "cudnn_convolution_relu": ["self", "weight", "bias", "stride", "padding", "dilation",
                                                  "groups"]}

    def add_relu(x, weight, z, alpha, bias, stride, padding, dilation, groups):
        y = torch.nn.functional.conv2d(x.float(), weight.float(), bias.float(), stride, padding, dilation, groups)
        return torch.relu(y + alpha * z.float()).to(x.dtype)

    def relu(x, weight, bias, stride, padding, dilation, groups):
        return add_relu(x, weight, torch.zeros((), dtype=x.dtype), 0.0, bias, stride, padding, dilation, groups)

    inp = kc.make_inputs(case, CPU, n_sets=2)
    assert inp.xs[0].is_contiguous(memory_format=case.memory_format)
    ref64, eager = kc.reference_outputs(case, inp)
    assert eager.shape == case.out_shape and eager.dtype == case.torch_dtype and ref64.dtype == torch.float64
    out = kc.make_step(kc.make_forward("resfused-reference"), case, inp)(0)
    assert _gate.check_kernel(out, ref64, eager) <= 1
    mp = pytest.MonkeyPatch()
    mp.setattr(torch, "cudnn_convolution_add_relu", add_relu)
    mp.setattr(torch, "cudnn_convolution_relu", relu)
    try:
        fused = kc.make_step(kc.make_forward("cudnn-fused"), case, inp)(0)
    finally:
        mp.undo()
    assert _gate.check_kernel(fused, ref64, eager) <= 1


def test_conv_suite_refuses_to_time_a_wrong_result(monkeypatch):
    real = kc.make_forward

    def drops_the_residual(impl):
        f = real(impl)
        if impl != "resfused-reference":
            return f
        return lambda x, w, b, residual, *rest: f(x, w, b, None, *rest)

    monkeypatch.setattr(kc, "make_forward", drops_the_residual)
    doc, timer = _doc(), _harness.FakeTimer()
    case = _conv_case("fp32", k=1, residual=True)
    kc.run_conv_suite(doc, [case], ["eager", "resfused-reference"], CPU, timer, show_progress=False)
    assert [r["impl"] for r in doc["rows"]] == ["eager"]
    (err,) = doc["errors"]
    assert err["impl"] == "resfused-reference" and "against float64" in err["error"] and err["layer"] == "t"
    assert [k[1] for k in timer.keys] == ["eager"]


def test_cudnn_fused_without_an_engine_is_skipped_other_errors_are_not(monkeypatch):
    """On a GPU, cuDNN may have no fused engine for a dtype/layout: listed as not run with cuDNN's message.
    Any other exception from the same call is an error."""
    case = _conv_case("fp32")
    no_engine = RuntimeError("GET was unable to find an engine to execute this computation")
    assert "fp32 nchw" in kc.cudnn_fused_skip_reason(case, no_engine)
    assert "unable to find an engine" in kc.cudnn_fused_skip_reason(case, no_engine)
    assert kc.cudnn_fused_skip_reason(case, RuntimeError("Expected 4-dimensional input")) is None
    assert kc.cudnn_fused_skip_reason(case, TypeError("cudnn_convolution_relu() missing bias")) is None

    real_reason, real_forward = kc.impl_unavailable_reason, kc.make_forward
    raised = []

    def failing(*args):
        raise raised[-1]

    monkeypatch.setattr(kc, "impl_unavailable_reason",
                        lambda impl, *a: None if impl == "cudnn-fused" else real_reason(impl, *a))
    monkeypatch.setattr(kc, "make_forward", lambda impl: failing if impl == "cudnn-fused" else real_forward(impl))
    for exc in (no_engine, RuntimeError("illegal memory access")):
        raised.append(exc)
        doc = _doc()
        kc.run_conv_suite(doc, [case, _conv_case("fp32", k=1)], ["eager", "cudnn-fused"], CPU, _harness.FakeTimer(),
                          show_progress=False)
        assert [r["impl"] for r in doc["rows"]] == ["eager", "eager"]
        if exc is no_engine:
            assert doc["errors"] == [] and [(s["impl"], s["cases"]) for s in doc["skipped"]] == [("cudnn-fused", 2)]
        else:
            assert doc["skipped"] == [] and len(doc["errors"]) == 2
            assert doc["errors"][0]["error"] == "RuntimeError: illegal memory access"


# ---------------------------------------------------------------------------------------------------
# model suite
# ---------------------------------------------------------------------------------------------------

def test_model_registry_and_quick_selection():
    names = {(i.name, i.mode) for i in mb.MODEL_IMPLS}
    assert {("eager", "train"), ("resfused", "train"), ("compile", "train"), ("resfused-compile", "train"),
            ("eager", "infer"), ("resfused", "infer"), ("compile", "infer"), ("compile-max-autotune", "infer"),
            ("resfused-fused-cuda", "infer"), ("resfused-fused-triton", "infer"),
            ("resfused-convbn-triton", "train"), ("resfused-convbn-cuda", "train"),
            ("resfused-convbn-compile", "train"), ("resfused-convbn-recompute", "train")} <= names
    by_name = {(i.name, i.mode): i for i in mb.MODEL_IMPLS}
    assert by_name[("compile-max-autotune", "infer")].compile_label == ("inductor, fullgraph=True, freezing, "
                                                                        "mode=max-autotune")
    assert by_name[("compile", "infer")].compile_label == "inductor, fullgraph=True, freezing, mode=default"
    assert by_name[("compile", "train")].compile_label == "inductor, fullgraph=True, mode=default"
    for backend in ("cuda", "triton"):
        fused = by_name[(f"resfused-fused-{backend}", "infer")]
        assert fused.backend == backend and fused.cast_params and not fused.compile
        convbn = by_name[(f"resfused-convbn-{backend}", "train")]
        assert convbn.backend == backend and not convbn.cast_params and not convbn.compile
    assert by_name[("resfused-convbn-compile", "train")].compile
    chosen, left_out = mb.select_impls(None, ("train", "infer"), quick=True)
    # --quick: no training compiles and no max-autotune; the one compile it keeps is the default-mode inference one
    assert [(i.name, i.mode, i.compile_mode) for i in chosen if i.compile] == [("compile", "infer", None)]
    assert {("resfused-fused-cuda", "infer"), ("resfused-fused-triton", "infer")} <= {(i.name, i.mode) for i in chosen}
    assert {(i.name, i.mode) for i, _ in left_out} == {("compile", "train"), ("resfused-compile", "train"),
                                                       ("resfused-convbn-compile", "train"),
                                                       ("compile-max-autotune", "infer")}
    reason = next(r for i, r in left_out if i.name == "compile-max-autotune")
    assert "max-autotune" in reason and "mode=default" in reason
    chosen, _ = mb.select_impls(["resfused"], ("infer",), quick=False)
    assert [(i.name, i.mode) for i in chosen] == [("resfused", "infer")]


def test_model_suite_on_cpu_with_an_added_impl(monkeypatch, one_thread):
    """resfused rows (train and infer), compile rows skipped with a reason, and a new implementation is
    one MODEL_IMPLS entry. (Eager rows: test_run_py_without_gpu_exits_0.)"""
    monkeypatch.setattr(mb, "MODEL_IMPLS", mb.MODEL_IMPLS + [mb.ModelImpl("eval-twice", "infer", lambda m: m)])
    impls, _ = mb.select_impls(["resfused", "compile", "resfused-compile", "eval-twice"], ("train", "infer"),
                               quick=False)
    cfg = mb.ModelConfig(model="resnet18", batch=2, image_size=32, dtype="fp32", num_classes=10)
    doc = _doc()
    mb.run_model_suite(doc, [cfg], impls, CPU, _harness.FakeTimer(ms=lambda key: 4.0), show_progress=False,
                       warmup_steps=1)
    assert doc["errors"] == []
    got = {(r["impl"], r["mode"]) for r in doc["rows"]}
    assert got == {("resfused", "train"), ("resfused", "infer"), ("eval-twice", "infer")}
    assert {s["impl"] for s in doc["skipped"]} == {"compile", "resfused-compile"}
    assert _harness.validate(doc) == []
    for r in doc["rows"]:
        assert r["images_per_s"] == pytest.approx(2 / 4e-3)
        assert (r["suite"], r["op"], r["shape"], r["dtype"], r["layout"]) == ("model", "resnet18", "2x3x32x32", "fp32",
                                                                                 "nchw")
        assert "peak_mem_MiB" not in r  # CPU: no allocator statistics
        assert r.get("backend") == ("native" if r["impl"] == "resfused" else None)  # auto's CPU fast path


def test_conversion_check_catches_a_wrong_conversion(monkeypatch, one_thread):
    """(That it passes on the real conversion: test_run_py_without_gpu_exits_0.)"""
    import resfused.reference.bn_add_relu as ref
    real = ref.forward_eval
    monkeypatch.setattr(ref, "forward_eval", lambda x, *a: (lambda y, m: (y * 1.01, m))(*real(x, *a)))
    bad = mb.conversion_check(model_name="resnet18", batch=2, image_size=32)
    assert not bad["passed"] and bad["max_norm_rel_error"]["eval_output_fp32"] > 1e-3
    assert bad["blocks_converted"] == 8 and bad["blocks_left"] == 0


def test_model_suite_checks_logits_before_timing(monkeypatch, one_thread):
    """A fused bf16 model (folded in fp32, parameters cast) passes the check against stock autocast; an
    implementation with wrong logits is an error and is not timed."""

    class Scaled(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x) * 1.5

    broken = mb.ModelImpl("broken", "infer", Scaled)
    monkeypatch.setattr(mb, "MODEL_IMPLS", mb.MODEL_IMPLS + [broken])
    impls, _ = mb.select_impls(["resfused-fused-reference", "broken"], ("infer",), quick=True)
    cfg = mb.ModelConfig(model="resnet18", batch=2, image_size=32, dtype="bf16", num_classes=10)
    doc, timer = _doc(), _harness.FakeTimer(ms=4.0)
    mb.run_model_suite(doc, [cfg], impls, CPU, timer, show_progress=False, warmup_steps=1)
    (row,) = doc["rows"]
    assert (row["impl"], row["backend"], row["param_dtype"], row["dtype"]) == (
        "resfused-fused-reference", "reference", "bfloat16", "bf16-autocast")
    assert 0 < row["gate"] <= 1 and "no autocast" in row["path"]
    (err,) = doc["errors"]
    assert err["impl"] == "broken" and "against the float64 stock model" in err["error"]
    assert [k[1].name for k in timer.keys] == ["resfused-fused-reference"]


def test_inference_compile_sets_freezing_and_mode_and_restores_them(monkeypatch, one_thread):
    """compile-max-autotune compiles with mode="max-autotune" while torch._inductor.config.freezing is True,
    and the row says so; freezing is back to its old value afterwards. (torch.compile itself is faked: this
    is the suite's plumbing, on CPU.)"""
    import dataclasses

    import torch._inductor.config as inductor_config

    seen = []

    def fake_compile(model, mode=None, **kwargs):
        def run(*args):
            seen.append((mode, inductor_config.freezing))
            return model(*args)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    impls = [dataclasses.replace(i, unavailable=lambda device: None)
             for i in mb.select_impls(["compile", "compile-max-autotune"], ("infer",), quick=False)[0]]
    assert [i.name for i in impls] == ["compile", "compile-max-autotune"]
    before = inductor_config.freezing
    cfg = mb.ModelConfig(model="resnet18", batch=2, image_size=32, dtype="fp32", num_classes=10)
    doc = _doc()
    mb.run_model_suite(doc, [cfg], impls, CPU, _harness.FakeTimer(), show_progress=False, warmup_steps=1)
    assert doc["errors"] == [] and inductor_config.freezing == before
    assert {m for m, _ in seen} == {None, "max-autotune"} and all(f for _, f in seen)
    assert [(r["impl"], r["compile"]) for r in doc["rows"]] == [
        ("compile", "inductor, fullgraph=True, freezing, mode=default"),
        ("compile-max-autotune", "inductor, fullgraph=True, freezing, mode=max-autotune")]


# ---------------------------------------------------------------------------------------------------
# schema and report
# ---------------------------------------------------------------------------------------------------

def _row(**kw):
    base = {"suite": "kernel", "op": "batch_norm_add_relu", "mode": "train_fwd", "impl": "eager",
            "shape": "256x64x56x56", "dtype": "bf16", "layout": "channels_last", "p20_ms": 0.9, "p50_ms": 1.0,
            "p80_ms": 1.2, "GBps": 100.0, "bytes": 10**8}
    return {**base, **kw}


def _gpu_like_doc():
    doc = {"device": "NVIDIA H100 80GB HBM3 (sm_90)", "device_type": "cuda", "torch": "2.11.0", "triton": "3.6.0",
           "cuda": "13.0", "cudnn": 91000, "git_sha": "0123abc", "git_dirty": False,
           "timestamp": "2026-01-02T03:04:05Z", "copy_bandwidth_GBps": 3000.0, "notes": [], "rows": [],
           "skipped": [{"suite": "kernel", "impl": "resfused-cuda", "reason": "resfused._C is not importable", "cases": 4}],
           "errors": [{"suite": "kernel", "op": "batch_norm_add_relu", "mode": "eval_fwd", "impl": "compile",
                       "shape": "256x64x56x56", "dtype": "fp32", "error": "RuntimeError: boom | pipe"}],
           "checks": [], "timer": {"kernel": "fake"}, "bytes_model": kb.BYTES_MODEL}
    for mode in ("train_fwd", "train_fwd_bwd"):
        for shape in ("256x64x56x56", "256x2048x7x7"):
            for dtype, layout in (("bf16", "channels_last"), ("fp32", "nchw")):
                for impl, ms in (("eager", 2.0), ("compile", 1.6), ("resfused-triton", 1.0)):
                    doc["rows"].append(_row(mode=mode, shape=shape, dtype=dtype, layout=layout, impl=impl,
                                            p20_ms=0.9 * ms, p50_ms=ms, p80_ms=1.1 * ms, GBps=2000.0 / ms))
    for mode, impl, ips in (("train", "eager", 2500.0), ("train", "resfused", 2800.0), ("infer", "eager", 8000.0)):
        doc["rows"].append({"suite": "model", "op": "resnet50", "mode": mode, "impl": impl, "shape": "256x3x224x224",
                            "dtype": "bf16-autocast", "layout": "channels_last", "p20_ms": 256e3 / ips * 0.99,
                            "p50_ms": 256e3 / ips, "p80_ms": 256e3 / ips * 1.01, "images_per_s": ips,
                            "peak_mem_MiB": 20480.0, **({"backend": "cuda"} if impl == "resfused" else {})})
    _harness.add_derived(doc)
    return doc


def test_validate_reports_schema_problems():
    doc = _gpu_like_doc()
    assert _schema.validate(doc) == []
    assert "missing top-level key 'copy_bandwidth_GBps'" in _schema.validate(
        {k: v for k, v in doc.items() if k != "copy_bandwidth_GBps"})
    bad = dict(doc, rows=[_row(p20_ms=2.0), {k: v for k, v in _row().items() if k != "p50_ms"},
                          {k: v for k, v in _row().items() if k != "GBps"},
                          _row(suite="model", op="resnet50"), _row(suite="other")])
    problems = "\n".join(_schema.validate(bad))
    for text in ("row 0: expected p20 <= p50 <= p80", "row 1 misses ['p50_ms']", "row 2: a kernel row needs GBps",
                 "row 3: a model row needs images_per_s", "row 4: suite 'other'"):
        assert text in problems
    with pytest.raises(ValueError, match="schema"):
        _schema.write_result(bad, Path("/nonexistent/never-written.json"))


def test_report_markdown_and_plots(tmp_path):
    doc = _gpu_like_doc()
    path = _schema.write_result(doc, tmp_path / "run.json")
    assert json.loads(path.read_text())["rows"][0]["speedup_vs_eager"] == 1.0
    written = report.write_report(path)
    md_path, *pngs = written
    assert md_path == tmp_path / "run.md"
    assert sorted(p.name for p in pngs) == ["run-copy-bw.png", "run-speedup.png"]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    md = md_path.read_text()
    assert "do not edit by hand" in md and "`run.json`" in md
    assert "NVIDIA H100 80GB HBM3" in md and "3000.0 GB/s" in md and "`0123abc`" in md
    assert "| train_fwd | 1.00x (4) | 1.25x (4) | 2.00x (4) |" in md      # geometric means by mode
    assert "1 ms [0.9–1.1], 2000 GB/s (67%), **2.00x**" in md             # a resfused cell
    assert "resfused._C is not importable" in md                        # not-run list with the reason
    assert "RuntimeError: boom \\| pipe" in md                           # errors, table-safe
    assert "| resnet50 | train | bf16-autocast | channels_last | 256x3x224x224 | resfused | cuda | 2800 |" in md
    assert "20480 | 1.12x |" in md
    assert "Minimum-bytes model" in md and "![run-speedup](run-speedup.png)" in md
    assert report.markdown(_schema.load_result(path), "run.json", tuple(pngs)) == md  # only a function of the JSON


def test_report_cli(tmp_path, capsys):
    path = _schema.write_result(_gpu_like_doc(), tmp_path / "a.json")
    out = tmp_path / "out"
    assert report.main([str(path), "--out", str(out)]) == 0
    assert (out / "a.md").exists() and (out / "a-speedup.png").exists()
    (tmp_path / "junk.json").write_text("{}")
    assert report.main([str(tmp_path / "junk.json")]) == 1
    assert "not a benchmark result" in capsys.readouterr().err


def test_cpu_report_is_labelled(tmp_path):
    doc = _doc()
    doc["notes"].append(_schema.CPU_NOTE)
    doc["rows"].append(_row(shape="2x64x8x8", dtype="fp32", layout="nchw"))
    _harness.add_derived(doc)
    md = report.markdown(doc)
    assert md.index("CPU run (no CUDA device)") < md.index("## Kernels")


def _conv_doc():
    """A GPU-like result with only fused-conv kernel rows and fused-model rows."""
    doc = _gpu_like_doc()
    doc["rows"] = [r for r in doc["rows"] if r["suite"] == "model"]
    doc["conv_model"] = kc.CONV_MODEL
    for layer in ("layer1.1.conv2", "layer2.0.conv3"):
        case = kc.ConvCase(kc.LAYERS[layer], 256, "bf16")
        for impl, ms in (("eager", 2.0), ("cudnn-fused", 1.6), ("compile", 1.8), ("resfused-triton", 0.8)):
            doc["rows"].append({**case.row_fields(), "impl": impl, "p20_ms": 0.9 * ms, "p50_ms": ms, "p80_ms": 1.1 * ms,
                                "GBps": kc.min_bytes(case) / (ms * 1e-3) / 1e9, "bytes": kc.min_bytes(case),
                                "TFLOPS": kc.flops(case) / (ms * 1e-3) / 1e12, "flops": kc.flops(case)})
    for impl, ips, extra in (("eager", 8000.0, {"param_dtype": "bfloat16"}),  # the fused rows' baseline: same regime
                             ("resfused-fused-cuda", 9600.0, {"backend": "cuda", "param_dtype": "bfloat16"}),
                             ("compile-max-autotune", 8800.0, {"compile": "inductor, freezing, mode=max-autotune"})):
        doc["rows"].append({"suite": "model", "op": "resnet50", "mode": "infer", "impl": impl, "shape": "256x3x224x224",
                            "dtype": "bf16-autocast", "layout": "channels_last", "p20_ms": 256e3 / ips * 0.99,
                            "p50_ms": 256e3 / ips, "p80_ms": 256e3 / ips * 1.01, "images_per_s": ips, **extra})
    _harness.add_derived(doc)
    return doc


def test_report_conv_section_and_plot(tmp_path):
    doc = _conv_doc()
    path = _schema.write_result(doc, tmp_path / "run.json")
    md_path, *pngs = report.write_report(path)
    assert [p.name for p in pngs] == ["run-conv-speedup.png"]              # no BN kernel rows: no BN plots
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pngs[0].stat().st_size > 5000
    md = md_path.read_text()
    assert "## Fused conv (conv_bias_act)" in md and "## Kernels" not in md and "## Bytes model" not in md
    assert "| bf16 | channels_last | 1.00x / 0.80x (2) | 1.25x / 1.00x (2) | 1.11x / 0.89x (2) | 2.50x / 2.00x (2) |" in md
    assert "### conv_bias_relu, eval_fwd" in md and "### conv_bias_shortcut_add_relu, eval_fwd" in md
    assert "| layer2.0.conv3 | bf16 | channels_last | 256x128x28x28-k1s1-c512+sc256x56x56s2 | 78.9 | 360.1 |" in md
    tflops = kc.flops(kc.ConvCase(kc.LAYERS["layer1.1.conv2"], 256, "bf16")) / 0.8e-3 / 1e12
    assert f"0.8 ms [0.72–0.88], {tflops:.0f} TFLOP/s" in md and "**2.50x / 2.00x**" in md
    assert "![run-conv-speedup](run-conv-speedup.png)" in md
    assert "## Fused conv: FLOP and bytes model" in md and "FLOP model (TFLOPS = flops / median time)" in md
    assert "| resfused-fused-cuda (bfloat16 parameters) | cuda | 9600 |" in md
    assert "| compile-max-autotune (inductor, freezing, mode=max-autotune) |  | 8800 |" in md
    assert "1.20x |" in md                                                  # 9600 / 8000 images/s vs eager


def test_conv_rows_stay_out_of_the_bn_sections(tmp_path):
    doc = _gpu_like_doc()
    doc["rows"] += [r for r in _conv_doc()["rows"] if r["suite"] == "kernel"]
    _harness.add_derived(doc)
    path = _schema.write_result(doc, tmp_path / "both.json")
    md_path, *pngs = report.write_report(path)
    assert sorted(p.name for p in pngs) == ["both-conv-speedup.png", "both-copy-bw.png", "both-speedup.png"]
    md = md_path.read_text()
    kernels = md[md.index("## Kernels"):md.index("## Model")]
    assert "conv_bias" not in kernels and "cudnn-fused" not in kernels
    assert "| train_fwd | 1.00x (4) | 1.25x (4) | 2.00x (4) |" in kernels
    from bench import run
    summary = run._summary(doc, [])
    assert "conv kernel suite" in summary and "TFLOP/s" in summary


# ---------------------------------------------------------------------------------------------------
# the entry points, as subprocesses
# ---------------------------------------------------------------------------------------------------

def test_run_py_without_gpu_exits_0(tmp_path):
    """`make bench` on a machine without a GPU: banner first, conversion check, CPU timings, JSON + report."""
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--cpu", "--quick", "--out", str(tmp_path),
           "--shapes", "16x8x8", "--model", "resnet18", "--model-batch", "2", "--image-size", "32",
           "--model-modes", "infer", "--check-model", "resnet18", "--no-progress",
           "--no-cpu-rows"]  # bench_cpu's ResNet-50 rows: tests/test_bench_cpu.py
    proc = subprocess.run(cmd, cwd=ROOT, env=NO_GPU_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("=====") and lines[1].startswith("NO CUDA GPU ON THIS MACHINE")
    (json_path,) = tmp_path.glob("*.json")
    doc = _schema.load_result(json_path)
    assert doc["device_type"] == "cpu" and _schema.CPU_NOTE in doc["notes"]
    (check,) = doc["checks"]
    assert check["passed"] and check["name"] == "convert(resnet18) vs stock" and check["backend"] == "reference"
    assert check["blocks_converted"] == 8 and check["blocks_left"] == 0
    kernel = [r for r in doc["rows"] if r["suite"] == "kernel" and r["op"] not in _schema.CONV_OPS]
    assert {r["impl"] for r in kernel} == {"eager", "resfused-reference"} and len(kernel) == 2 * 3
    conv = [r for r in doc["rows"] if r["suite"] == "kernel" and r["op"] in _schema.CONV_OPS]
    assert {r["impl"] for r in conv} == {"eager", "resfused-reference"}
    assert sorted(r["layer"] for r in conv) == sorted(2 * kc.QUICK_LAYERS)
    assert all(r["dtype"] == "fp32" and r["shape"].startswith("2x") and r["TFLOPS"] > 0 for r in conv)
    assert doc["conv_model"] == kc.CONV_MODEL and doc["conv_selection"]["layers"] == list(kc.QUICK_LAYERS)
    model = [r for r in doc["rows"] if r["suite"] == "model"]
    assert {r["impl"] for r in model} == {"eager", "resfused", "resfused-fused-reference"}
    assert all(0 <= r["gate"] <= 1 for r in model if r["mode"] == "infer")
    assert {s["impl"] for s in doc["skipped"]} >= {"compile", "resfused-cuda", "resfused-triton", "cudnn-fused",
                                                   "resfused-fused-cuda", "resfused-fused-triton"}
    assert doc["errors"] == [] and math.isfinite(doc["copy_bandwidth_GBps"])
    stem = json_path.stem
    assert (tmp_path / f"{stem}.md").exists() and (tmp_path / f"{stem}-speedup.png").exists()
    assert (tmp_path / f"{stem}-conv-speedup.png").exists()
    assert "## Fused conv (conv_bias_act)" in (tmp_path / f"{stem}.md").read_text()


def test_run_py_rejects_bad_selections(capsys):
    from bench import run

    assert run.main(["--cpu", "--suite", "kernel", "--shapes", "64x56"]) == 2
    assert "CxHxW" in capsys.readouterr().err
    assert run.main(["--cpu", "--impls", "eager", "cudnn"]) == 2
    assert "unknown implementation(s) ['cudnn']" in capsys.readouterr().err
    assert run.main(["--cpu", "--suite", "conv", "--conv-layers", "layer1.1.conv2", "layer9.0.conv1"]) == 2
    assert "unknown conv layer(s) ['layer9.0.conv1']" in capsys.readouterr().err
    assert run.main(["--cpu", "--suite", "conv", "--conv-dtypes", "fp64"]) == 2
    assert "unknown dtype 'fp64'" in capsys.readouterr().err


def test_run_py_keeps_partial_results_when_terminated(tmp_path, monkeypatch):
    """`timeout` sends SIGTERM: the rows measured so far are written, and the run fails."""
    from bench import run

    def suite_then_sigterm(doc, *args, **kwargs):
        doc["rows"].append({**kb.KernelCase("batch_norm", "eval_fwd", 2, 8, 4, 4, "fp32").row_fields(),
                            "impl": "eager", "p20_ms": 1.0, "p50_ms": 1.0, "p80_ms": 1.0, "GBps": 1.0})
        run._on_sigterm(15, None)

    monkeypatch.setattr(kb, "run_kernel_suite", suite_then_sigterm)
    assert run.main(["--cpu", "--suite", "kernel", "--check-model", "none", "--no-report", "--json",
                     str(tmp_path / "r.json")]) == 1
    doc = _schema.load_result(tmp_path / "r.json")
    assert len(doc["rows"]) == 1 and "interrupted by SIGTERM" in doc["errors"][0]["error"]
    assert any("partial results" in n for n in doc["notes"])


def test_pytest_benchmark_entry_skips_without_gpu():
    cmd = [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", "--benchmark-only",
           "--bench-quick", "-p", "no:xdist"]
    proc = subprocess.run(cmd, cwd=ROOT, env=NO_GPU_ENV, capture_output=True, text=True, timeout=120)
    n = len(kb.kernel_cases(**kb.SELECTIONS[(True, True)])) * len(kb.GPU_IMPLS)
    n += len(kc.conv_cases(**kc.SELECTIONS[(True, True)])) * len(kc.GPU_IMPLS)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"{n} skipped" in proc.stdout


@pytest.mark.parametrize("suite", ["kernel", "conv"])
def test_pytest_benchmark_target_runs_on_cpu(suite, one_thread):
    """The shared pytest-benchmark setup (bench._harness.pytest_benchmark_target), run on CPU with eager:
    the callable steps through the rotated input sets without error."""
    from bench import _harness

    if suite == "kernel":
        module, case = kb, kb.KernelCase("batch_norm_add_relu", "train_fwd_bwd", 2, 8, 4, 4, "fp32")
    else:
        module, case = kc, _conv_case()
    target, n_sets = _harness.pytest_benchmark_target(module, case, "eager", device=torch.device("cpu"))
    assert n_sets >= 1
    for _ in range(n_sets + 1):
        target()


def test_convbn_rows_convert_with_fused_convs():
    """The resfused-convbn rows time convert(fuse_convs=True) blocks with their backend, and are skipped on CPU."""
    from resfused.nn import ConvBNBottleneck
    import torchvision
    model = mb._convert_convs(torchvision.models.resnet50(), backend="reference")
    blocks = [m for m in model.modules() if isinstance(m, ConvBNBottleneck)]
    assert len(blocks) == 16 and all(b.backend == "reference" and not b.recompute for b in blocks)
    recompute = next(i for i in mb.MODEL_IMPLS if i.name == "resfused-convbn-recompute")
    from resfused.nn import ConvBNBasicBlock
    blocks = [m for m in recompute.prepare(torchvision.models.resnet18()).modules()
              if isinstance(m, ConvBNBasicBlock)]
    assert len(blocks) == 8 and all(b.recompute for b in blocks)
    why = mb._conv_bn_unavailable("triton")(torch.device("cpu"))
    assert why is not None and "GPU" in why
