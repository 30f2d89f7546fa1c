"""Kernel benchmarks of resfused.functional.batch_norm_add_relu against cuDNN/native eager and torch.compile.

Ops (one fused call each):    batch_norm_add_relu  relu(bn(x) + z)      batch_norm_add  bn(x) + z
                              batch_norm_relu      relu(bn(x))          batch_norm      bn(x)
Modes: train_fwd (batch statistics, running stats updated, autograd recording as in training),
       train_fwd_bwd (that forward, then the gradients of x, z, weight and bias), eval_fwd (running
       statistics, no grad).
Shapes: ResNet-50's BatchNorm activations at batch N (256 by default); bf16 and fp16 channels_last,
        fp32 NCHW; weight, bias and running statistics fp32 (C,).
Implementations: eager (F.batch_norm, then in-place add and ReLU as torchvision's blocks do, with
        torch.backends.cudnn.benchmark=True: cuDNN or ATen's native kernels), compile (the same
        function under torch.compile), resfused-cuda and resfused-triton (resfused-reference on CPU).
        Each non-eager output (or gradient set) is compared with eager's before it is timed.

Pytest-benchmark: `pytest bench/ --benchmark-only [--bench-quick] [--bench-batch N]` runs these cases
(GPU only; they skip without one). See bench/conftest.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from . import _harness

BYTES_MODEL = """\
Minimum-bytes model (GBps = bytes / median time). E = N*C*H*W elements of s bytes (2 for bf16/fp16,
4 for fp32); r = 1 with a residual z, else 0; per-channel vectors (weight, bias, statistics; O(C))
are not counted.
  eval_fwd:       read x, read z, write y                              (2 + r) * E * s
  train_fwd:      the same (2 + r) * E * s. Batch statistics need x once more unless x stays
                  on chip, so a two-pass kernel moves (3 + r) * E * s and tops out at
                  (2 + r)/(3 + r) of the copy bandwidth by this measure.
  train_fwd_bwd:  forward (2 + r) * E * s
                  + backward: read grad_y, read x, write grad_x        3 * E * s
                  + write grad_z when there is a residual and a ReLU   E * s
                    (without a ReLU grad_z is grad_y itself; without a residual there is none)
                  + with a ReLU, its decision at 1 bit per element, written by the forward and read
                    by the backward: 2 * ceil(E / 8). (Eager keeps y instead and reads E * s.)
