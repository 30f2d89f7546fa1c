"""Model benchmarks: torchvision ResNet-50 on synthetic data, stock against resfused, eager and compiled.

Configurations: bf16 with channels_last activations and fp32 NCHW, batch 256 at 224x224 by default. Stock
models keep fp32 parameters and run bf16 under autocast; fuse_for_inference models are folded in fp32 and
then cast to bf16 (parameters and input bf16; the row's param_dtype says which). Modes:
  train  one SGD step (momentum 0.9): forward, cross-entropy, backward, optimizer step, zero_grad.
         images/s and peak memory (torch.cuda.max_memory_allocated over steady-state steps:
         parameters, gradients, optimizer state and activations).
  infer  eval-mode forward under torch.no_grad(); images/s and peak memory. Before it is timed, each
         implementation's logits are compared with the stock eval model's (same weights, same input).
Each implementation is one MODEL_IMPLS line: a name (the row's impl), the mode, what to do to a fresh
stock model, whether to torch.compile it and in which mode (inference compiles with Inductor's freezing,
torch._inductor.config.freezing set and restored around the compile and the timing), the resfused
backend it asks for, and whether --quick runs it:
  eager, resfused (resfused.convert: fused BN + add + ReLU), compile, resfused-compile    train and infer
  resfused-convbn-{triton,cuda}   resfused.convert(model, backend=..., fuse_convs=True)       train
  resfused-convbn-compile         the same (triton) under torch.compile                       train
  resfused-convbn-recompute       the same with recompute=True, backend auto                 train
  resfused-fused-{cuda,triton,reference}   resfused.fuse_for_inference(model, backend=...)     infer
  compile (freezing, mode=default), compile-max-autotune (freezing, mode="max-autotune")      infer
--quick leaves out the training compiles and compile-max-autotune (minutes of autotuning); its inference
compile row is the default-mode one, labelled so in the row's ``compile`` field.
The stock model's BatchNorms get non-trivial affine parameters and running statistics (as in
conversion_check), so folding them is not a no-op.

conversion_check() compares resfused.convert(resnet50) with stock on a small CPU input (reference
backend): eval outputs in fp32, and a float64 training step (outputs, every gradient, running
statistics), where the comparison is exact up to rounding.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import gc
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _stock(model: nn.Module) -> nn.Module:
    return model


def _convert(model: nn.Module) -> nn.Module:
    import resfused
    return resfused.convert(model)


def _fuse(model: nn.Module, backend: str) -> nn.Module:
    import resfused
    return resfused.fuse_for_inference(model, backend=backend)


def _convert_convs(model: nn.Module, backend: Optional[str], recompute: bool = False) -> nn.Module:
    import resfused
    return resfused.convert(model, backend=backend, fuse_convs=True, recompute=recompute)


def _conv_bn_unavailable(backend: str) -> Callable[[torch.device], Optional[str]]:
    def why(device: torch.device) -> Optional[str]:
        if device.type != "cuda":
            return ("CPU run: the fused-conv training path is timed on a GPU only (on CPU its reference backend is "
                    "the test oracle and Triton runs in the interpreter)")
        from resfused.ops import conv_bn
        return conv_bn.unavailable_reason(backend, device, torch.bfloat16)
    return why


def _needs_gpu(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "CPU run: torch.compile of ResNet-50 is timed on a GPU only (Inductor's CPU compile takes minutes here)"
    return None


def _fused_unavailable(backend: str) -> Callable[[torch.device], Optional[str]]:
    def why(device: torch.device) -> Optional[str]:
        if backend == "reference" and device.type == "cuda":
            return "the reference backend is the test oracle (F.conv2d + epilogue in fp32); not timed on a GPU"
        if backend == "triton" and device.type == "cpu":
            return "CPU run: the Triton backend runs on CPU only in the interpreter, a correctness tool; not timed"
        from resfused.ops import conv_bias_act
        return conv_bias_act.unavailable_reason(backend, device, torch.float32)
    return why


@dataclasses.dataclass(frozen=True)
class ModelImpl:
    name: str                                       # the row's impl
    mode: str                                       # "train" or "infer"
    prepare: Callable[[nn.Module], nn.Module]      # applied to a fresh stock model on the device
    compile: bool = False
    unavailable: Callable[[torch.device], Optional[str]] = lambda device: None
    in_quick: bool = True                           # part of --quick (compiling ResNet-50 takes minutes)
    compile_mode: Optional[str] = None              # torch.compile(mode=...); None: the default mode
    backend: Optional[str] = None                   # the resfused backend it asks for (the row's backend)
    cast_params: bool = False                       # parameters and input in the config's dtype, not autocast
    autocast_only: bool = False                     # only where the config autocasts (else it repeats another row)
    quick_reason: str = "--quick: compiling ResNet-50 takes minutes; run without --quick"

    @property
    def compile_label(self) -> str:
        """What the row's ``compile`` field says: Inductor, fullgraph, freezing for inference, and the mode."""
        freezing = ", freezing" if self.mode == "infer" else ""
        return f"inductor, fullgraph=True{freezing}, mode={self.compile_mode or 'default'}"


