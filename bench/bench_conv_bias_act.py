"""Kernel benchmarks of resfused's fused convolution (resfused.ops.conv_bias_act) against cuDNN and torch.compile.

Ops (the row's op; one fused call each, inference only, mode eval_fwd):
    conv_bias_relu               relu(conv(x) + b)                          1x1 reduce, 3x3 (stride 1 or 2)
    conv_bias_add_relu           relu(conv(x) + b + z)                      1x1 expand + identity residual
    conv_bias_shortcut_add_relu  relu(conv(x) + conv1x1/s(x_sc) + b)        1x1 expand + projection shortcut
Shapes: torchvision ResNet-50's convolutions (v1.5: the stride is on the 3x3) at batch N (256 by default), per
        stage: the 1x1 reduce and the 3x3 of a later block, the first block's stride-2 3x3 (stages 2-4), the
        1x1 expand with the identity residual, and the first block's 1x1 expand with the projection shortcut
        (its 1x1 stride-s conv from the block's input). Rows carry the ResNet module (``layer``) they stand for.
DTypes: bf16 and fp16 channels_last (weights channels_last too, as fuse_for_inference stores them), fp32 NCHW
        (TF32 wherever torch.backends.cudnn.allow_tf32 says so, for every implementation alike). The bias is
        in the activation dtype, as in a fused model.
Implementations:
    eager        F.conv2d without bias (cuDNN, torch.backends.cudnn.benchmark=True), then separate in-place
                 bias add, residual add (the shortcut is a second F.conv2d) and ReLU: a BN-folded model in eager.
    cudnn-fused  torch.cudnn_convolution_add_relu / torch.cudnn_convolution_relu: cuDNN's fused
                 conv-bias-add-ReLU as torch's frozen-graph ConvAddReLU fusion calls it (the shortcut conv is a
                 separate F.conv2d feeding z). cuDNN picks an engine per configuration; where it has none it
                 raises, and the case is listed under "not run" with cuDNN's message.
    compile      the eager function under torch.compile (Inductor's default mode: cuDNN conv + one fused
                 Triton epilogue).
    resfused-cuda, resfused-triton   resfused.ops.conv_bias_act with that backend (resfused-reference on CPU).
    Each non-eager output is compared with eager's before it is timed.

Pytest-benchmark: `pytest bench/ --benchmark-only [--bench-quick] [--bench-batch N] -k conv_bias` runs these
cases (GPU only; they skip without one). See bench/conftest.py.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from . import _harness
from ._schema import CONV_OPS

CONV_MODEL = """\
FLOP model (TFLOPS = flops / median time): 2 * N * Ho * Wo * C_out * (C_in / groups) * KH * KW for the conv,
plus 2 * N * Ho * Wo * C_out * C_sc for a projection shortcut's 1x1 conv. The epilogue (bias, residual,
ReLU: a few operations per output element) is not counted.
Minimum-bytes model (GBps = bytes / median time), s bytes per element (2 for bf16/fp16, 4 for fp32):
  read x          the input elements the conv touches: N * C_in * (rows used) * (columns used); all of
                  them for ResNet's 3x3 and stride-1 1x1 convs, every s-th row and column for a strided 1x1
  read weight     C_out * (C_in / groups) * KH * KW, and the bias C_out
  read z          the residual N * C_out * Ho * Wo, or for a projection shortcut its input's touched
                  elements N * C_sc * Ho * Wo and its weight C_out * C_sc (the shortcut's output stays on chip)
  write y         N * C_out * Ho * Wo
Each tensor moved once: the floor of a fused kernel. Eager moves y three more times each way (bias, add,
ReLU) and writes and reads the shortcut's output; most of these convs are compute-bound, so TFLOPS is the
figure to read and GB/s shows how far a case is from the memory floor."""

OP_DOC = {
    "conv_bias_relu": "relu(conv(x) + b)",
    "conv_bias_add_relu": "relu(conv(x) + b + residual)",
    "conv_bias_shortcut_add_relu": "relu(conv(x) + conv1x1/s(x_sc) + b)",
}
assert tuple(OP_DOC) == CONV_OPS
MODES = ("eval_fwd",)
DTYPES = {"bf16": (torch.bfloat16, "channels_last"), "fp16": (torch.float16, "channels_last"),
          "fp32": (torch.float32, "nchw")}
GPU_IMPLS = ("eager", "cudnn-fused", "compile", "resfused-cuda", "resfused-triton")
CPU_IMPLS = GPU_IMPLS + ("resfused-reference",)


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """One convolution of the network, batch-free: x (C_in, H, W) -> (C_out, Ho, Wo)."""
    layer: str                      # the torchvision module it stands for, e.g. "layer2.0.conv3"
    c_in: int
    h: int
    w: int
    c_out: int
    k: int
    stride: int = 1
    residual: bool = False          # + identity residual (C_out, Ho, Wo)
    shortcut: Optional[tuple[int, int, int, int]] = None  # projection shortcut input (C_sc, H_sc, W_sc) and stride

    @property
    def padding(self) -> int:
        return self.k // 2

    @property
    def op(self) -> str:
        if self.shortcut is not None:
            return "conv_bias_shortcut_add_relu"
        return "conv_bias_add_relu" if self.residual else "conv_bias_relu"


def _resnet50_convs() -> tuple[ConvGeometry, ...]:
    convs = []
    for i, (width, res, c_first) in enumerate(((64, 56, 64), (128, 28, 256), (256, 14, 512), (512, 7, 1024)), 1):
        s = 1 if i == 1 else 2
        c_out = 4 * width
        convs.append(ConvGeometry(f"layer{i}.1.conv1", c_out, res, res, width, 1))
        convs.append(ConvGeometry(f"layer{i}.1.conv2", width, res, res, width, 3))
        if s == 2:
            convs.append(ConvGeometry(f"layer{i}.0.conv2", width, 2 * res, 2 * res, width, 3, stride=2))
        convs.append(ConvGeometry(f"layer{i}.1.conv3", width, res, res, c_out, 1, residual=True))
        convs.append(ConvGeometry(f"layer{i}.0.conv3", width, res, res, c_out, 1,
                                  shortcut=(c_first, s * res, s * res, s)))
    return tuple(convs)


RESNET50_CONVS = _resnet50_convs()
LAYERS = {g.layer: g for g in RESNET50_CONVS}
QUICK_LAYERS = ("layer1.1.conv2", "layer2.0.conv3", "layer3.1.conv3")  # 3x3, projection shortcut, residual

SELECTIONS = {  # (gpu, quick) -> what run.py times by default
    (True, False): dict(layers=tuple(LAYERS), dtypes=tuple(DTYPES), batch=256),
    (True, True): dict(layers=QUICK_LAYERS, dtypes=("bf16",), batch=256),
    (False, False): dict(layers=tuple(LAYERS), dtypes=("fp32",), batch=2),
    (False, True): dict(layers=QUICK_LAYERS, dtypes=("fp32",), batch=2),
}

# What each row's path field says for the implementations that are not resfused backends.
PATHS = {
    "eager": "cuDNN conv, then separate bias add_, shortcut conv / residual add_, relu_",
    "cudnn-fused": "torch.cudnn_convolution_add_relu / cudnn_convolution_relu (cuDNN's fused op)",
    "compile": "inductor, fullgraph=True, dynamic=False, mode=default",
    # The cuda backend's conv_bias_act IS cuDNN's runtime-fusion engine (csrc/conv_bias_act.cu): its row measures
    # what resfused adds on top of cuDNN (argument checks, plan cache), not a kernel of ours.
    "resfused-cuda": "overhead check: cuDNN runtime-fusion graph through resfused._C (csrc/conv_bias_act.cu)",
}


@dataclasses.dataclass(frozen=True)
class ConvCase:
    geometry: ConvGeometry
    n: int
    dtype: str

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r} (one of {list(DTYPES)})")

    @property
    def op(self) -> str:
        return self.geometry.op

    @property
    def mode(self) -> str:
        return "eval_fwd"

    @property
    def layout(self) -> str:
        return DTYPES[self.dtype][1]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.layout == "channels_last" else torch.contiguous_format

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def x_shape(self) -> tuple[int, int, int, int]:
        g = self.geometry
        return (self.n, g.c_in, g.h, g.w)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        g = self.geometry
        return (g.c_out, g.c_in, g.k, g.k)

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        g = self.geometry
        return (self.n, g.c_out, _out_size(g.h, g.k, g.stride, g.padding), _out_size(g.w, g.k, g.stride, g.padding))

    @property
    def shortcut_shape(self) -> Optional[tuple[int, int, int, int]]:
        sc = self.geometry.shortcut
        return None if sc is None else (self.n, sc[0], sc[1], sc[2])

    @property
    def shape_str(self) -> str:
        """e.g. 256x128x28x28-k1s1-c512+sc256x56x56s2: x, kernel and stride, C_out, and the shortcut input."""
        g = self.geometry
        s = f"{'x'.join(map(str, self.x_shape))}-k{g.k}s{g.stride}-c{g.c_out}"
        if g.shortcut is not None:
            s += f"+sc{g.shortcut[0]}x{g.shortcut[1]}x{g.shortcut[2]}s{g.shortcut[3]}"
        return s

    @property
    def id(self) -> str:
        return f"{self.op}-{self.geometry.layer}-{self.shape_str}-{self.dtype}-{self.layout}"

    def row_fields(self) -> dict:
        return {"suite": "kernel", "op": self.op, "mode": self.mode, "shape": self.shape_str, "dtype": self.dtype,
                "layout": self.layout, "layer": self.geometry.layer}


def _out_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - (k - 1) - 1) // stride + 1


def _used(size: int, k: int, stride: int, pad: int) -> int:
    """How many of an axis' ``size`` input positions a conv reads (padding taps read nothing)."""
    out = _out_size(size, k, stride, pad)
    return len({o * stride - pad + i for o in range(out) for i in range(k)} & set(range(size)))


def flops(case: ConvCase) -> int:
    """The FLOP model of CONV_MODEL for one call of ``case``."""
    n, c_out, ho, wo = case.out_shape
    g = case.geometry
    total = 2 * n * ho * wo * c_out * g.c_in * g.k * g.k
    if g.shortcut is not None:
        total += 2 * n * ho * wo * c_out * g.shortcut[0]
    return total


def min_bytes(case: ConvCase) -> int:
    """The minimum-bytes model of CONV_MODEL for one call of ``case``."""
    g, s = case.geometry, case.itemsize
    n, c_out, ho, wo = case.out_shape
    elems = n * g.c_in * _used(g.h, g.k, g.stride, g.padding) * _used(g.w, g.k, g.stride, g.padding)
    elems += g.c_out * g.c_in * g.k * g.k + g.c_out          # weight, bias
    elems += n * c_out * ho * wo                              # y
    if g.residual:
        elems += n * c_out * ho * wo
    if g.shortcut is not None:
        c_sc, h_sc, w_sc, s_sc = g.shortcut
        elems += n * c_sc * _used(h_sc, 1, s_sc, 0) * _used(w_sc, 1, s_sc, 0) + c_out * c_sc
    return elems * s


def shrunk(case: ConvCase, side: int = 4) -> ConvCase:
    """bench/run.py --simulate: the same conv (channels, kernel, stride, residual, shortcut) on at most side x side
    output pixels, so the CPU rehearsal runs in seconds."""
    g = case.geometry
    h, w = min(g.h, side * g.stride), min(g.w, side * g.stride)
    sc = None
    if g.shortcut is not None:
        c_sc, _, _, s = g.shortcut
        sc = (c_sc, s * h, s * w, s)
    return dataclasses.replace(case, geometry=dataclasses.replace(g, h=h, w=w, shortcut=sc))


def conv_cases(layers: Sequence[str], dtypes: Sequence[str], batch: int) -> list[ConvCase]:
    unknown = [name for name in layers if name not in LAYERS]
    if unknown:
        raise ValueError(f"unknown conv layer(s) {unknown}; ResNet-50's: {list(LAYERS)}")
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    return [ConvCase(LAYERS[name], batch, dt) for dt in dtypes for name in layers]


# ---------------------------------------------------------------------------------------------------
# implementations: fn(x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding, shortcut_stride)
# ---------------------------------------------------------------------------------------------------

def eager_conv_bias_act(x, weight, bias, residual, shortcut_x, shortcut_weight, stride: int, padding: int,
                        shortcut_stride: int):
    """cuDNN conv, then separate in-place bias add, shortcut conv / residual add, ReLU."""
    y = F.conv2d(x, weight, None, stride, padding)
    y = y.add_(bias.view(1, -1, 1, 1))
    if shortcut_x is not None:
        y = y.add_(F.conv2d(shortcut_x, shortcut_weight, None, shortcut_stride))
    if residual is not None:
        y = y.add_(residual)
    return torch.relu_(y)


def cudnn_fused_conv_bias_act(x, weight, bias, residual, shortcut_x, shortcut_weight, stride: int, padding: int,
                              shortcut_stride: int):
    """torch.cudnn_convolution_add_relu(x, w, z, alpha=1, bias) or torch.cudnn_convolution_relu(x, w, bias)."""
    z = residual
    if shortcut_x is not None:
        z = F.conv2d(shortcut_x, shortcut_weight, None, shortcut_stride)
        if residual is not None:
            z = z.add_(residual)
    st, pad, dil = [stride, stride], [padding, padding], [1, 1]
    if z is None:
        return torch.cudnn_convolution_relu(x, weight, bias, st, pad, dil, 1)
    return torch.cudnn_convolution_add_relu(x, weight, z, 1.0, bias, st, pad, dil, 1)


def _resfused_conv_bias_act(x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding, shortcut_stride,
                            *, backend):
    from resfused.ops.conv_bias_act import conv_bias_act
    return conv_bias_act(x, weight, bias, residual, stride=stride, padding=padding, shortcut_x=shortcut_x,
                         shortcut_weight=shortcut_weight, shortcut_stride=shortcut_stride, relu=True, backend=backend)


def impl_unavailable_reason(impl: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None when ``impl`` can run on (device, dtype), else why not (recorded in the result's "skipped")."""
    if impl == "eager":
        return None
    if impl == "compile":
        if device.type != "cuda":
            return "CPU run: torch.compile is timed on a GPU only (Inductor's CPU compile takes minutes here)"
        return None
    if impl == "cudnn-fused":
        if not (hasattr(torch, "cudnn_convolution_add_relu") and hasattr(torch, "cudnn_convolution_relu")):
            return f"torch {torch.__version__} has no torch.cudnn_convolution_add_relu / cudnn_convolution_relu"
        if device.type != "cuda":
            return "CPU run: torch.cudnn_convolution_add_relu / _relu need CUDA tensors and cuDNN"
        if not torch.backends.cudnn.is_available():
            return "cuDNN is not available to this torch"
        return None
    if impl.startswith("resfused-"):
        backend = impl.split("-", 1)[1]
        if backend not in ("cuda", "triton", "reference"):
            return f"unknown resfused backend {backend!r}"
        if backend == "triton" and device.type == "cpu" and not _harness.SIMULATE:
            return "CPU run: the Triton backend runs on CPU only in the interpreter, a correctness tool; not timed"
        from resfused.ops import conv_bias_act as op
        return op.unavailable_reason(backend, device, dtype or torch.float32)
    return f"unknown implementation {impl!r}"


def make_forward(impl: str) -> Callable:
    """A function with eager_conv_bias_act's signature running ``impl``. ``compile`` returns a fresh
    torch.compile wrapper; call torch._dynamo.reset() before each case (recompile limit)."""
    if impl == "eager":
        return eager_conv_bias_act
    if impl == "cudnn-fused":
        return cudnn_fused_conv_bias_act
    if impl == "compile":
        return torch.compile(eager_conv_bias_act, dynamic=False, fullgraph=True)
    if impl.startswith("resfused-"):
        return functools.partial(_resfused_conv_bias_act, backend=impl.split("-", 1)[1])
    raise ValueError(f"unknown implementation {impl!r}")


_CUDNN_NO_ENGINE = re.compile(r"cudnn|engine|plan|not supported", re.IGNORECASE)


def cudnn_fused_skip_reason(case: ConvCase, exc: BaseException) -> Optional[str]:
    """The "not run" reason when torch.cudnn_convolution_*_relu raised for want of a cuDNN engine for the
    configuration; None for any other error (which is then reported as an error)."""
    if not isinstance(exc, RuntimeError) or not _CUDNN_NO_ENGINE.search(str(exc)):
        return None
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    fn = "cudnn_convolution_add_relu" if case.op != "conv_bias_relu" else "cudnn_convolution_relu"
    return f"torch.{fn} raised for {case.dtype} {case.layout} (no fused cuDNN engine?): {first}"


@dataclasses.dataclass
class ConvInputs:
    xs: list
    zs: list            # residuals (conv_bias_add_relu)
    scs: list           # shortcut inputs (conv_bias_shortcut_add_relu)
    weight: torch.Tensor
    bias: torch.Tensor
    shortcut_weight: Optional[torch.Tensor]

    @property
    def n_sets(self) -> int:
        return len(self.xs)


def bytes_per_input_set(case: ConvCase) -> int:
    """Memory of one rotated input set: x and the residual or the shortcut input (weights are shared)."""
    numel = case.n * case.geometry.c_in * case.geometry.h * case.geometry.w
    if case.geometry.residual:
        numel += torch.Size(case.out_shape).numel()
    if case.shortcut_shape is not None:
        numel += torch.Size(case.shortcut_shape).numel()
    return numel * case.itemsize


def make_inputs(case: ConvCase, device: torch.device, n_sets: int = 1, seed: int = 0) -> ConvInputs:
    """Activations N(0, 1); weights N(0, 1/fan_in) so outputs stay O(1); bias U(-0.5, 0.5)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype, fmt = case.torch_dtype, case.memory_format

    def activation(shape):
        return torch.empty(shape, dtype=dtype, device=device, memory_format=fmt).normal_(generator=gen)

    def weight(shape):
        fan_in = shape[1] * shape[2] * shape[3]
        w = torch.empty(shape, dtype=torch.float32, device=device).normal_(generator=gen) * fan_in ** -0.5
        return w.to(dtype).contiguous(memory_format=fmt)

    g = case.geometry
    xs = [activation(case.x_shape) for _ in range(n_sets)]
    zs = [activation(case.out_shape) for _ in range(n_sets)] if g.residual else []
    scs = [activation(case.shortcut_shape) for _ in range(n_sets)] if g.shortcut is not None else []
    sc_weight = weight((g.c_out, g.shortcut[0], 1, 1)) if g.shortcut is not None else None
    bias = torch.empty(g.c_out, dtype=torch.float32, device=device).uniform_(-0.5, 0.5, generator=gen).to(dtype)
    return ConvInputs(xs, zs, scs, weight=weight(case.weight_shape), bias=bias, shortcut_weight=sc_weight)


def make_step(forward: Callable, case: ConvCase, inp: ConvInputs) -> Callable[[int], torch.Tensor]:
    """step(i): one call on input set i, under torch.no_grad()."""
    g = case.geometry
    sc_stride = g.shortcut[3] if g.shortcut is not None else 1

    def step(i):
        with torch.no_grad():
            return forward(inp.xs[i], inp.weight, inp.bias, inp.zs[i] if g.residual else None,
                           inp.scs[i] if g.shortcut is not None else None, inp.shortcut_weight, g.stride, g.padding,
                           sc_stride)
    return step


def reference_outputs(case: ConvCase, inp: ConvInputs) -> tuple:
    """(float64 result, eager's result) on input set 0: the correctness gate's two references."""
    from ._gate import to_float64

    g = case.geometry
    x, w, b, z, sc, scw = to_float64([inp.xs[0], inp.weight, inp.bias, inp.zs[0] if g.residual else None,
                                      inp.scs[0] if g.shortcut is not None else None, inp.shortcut_weight])
    inp64 = ConvInputs([x], [z] if z is not None else [], [sc] if sc is not None else [], weight=w, bias=b,
                       shortcut_weight=scw)
    return make_step(eager_conv_bias_act, case, inp64)(0), make_step(eager_conv_bias_act, case, inp)(0)


def path_of(impl: str) -> str:
    from . import _gate

    if impl == "resfused-triton":
        return _gate.triton_path()
    return PATHS.get(impl, impl)


def run_conv_suite(doc: dict, cases: Sequence[ConvCase], impls: Sequence[str], device: torch.device, timer,
                   show_progress: bool = True, check: bool = True) -> None:
    """Time every (case, impl) and append rows (GBps, TFLOPS) to ``doc``; an impl that cannot run goes to
    doc["skipped"] with its reason, one that fails (or fails the correctness gate, bench/_gate.py) to
    doc["errors"]. Rows record the path that ran and the per-call wall time beside the CUDA-event time."""
    from . import _gate, _harness

    l2 = _harness.l2_cache_bytes(device)
    work = [(case, impl) for case in cases for impl in impls]
    inputs: Optional[ConvInputs] = None
    current: Optional[ConvCase] = None
    refs = input_error = None
    for case, impl in _harness.progress(work, len(work), "conv", show_progress):
        if case != current:
            inputs, refs, input_error, current = None, None, None, case
            if device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                inputs = make_inputs(case, device, _harness.rotation_sets(bytes_per_input_set(case), l2))
                refs = reference_outputs(case, inputs) if check else None
            except Exception as e:  # e.g. out of memory: every impl of this case fails with it
                input_error = e
        why = impl_unavailable_reason(impl, device, case.torch_dtype)
        if why is not None:
            _harness.add_skipped(doc, "kernel", impl, why, case.id)
            continue
        fields = {**case.row_fields(), "impl": impl}
        if input_error is not None:
            _harness.add_error(doc, fields, input_error)
            continue
        try:
            if impl == "compile":
                torch._dynamo.reset()
            step = make_step(make_forward(impl), case, inputs)
            _gate.reset_triton_choices()
            try:
                with _gate.ResfusedMessages() as said:
                    out = step(0)
            except RuntimeError as e:
                skip = cudnn_fused_skip_reason(case, e) if impl == "cudnn-fused" else None
                if skip is None:
                    raise
                _harness.add_skipped(doc, "kernel", impl, skip, case.id)
                continue
            path = path_of(impl) + said.suffix()
            gate = _gate.check_kernel(out, *refs) if refs is not None else None
            del out
            t = timer(step, inputs.n_sets, key=(case, impl))
        except Exception as e:  # one broken case must not hide the others; the run exits non-zero
            _harness.add_error(doc, fields, e)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            continue
        nbytes, nflops = min_bytes(case), flops(case)
        row = {**fields, "p20_ms": t.p20_ms, "p50_ms": t.p50_ms, "p80_ms": t.p80_ms,
               "GBps": nbytes / (t.p50_ms * 1e-3) / 1e9, "bytes": nbytes,
               "TFLOPS": nflops / (t.p50_ms * 1e-3) / 1e12, "flops": nflops, "reps": t.reps,
               "input_sets": inputs.n_sets, "device_type": device.type, "wall_ms": t.wall_ms, "path": path,
               "gate": gate}
        if impl.startswith("resfused-"):
            row["backend"] = impl.split("-", 1)[1]
        if impl == "compile":
            row["compile"] = PATHS["compile"]
        if impl == "resfused-cuda":
            row["overhead_check"] = True
        _harness.add_row(doc, row)
    inputs = refs = None
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# pytest-benchmark (collected by bench/conftest.py; parametrized there from --bench-quick/--bench-batch)
# ---------------------------------------------------------------------------------------------------

def test_conv_bias_act(benchmark, conv_case: ConvCase, conv_impl: str):
    import sys

    import pytest

    from . import _harness

    target, n_sets = _harness.pytest_benchmark_target(sys.modules[__name__], conv_case, conv_impl)
    try:
        target()  # compilation, autotuning and cuDNN's benchmark search stay out of the statistics
    except RuntimeError as e:
        skip = cudnn_fused_skip_reason(conv_case, e) if conv_impl == "cudnn-fused" else None
        if skip is None:
            raise
        pytest.skip(skip)
    nbytes, nflops = min_bytes(conv_case), flops(conv_case)
    benchmark.extra_info.update(conv_case.row_fields(), impl=conv_impl, bytes=nbytes, flops=nflops,
                                input_sets=n_sets)
    benchmark.pedantic(target, rounds=30, warmup_rounds=5, iterations=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and stats.median > 0:
        benchmark.extra_info["TFLOPS_at_median"] = nflops / stats.median / 1e12