The copy bandwidth (copy_bandwidth_GBps) counts a copy's read and write: 2 * bytes / time. A row's
frac_copy_bw is its GBps over that figure, so 1.0 would be a kernel moving exactly the minimum
bytes at copy speed."""

OPS = {  # name -> (residual, relu)
    "batch_norm_add_relu": (True, True),
    "batch_norm_relu": (False, True),
    "batch_norm_add": (True, False),
    "batch_norm": (False, False),
}
MODES = ("train_fwd", "train_fwd_bwd", "eval_fwd")
RESNET50_SHAPES = ((64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 28, 28), (512, 28, 28), (256, 14, 14),
                   (1024, 14, 14), (512, 7, 7), (2048, 7, 7))  # (C, H, W)
DTYPES = {"bf16": (torch.bfloat16, "channels_last"), "fp16": (torch.float16, "channels_last"),
          "fp32": (torch.float32, "nchw")}
GPU_IMPLS = ("eager", "compile", "resfused-cuda", "resfused-triton")
CPU_IMPLS = GPU_IMPLS + ("resfused-reference",)

SELECTIONS = {  # (gpu, quick) -> what run.py times by default
    (True, False): dict(ops=tuple(OPS), modes=MODES, shapes=RESNET50_SHAPES, dtypes=tuple(DTYPES), batch=256),
    (True, True): dict(ops=("batch_norm_add_relu",), modes=MODES, shapes=((256, 56, 56), (2048, 7, 7)),
                       dtypes=("bf16", "fp32"), batch=256),
    (False, False): dict(ops=("batch_norm_add_relu", "batch_norm_relu"), modes=MODES, shapes=RESNET50_SHAPES,
                         dtypes=("fp32",), batch=2),
    (False, True): dict(ops=("batch_norm_add_relu",), modes=MODES, shapes=((256, 56, 56), (2048, 7, 7)),
                        dtypes=("fp32",), batch=2),
}
# The headline (bench/gpu_check.sh's first bench step, bench/run.py --headline): the fused op's training step and
# eval forward at three ResNet-50 shapes in bf16 channels_last, and one fp32 NCHW shape. A list of selections
# (kernel_cases of each, in order); on CPU (--simulate) the same cases at batch 2.
HEADLINE = (dict(ops=("batch_norm_add_relu",), modes=("train_fwd_bwd", "eval_fwd"),
                 shapes=((256, 56, 56), (1024, 14, 14), (2048, 7, 7)), dtypes=("bf16",)),
            dict(ops=("batch_norm_add_relu",), modes=("train_fwd_bwd", "eval_fwd"), shapes=((256, 56, 56),),
                 dtypes=("fp32",)))
# Rows the path field describes for eager and compile (the resfused rows ask the backend which path ran).
EAGER_PATH = "F.batch_norm (cuDNN or ATen native) + add_ + relu_"
COMPILE_LABEL = "inductor, fullgraph=True, dynamic=False, mode=default"

MOMENTUM, EPS = 0.1, 1e-5


@dataclasses.dataclass(frozen=True)
class KernelCase:
    op: str
    mode: str
    n: int
    c: int
    h: int
    w: int
    dtype: str

    def __post_init__(self):
        if self.op not in OPS or self.mode not in MODES or self.dtype not in DTYPES:
            raise ValueError(f"unknown kernel case {self}")

    @property
    def residual(self) -> bool:
        return OPS[self.op][0]

    @property
    def relu(self) -> bool:
        return OPS[self.op][1]

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
    def shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c, self.h, self.w)

    @property
    def shape_str(self) -> str:
        return "x".join(map(str, self.shape))

    @property
    def numel(self) -> int:
        return self.n * self.c * self.h * self.w

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def training(self) -> bool:
        return self.mode != "eval_fwd"

    @property
    def id(self) -> str:
        return f"{self.op}-{self.mode}-{self.shape_str}-{self.dtype}-{self.layout}"

    def row_fields(self) -> dict:
        return {"suite": "kernel", "op": self.op, "mode": self.mode, "shape": self.shape_str, "dtype": self.dtype,
                "layout": self.layout}


def min_bytes(case: KernelCase) -> int:
    """The minimum-bytes model of BYTES_MODEL for one call of ``case``."""
    e, s, r = case.numel, case.itemsize, int(case.residual)
    fwd = (2 + r) * e * s
    if case.mode != "train_fwd_bwd":
        return fwd
    bwd = 3 * e * s + (e * s if case.residual and case.relu else 0)
    mask = 2 * ((e + 7) // 8) if case.relu else 0
    return fwd + bwd + mask


def kernel_cases(ops: Sequence[str], modes: Sequence[str], shapes: Sequence[tuple[int, int, int]],
                 dtypes: Sequence[str], batch: int) -> list[KernelCase]:
    return [KernelCase(op, mode, batch, c, h, w, dt)
            for dt in dtypes for op in ops for mode in modes for (c, h, w) in shapes]


# ---------------------------------------------------------------------------------------------------
# implementations
# ---------------------------------------------------------------------------------------------------

def eager_bn_add_relu(x, z, weight, bias, running_mean, running_var, training: bool, momentum: float, eps: float,
                      relu: bool):
    """The stock composite, as torchvision's blocks run it: batch_norm, ``out += identity``, ReLU(inplace)."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if z is not None:
        y = y.add_(z)
    if relu:
        y = torch.relu_(y)
    return y


def _resfused_bn_add_relu(x, z, weight, bias, running_mean, running_var, training, momentum, eps, relu, *, backend):
    from resfused.functional import batch_norm_add_relu
    return batch_norm_add_relu(x, z, running_mean, running_var, weight, bias, training=training, momentum=momentum,
                               eps=eps, relu=relu, backend=backend)