MODEL_IMPLS: list[ModelImpl] = [
    ModelImpl("eager", "train", _stock),
    ModelImpl("resfused", "train", _convert),
    ModelImpl("compile", "train", _stock, compile=True, unavailable=_needs_gpu, in_quick=False),
    ModelImpl("resfused-compile", "train", _convert, compile=True, unavailable=_needs_gpu, in_quick=False),
    ModelImpl("eager", "infer", _stock),
    # Stock at the fused rows' precision regime (bf16 parameters and input, no autocast): their baseline.
    ModelImpl("eager", "infer", _stock, cast_params=True, autocast_only=True),
    ModelImpl("resfused", "infer", _convert),
    ModelImpl("resfused-fused-cuda", "infer", functools.partial(_fuse, backend="cuda"), backend="cuda",
              cast_params=True, unavailable=_fused_unavailable("cuda")),
    ModelImpl("resfused-fused-triton", "infer", functools.partial(_fuse, backend="triton"), backend="triton",
              cast_params=True, unavailable=_fused_unavailable("triton")),
    ModelImpl("resfused-fused-reference", "infer", functools.partial(_fuse, backend="reference"),
              backend="reference", cast_params=True, unavailable=_fused_unavailable("reference")),
    ModelImpl("compile", "infer", _stock, compile=True, unavailable=_needs_gpu),
    ModelImpl("compile-max-autotune", "infer", _stock, compile=True, compile_mode="max-autotune",
              unavailable=_needs_gpu, in_quick=False,
              quick_reason="--quick: mode=\"max-autotune\" autotunes every conv of ResNet-50 (minutes); the quick "
                           "run's compile row is freezing with mode=default"),
    # Last: their first steps autotune (Triton) or finalize cuDNN runtime-fusion plans for every conv shape, the
    # slowest warm-ups of the suite; a run cut short by a timeout keeps the rows above.
    ModelImpl("resfused-convbn-cuda", "train", functools.partial(_convert_convs, backend="cuda"), backend="cuda",
              unavailable=_conv_bn_unavailable("cuda")),
    ModelImpl("resfused-convbn-triton", "train", functools.partial(_convert_convs, backend="triton"),
              backend="triton", unavailable=_conv_bn_unavailable("triton")),
    ModelImpl("resfused-convbn-compile", "train", functools.partial(_convert_convs, backend="triton"),
              backend="triton", compile=True, unavailable=_conv_bn_unavailable("triton"), in_quick=False),
    ModelImpl("resfused-convbn-recompute", "train", functools.partial(_convert_convs, backend=None, recompute=True),
              unavailable=_conv_bn_unavailable("triton")),
]