def impl_unavailable_reason(impl: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None when ``impl`` can run on (device, dtype), else why not (recorded in the result's "skipped")."""
    if impl == "eager":
        return None
    if impl == "compile":
        if device.type != "cuda":
            return "CPU run: torch.compile is timed on a GPU only (Inductor's CPU compile takes minutes here)"
        return None
    if impl.startswith("resfused-"):
        import resfused
        backend = impl.split("-", 1)[1]
        if backend not in ("cuda", "triton", "reference"):
            return f"unknown resfused backend {backend!r}"
        if backend == "triton" and device.type == "cpu" and not _harness.SIMULATE:
            return "CPU run: the Triton backend runs on CPU only in the interpreter, a correctness tool; not timed"
        return {b.name: b.reason for b in resfused.backends(device, dtype)}[backend]
    return f"unknown implementation {impl!r}"


def make_forward(impl: str) -> Callable:
    """A function with eager_bn_add_relu's signature running ``impl``. ``compile`` returns a fresh
    torch.compile wrapper; call torch._dynamo.reset() before each case so shapes never hit the
    recompile limit (which would silently fall back to eager)."""
    if impl == "eager":
        return eager_bn_add_relu
    if impl == "compile":
        return torch.compile(eager_bn_add_relu, dynamic=False, fullgraph=True)
    if impl.startswith("resfused-"):
        return functools.partial(_resfused_bn_add_relu, backend=impl.split("-", 1)[1])
    raise ValueError(f"unknown implementation {impl!r}")


@dataclasses.dataclass
class KernelInputs:
    xs: list
    zs: list
    grads: list
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    @property
    def n_sets(self) -> int:
        return len(self.xs)


def bytes_per_input_set(case: KernelCase) -> int:
    """Memory of one rotated input set: x, z (with a residual) and grad_y (train_fwd_bwd)."""
    tensors = 1 + int(case.residual) + int(case.mode == "train_fwd_bwd")
    return tensors * case.numel * case.itemsize


def make_inputs(case: KernelCase, device: torch.device, n_sets: int = 1, seed: int = 0) -> KernelInputs:
    gen = torch.Generator(device=device).manual_seed(seed)

    def activation():
        t = torch.empty(case.shape, dtype=case.torch_dtype, device=device, memory_format=case.memory_format)
        return t.normal_(generator=gen)

    def channel(lo, hi):
        return torch.empty(case.c, dtype=torch.float32, device=device).uniform_(lo, hi, generator=gen)

    grad = case.training  # activations and parameters require grad as in a training step
    xs = [activation().requires_grad_(grad) for _ in range(n_sets)]
    zs = [activation().requires_grad_(grad) for _ in range(n_sets)] if case.residual else []
    gs = [activation() for _ in range(n_sets)] if case.mode == "train_fwd_bwd" else []
    return KernelInputs(xs, zs, gs, weight=channel(0.5, 1.5).requires_grad_(grad),
                        bias=channel(-0.5, 0.5).requires_grad_(grad), running_mean=channel(-0.1, 0.1),
                        running_var=channel(0.8, 1.2))


def make_step(forward: Callable, case: KernelCase, inp: KernelInputs) -> Callable[[int], object]:
    """step(i): one call of ``case.mode`` on input set i. Returns y, or the gradient tuple for train_fwd_bwd."""
    relu, training = case.relu, case.training

    def fwd(i):
        z = inp.zs[i] if case.residual else None
        return forward(inp.xs[i], z, inp.weight, inp.bias, inp.running_mean, inp.running_var, training, MOMENTUM,
                       EPS, relu)

    if case.mode == "eval_fwd":
        def step(i):
            with torch.no_grad():
                return fwd(i)
    elif case.mode == "train_fwd":
        def step(i):
            return fwd(i)
    else:
        def step(i):
            wrt = [inp.xs[i]] + ([inp.zs[i]] if case.residual else []) + [inp.weight, inp.bias]
            return torch.autograd.grad(fwd(i), wrt, inp.grads[i])
    return step


def _detach(out):
    return tuple(t.detach() for t in out) if isinstance(out, (tuple, list)) else out.detach()


def reference_outputs(case: KernelCase, inp: KernelInputs) -> tuple:
    """(float64 result, eager's result) of ``case`` on input set 0: the correctness gate's two references."""
    from ._gate import to_float64

    x, z, g, w, b, rm, rv = to_float64([inp.xs[0], inp.zs[0] if case.residual else None,
                                        inp.grads[0] if inp.grads else None, inp.weight, inp.bias,
                                        inp.running_mean, inp.running_var])
    inp64 = KernelInputs([x], [z] if z is not None else [], [g] if g is not None else [], w, b, rm, rv)
    ref64 = _detach(make_step(eager_bn_add_relu, case, inp64)(0))
    return ref64, _detach(make_step(eager_bn_add_relu, case, inp)(0))


def path_of(impl: str, case: KernelCase, inp: KernelInputs) -> str:
    """What actually ran for ``impl`` (call after its first call): the CUDA planner's scheme, the Triton
    configs, or what eager and compile are."""
    from . import _gate

    if impl == "resfused-cuda":
        return _gate.cuda_bn_path(inp.xs[0], case.training)
    if impl == "resfused-triton":
        return _gate.triton_path()
    if impl == "compile":
        return COMPILE_LABEL
    if impl == "eager":
        return EAGER_PATH
    return impl


def run_kernel_suite(doc: dict, cases: Sequence[KernelCase], impls: Sequence[str], device: torch.device, timer,
                     show_progress: bool = True, check: bool = True) -> None:
    """Time every (case, impl) and append rows to ``doc``; an impl that cannot run goes to
    doc["skipped"] with its reason, one that fails (or fails the correctness gate, bench/_gate.py) to
    doc["errors"]. Each row records the path that ran and, from timers that measure it, the per-call wall
    time of back-to-back calls beside the CUDA-event time."""
    from . import _gate, _harness

    l2 = _harness.l2_cache_bytes(device)
    work = [(case, impl) for case in cases for impl in impls]
    inputs: Optional[KernelInputs] = None
    current: Optional[KernelCase] = None
    refs = input_error = None
    for case, impl in _harness.progress(work, len(work), "kernel", show_progress):
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
            with _gate.ResfusedMessages() as said:
                out = step(0)
            path = path_of(impl, case, inputs) + said.suffix()
            gate = _gate.check_kernel(out, *refs) if refs is not None else None
            del out
            t = timer(step, inputs.n_sets, key=(case, impl))
        except Exception as e:  # one broken case must not hide the others; the run exits non-zero
            _harness.add_error(doc, fields, e)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            continue
        nbytes = min_bytes(case)
        row = {**fields, "p20_ms": t.p20_ms, "p50_ms": t.p50_ms, "p80_ms": t.p80_ms,
               "GBps": nbytes / (t.p50_ms * 1e-3) / 1e9, "bytes": nbytes, "reps": t.reps,
               "input_sets": inputs.n_sets, "device_type": device.type, "wall_ms": t.wall_ms, "path": path,
               "gate": gate}
        if impl.startswith("resfused-"):
            row["backend"] = impl.split("-", 1)[1]
        if impl == "compile":
            row["compile"] = COMPILE_LABEL
        _harness.add_row(doc, row)
    inputs = refs = None
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# pytest-benchmark (collected by bench/conftest.py; parametrized there from --bench-quick/--bench-batch)
# ---------------------------------------------------------------------------------------------------

def test_batch_norm_add_relu(benchmark, kernel_case: KernelCase, kernel_impl: str):
    import sys

    from . import _harness

    target, n_sets = _harness.pytest_benchmark_target(sys.modules[__name__], kernel_case, kernel_impl)
    target()  # compilation, autotuning and cuDNN's benchmark search stay out of the statistics
    nbytes = min_bytes(kernel_case)
    benchmark.extra_info.update(kernel_case.row_fields(), impl=kernel_impl, bytes=nbytes, input_sets=n_sets)
    benchmark.pedantic(target, rounds=30, warmup_rounds=5, iterations=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and stats.median > 0:
        benchmark.extra_info["GBps_at_median"] = nbytes / stats.median / 1e9