MODEL_DTYPES = {  # name -> (row dtype, autocast dtype or None, layout)
    "bf16": ("bf16-autocast", torch.bfloat16, "channels_last"),
    "fp32": ("fp32", None, "nchw"),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model: str = "resnet50"
    batch: int = 256
    image_size: int = 224
    dtype: str = "bf16"
    num_classes: int = 1000

    @property
    def row_dtype(self) -> str:
        return MODEL_DTYPES[self.dtype][0]

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return MODEL_DTYPES[self.dtype][1]

    @property
    def layout(self) -> str:
        return MODEL_DTYPES[self.dtype][2]

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.layout == "channels_last" else torch.contiguous_format

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype an implementation with cast_params runs its parameters and input in."""
        return self.amp_dtype or torch.float32

    @property
    def shape_str(self) -> str:
        return f"{self.batch}x3x{self.image_size}x{self.image_size}"

    def row_fields(self, mode: str) -> dict:
        return {"suite": "model", "op": self.model, "mode": mode, "shape": self.shape_str, "dtype": self.row_dtype,
                "layout": self.layout}


def build_model(cfg: ModelConfig, device: torch.device, seed: int = 0) -> nn.Module:
    import torchvision

    torch.manual_seed(seed)
    model = _randomized(getattr(torchvision.models, cfg.model)(num_classes=cfg.num_classes))
    return model.to(device=device, memory_format=cfg.memory_format)


def _autocast(cfg: ModelConfig, device: torch.device, impl: Optional["ModelImpl"] = None):
    """Autocast in the config's dtype, except for an impl that runs its parameters in that dtype already."""
    enabled = cfg.amp_dtype is not None and not (impl is not None and impl.cast_params)
    return torch.autocast(device.type, dtype=cfg.amp_dtype or torch.float32, enabled=enabled)


def _synthetic_batch(cfg: ModelConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.empty(cfg.batch, 3, cfg.image_size, cfg.image_size, device=device,
                    memory_format=cfg.memory_format).normal_(generator=gen)
    target = torch.randint(0, cfg.num_classes, (cfg.batch,), device=device, generator=gen)
    return x, target


def make_model_step(impl: ModelImpl, cfg: ModelConfig, device: torch.device) -> tuple[Callable[[int], object], str]:
    """(step(i), resfused backend or "") for ``impl`` on a fresh model with synthetic data. An infer step
    returns the logits."""
    model = impl.prepare(build_model(cfg, device))
    backend = ""
    if impl.backend is not None:
        backend = impl.backend
    elif impl.name.startswith("resfused"):
        from resfused import _backend
        probe = torch.empty(1, device=device, dtype=cfg.amp_dtype or torch.float32)
        backend = _backend.resolve(None, probe)
    x, target = _synthetic_batch(cfg, device)
    if impl.cast_params:
        model = model.to(cfg.param_dtype)
        x = x.to(cfg.param_dtype)
    if impl.mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        run = torch.compile(model, mode=impl.compile_mode, fullgraph=True) if impl.compile else model

        def step(i):
            with _autocast(cfg, device, impl):
                out = run(x)
            F.cross_entropy(out.float(), target).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif impl.mode == "infer":
        model.eval()
        run = torch.compile(model, mode=impl.compile_mode, fullgraph=True) if impl.compile else model

        def step(i):
            with torch.no_grad(), _autocast(cfg, device, impl):
                return run(x)
    else:
        raise ValueError(f"unknown model mode {impl.mode!r}")
    return step, backend


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reference_logits(cfg: ModelConfig, device: torch.device) -> dict:
    """The correctness gate's references on the suite's input: the stock eval model in float64 ("fp64"), and
    stock in each precision regime ("autocast": fp32 parameters under the config's autocast; "cast": parameters
    and input in the config's dtype), whose own error sets the bound (bench/_gate.py)."""
    model = build_model(cfg, device).eval()
    x, _ = _synthetic_batch(cfg, device)
    refs = {}
    with torch.no_grad():
        refs["fp64"] = copy.deepcopy(model).double()(x.double()).detach()
        with _autocast(cfg, device):
            refs["autocast"] = model(x).detach()
        cast = model.to(cfg.param_dtype)
        refs["cast"] = cast(x.to(cfg.param_dtype)).detach()
    del model, cast
    _free(device)
    return refs


def path_of(impl: "ModelImpl", backend: str) -> str:
    what = {"eager": "stock torchvision", "compile": "stock under torch.compile"}.get(impl.name)
    if what is None:
        what = f"resfused backend {backend or 'auto'}"
    regime = "bf16/fp32 parameters as the config's param_dtype, no autocast" if impl.cast_params else "autocast"
    return f"{what}; {regime}" + (f"; {impl.compile_label}" if impl.compile else "")


def run_model_suite(doc: dict, configs: Sequence[ModelConfig], impls: Sequence[ModelImpl], device: torch.device,
                    timer, show_progress: bool = True, warmup_steps: int = 2, check: bool = True) -> None:
    """Time every (config, impl); rows carry images_per_s (and peak_mem_MiB on a GPU). With ``check``, an
    infer impl whose logits fail the correctness gate (bench/_gate.py: twice stock's own error against the
    float64 model, same precision regime) is an error, not timed."""
    from . import _gate
    from . import _harness

    work = [(cfg, impl) for cfg in configs for impl in impls]
    refs: dict = {}
    for cfg, impl in _harness.progress(work, len(work), "model", show_progress):
        fields = {**cfg.row_fields(impl.mode), "impl": impl.name}
        if impl.autocast_only and cfg.amp_dtype is None:
            continue
        why = impl.unavailable(device)
        if why is not None:
            _harness.add_skipped(doc, "model", impl.name, why, f"{impl.mode} {cfg.row_dtype}")
            continue
        step = None
        try:
            if check and impl.mode == "infer" and cfg not in refs:
                refs.clear()  # one config's reference at a time
                refs[cfg] = reference_logits(cfg, device)
            if impl.compile:
                torch._dynamo.reset()
            with _freezing() if impl.compile and impl.mode == "infer" else contextlib.nullcontext():
                with _gate.ResfusedMessages() as said:  # a fallback (unfused cuDNN path, a skipped backend)
                    step, backend = make_model_step(impl, cfg, device)
                    for i in range(max(1, warmup_steps)):  # compilation and autotuning before the peak-memory window
                        out = step(i)
                        if i == 0 and check and impl.mode == "infer":
                            ref = refs[cfg]
                            gate = _gate.check_model(out, ref["fp64"],
                                                     ref["cast" if impl.cast_params else "autocast"])
                        out = None
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(device)
                t = timer(step, 1, key=(cfg, impl))
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        except Exception as e:
            _harness.add_error(doc, fields, e)
            step = out = None
            _free(device)
            continue
        step = None
        row = {**fields, "p20_ms": t.p20_ms, "p50_ms": t.p50_ms, "p80_ms": t.p80_ms,
               "images_per_s": cfg.batch / (t.p50_ms * 1e-3), "reps": t.reps, "device_type": device.type,
               "param_dtype": str(cfg.param_dtype if impl.cast_params else torch.float32).replace("torch.", "")}
        if peak is not None:
            row["peak_mem_MiB"] = peak
        if backend:
            row["backend"] = backend
        if impl.compile:
            row["compile"] = impl.compile_label
        if check and impl.mode == "infer":
            row["gate"] = gate
        row["wall_ms"] = t.wall_ms
        row["path"] = path_of(impl, backend) + said.suffix()
        _harness.add_row(doc, row)
        _free(device)


def _freezing():
    """Inductor's freezing (weights become constants, conv+BN folded) for inference compiles."""
    import torch._inductor.config as inductor_config
    return inductor_config.patch(freezing=True)


# bench/run.py --plan headline (gpu_check.sh's first bench step): stock eager, resfused.convert, fuse_for_inference
# and convert(fuse_convs=True), no compiles (the rest plan has them). (name, mode, cast_params).
HEADLINE_IMPLS = (("eager", "train", False), ("resfused", "train", False),
                  ("eager", "infer", False), ("eager", "infer", True), ("resfused", "infer", False),
                  ("resfused-fused-cuda", "infer", True), ("resfused-fused-triton", "infer", True),
                  ("resfused-convbn-cuda", "train", False), ("resfused-convbn-triton", "train", False))


def _key(impl: ModelImpl) -> tuple:
    return (impl.name, impl.mode, impl.cast_params)


def select_impls(names: Optional[Sequence[str]], modes: Sequence[str], quick: bool,
                 plan: Optional[str] = None) -> tuple[list[ModelImpl], list]:
    """(impls to run, [(impl, reason)] left out). ``plan`` "headline": HEADLINE_IMPLS in that order; "rest": the
    --quick impls that are not in the headline, then the ones --quick leaves out; otherwise all (``quick``: those
    with in_quick)."""
    impls = [i for i in MODEL_IMPLS if i.mode in modes and not (names and i.name not in names)]
    if plan == "headline":
        by_key = {_key(i): i for i in impls}
        return [by_key[k] for k in HEADLINE_IMPLS if k in by_key], []
    if plan == "rest":
        rest = [i for i in impls if _key(i) not in HEADLINE_IMPLS]
        return [i for i in rest if i.in_quick] + [i for i in rest if not i.in_quick], []
    chosen, left_out = [], []
    for impl in impls:
        if quick and not impl.in_quick:
            left_out.append((impl, impl.quick_reason))
            continue
        chosen.append(impl)
    return chosen, left_out


# ---------------------------------------------------------------------------------------------------
# conversion check
# ---------------------------------------------------------------------------------------------------

def _nrel(a: torch.Tensor, b: torch.Tensor) -> float:
    b = b.detach().double()
    return ((a.detach().double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def _randomized(model: nn.Module) -> nn.Module:
    with torch.no_grad():  # non-trivial BN parameters and running statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def conversion_check(model_name: str = "resnet50", batch: int = 2, image_size: int = 64, backend: str = "reference",
                     eval_tol: float = 1e-4, train_tol: float = 1e-6) -> dict:
    """resfused.convert(model) against stock on CPU: eval outputs (fp32) and one float64 SGD step.

    float64 keeps ReLU decisions within rounding of zero from flipping between implementations (in
    fp32 such a flip in a deep net on a tiny input swamps the comparison), so the training check is a
    tight one of the conversion's semantics."""
    import torchvision
    from torchvision.models import resnet

    import resfused

    torch.manual_seed(0)
    stock = _randomized(getattr(torchvision.models, model_name)(num_classes=10))
    ours = resfused.convert(copy.deepcopy(stock), backend=backend)
    blocks = sum(isinstance(m, (resfused.nn.BasicBlock, resfused.nn.Bottleneck)) for m in ours.modules())
    left = sum(isinstance(m, (resnet.BasicBlock, resnet.Bottleneck)) for m in ours.modules())
    x = torch.randn(batch, 3, image_size, image_size)
    errors = {}
    stock.eval(), ours.eval()
    with torch.no_grad():
        errors["eval_output_fp32"] = _nrel(ours(x), stock(x))

    stock64, ours64 = copy.deepcopy(stock).double().train(), copy.deepcopy(ours).double().train()
    target = torch.randint(0, 10, (batch,))
    outs = []
    for m in (stock64, ours64):
        out = m(x.double())
        F.cross_entropy(out, target).backward()
        outs.append(out)
    errors["train_output_fp64"] = _nrel(outs[1], outs[0])
    errors["train_grads_fp64"] = max(_nrel(a.grad, b.grad) for a, b in zip(ours64.parameters(), stock64.parameters()))
    sd_s, sd_o = stock64.state_dict(), ours64.state_dict()
    errors["running_stats_fp64"] = max(_nrel(sd_o[k], sd_s[k]) for k in sd_s if "running" in k)
    counts_equal = all(torch.equal(sd_o[k], sd_s[k]) for k in sd_s if k.endswith("num_batches_tracked"))
    tols = {"eval_output_fp32": eval_tol, "train_output_fp64": train_tol, "train_grads_fp64": train_tol,
            "running_stats_fp64": train_tol}
    passed = (blocks > 0 and left == 0 and counts_equal and list(sd_o) == list(sd_s)
              and all(errors[k] <= tols[k] for k in errors))
    return {"name": f"convert({model_name}) vs stock", "backend": backend, "device": "cpu", "passed": passed,
            "input": f"{batch}x3x{image_size}x{image_size}", "blocks_converted": blocks, "blocks_left": left,
            "num_batches_tracked_equal": counts_equal, "max_norm_rel_error": errors, "tolerance": tols}
