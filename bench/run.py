"""`make bench`: the kernel and model benchmarks on a GPU; the CPU-meaningful checks without one.

    python bench/run.py [--quick | --plan headline|rest] [--simulate] [--suite kernel|bn|conv|model|all]
                        [--out DIR | --json PATH] [selection options]

On a GPU: the kernel suites (bench_bn_add_relu.py: eager / compile / resfused-cuda / resfused-triton over
ResNet-50's BN shapes; bench_conv_bias_act.py: the fused conv over ResNet-50's convs against cuDNN conv +
separate bias/add/ReLU, torch.cudnn_convolution_add_relu and torch.compile), and the model suite
(bench_resnet.py: ResNet-50 training and inference, fuse_for_inference per backend, torch.compile with
freezing), in that order (bn, model, conv: the model rows before the slower conv compiles), one JSON into
bench/results/ (or --out / --json), then bench/report.py's markdown and PNGs next to it.
Without a GPU (or with --cpu): says so first, checks resfused.convert(resnet50) against stock on CPU
(reference backend), times the reference paths on small shapes labelled CPU, adds bench/bench_cpu.py's CPU
model rows (ResNet-50 fp32, 8x112x112: stock, convert, fuse_for_inference, the torch.jit anchor; ratios from
one run; --no-cpu-rows leaves them out), writes the JSON to bench/results/cpu/ (not committed) and exits 0
unless a check or a case failed. The committed CPU summary: `python -m bench.bench_cpu --summary`.

Plans: full (default), quick (--quick), headline (bench/gpu_check.sh's first bench step: the numbers that
matter, about 3 minutes on a cold H100), rest (the quick plan's other rows, then the compiles; gpu_check.sh runs
it while time is left). --simulate runs a GPU plan on the CPU (tiny shapes, the Triton kernels in the
interpreter, the GPU-only rows skipped with the reason) to rehearse it: same JSON, same code paths.

The JSON is rewritten (atomically) after every row, skip and error, so a run that is killed leaves a valid file
holding everything measured so far.

Exit status: 0 when every selected case ran or was skipped with a reason; 1 when a case failed or
a check did not pass (the JSON and report are written either way); 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import signal
import sys
import threading
import traceback
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._schema import CONV_OPS  # noqa: E402  (no torch import)

NO_GPU_BANNER = """\
=====================================================================================================
NO CUDA GPU ON THIS MACHINE: the kernel and model benchmarks need one and were NOT run.
Running the CPU checks instead: resfused.convert(resnet50) against stock (reference backend), and
reference-path timings on small shapes, labelled CPU. These are not performance numbers for the
CUDA or Triton kernels. On a GPU machine: `make bench`, or bench/gpu_check.sh.
====================================================================================================="""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Selections default to the full suite on a GPU (--quick: a subset) and "
                                       "to small shapes on CPU.")
    p.add_argument("--quick", action="store_true", help="a subset: BN kernels 1 op, 2 shapes, bf16 and fp32; "
                   "conv kernels 3 ResNet-50 convs in bf16; model suite in bf16 without the training compiles and "
                   "without compile-max-autotune (its inference compile row is freezing with mode=default)")
    p.add_argument("--plan", choices=("full", "quick", "headline", "rest"), default=None,
                   help="headline: gpu_check.sh's first bench step; rest: the quick plan's other rows, then the "
                        "compiles (default full; --quick is --plan quick)")
    p.add_argument("--simulate", action="store_true", help="run the GPU plan on the CPU: tiny shapes, Triton in the "
                   "interpreter, GPU-only rows skipped with the reason (a rehearsal, not a measurement)")
    p.add_argument("--max-cases", type=int, default=None, help="at most N cases of each kernel suite (a short "
                   "rehearsal: gpu_check.sh --simulate's rest step)")
    p.add_argument("--suite", choices=("kernel", "bn", "conv", "model", "all"), default="all",
                   help="kernel: the bn and conv kernel suites; all: those and the model suite")
    p.add_argument("--out", type=Path, default=None, help="directory for the JSON and report "
                   "(default bench/results/, bench/results/cpu/ without a GPU)")
    p.add_argument("--json", type=Path, default=None, help="exact path of the JSON (overrides --out)")
    p.add_argument("--cpu", action="store_true", help="take the no-GPU path even where a GPU exists")
    p.add_argument("--no-report", action="store_true", help="write only the JSON (bench/report.py makes the rest)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-check", action="store_true", help="do not compare each impl's result with eager (kernels) "
                   "or with the stock eval model (model inference) first")
    k = p.add_argument_group("kernel suites")
    k.add_argument("--batch", type=int, help="N of the kernel shapes, both suites (default 256 on a GPU, 2 on CPU)")
    k.add_argument("--ops", nargs="+", help="batch_norm_add_relu batch_norm_relu batch_norm_add batch_norm")
    k.add_argument("--modes", nargs="+", help="train_fwd train_fwd_bwd eval_fwd")
    k.add_argument("--shapes", nargs="+", help="CxHxW, e.g. 256x56x56 (default: ResNet-50's)")
    k.add_argument("--dtypes", nargs="+", help="bf16 fp16 (channels_last) fp32 (NCHW), BN suite")
    k.add_argument("--impls", nargs="+", help="eager compile resfused-cuda resfused-triton resfused-reference, and "
                   "cudnn-fused (conv suite only); each kernel suite runs the names it has")
    k.add_argument("--conv-layers", nargs="+", help="ResNet-50 convs of the conv suite, e.g. layer1.1.conv2 "
                   "layer2.0.conv3 (default: all 19; --quick: 3)")
    k.add_argument("--conv-dtypes", nargs="+", help="bf16 fp16 (channels_last) fp32 (NCHW), conv suite "
                   "(default: all three; --quick: bf16)")
    k.add_argument("--timer", choices=("events", "do_bench"), default="events",
                   help="GPU timer: CUDA events with rotated inputs (default) or triton.testing.do_bench")
    k.add_argument("--warmup-ms", type=float, help="GPU kernel warm-up per case (default 25, quick 10)")
    k.add_argument("--rep-ms", type=float, help="GPU kernel measurement per case (default 100, quick 40)")
    p.add_argument("--check-model", default="resnet50", help="model of the CPU conversion check (default resnet50; none: skip it)")
    m = p.add_argument_group("model suite")
    m.add_argument("--model", default="resnet50", help="torchvision model name")
    m.add_argument("--model-batch", type=int, help="default 256 on a GPU, 2 on CPU")
    m.add_argument("--image-size", type=int, help="default 224 on a GPU, 32 on CPU")
    m.add_argument("--model-dtypes", nargs="+", choices=("bf16", "fp32"),
                   help="bf16 (autocast, channels_last), fp32 (NCHW); default both on a GPU (--quick: bf16), "
                        "fp32 on CPU")
    m.add_argument("--model-modes", nargs="+", choices=("train", "infer"), default=("train", "infer"))
    m.add_argument("--model-impls", nargs="+", help="names from bench_resnet.MODEL_IMPLS")
    m.add_argument("--no-cpu-rows", dest="cpu_rows", action="store_false",
                   help="without a GPU: leave out bench/bench_cpu.py's ResNet-50 8x112x112 rows (about a minute)")
    args = p.parse_args(argv)
    if args.plan is None:
        args.plan = "quick" if args.quick else "full"
    elif args.quick and args.plan != "quick":
        p.error("--quick is --plan quick; give one of them")
    args.quick = args.plan in ("quick", "headline", "rest")
    return args


def _parse_shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(s.isdigit() and int(s) > 0 for s in parts):
        raise ValueError(f"shape must be CxHxW with positive integers, got {text!r}")
    return tuple(int(s) for s in parts)


def _summary(doc: dict, files: list) -> str:
    lines = []
    kernel = [r for r in doc["rows"] if r["suite"] == "kernel" and r.get("speedup_vs_eager")]
    for conv, what in ((False, "GB/s"), (True, "TFLOP/s")):
        by_impl: dict = {}
        for r in kernel:
            if (r["op"] in CONV_OPS) == conv:
                by_impl.setdefault((r["impl"], r["mode"]), []).append(r)
        if not by_impl:
            continue
        lines.append(f"{'conv kernel suite' if conv else 'kernel suite'} ({doc['device']}): geometric-mean speedup "
                     f"vs eager, median of cases' {what}")
        for (impl, mode), rows in sorted(by_impl.items()):
            gm = math.exp(sum(math.log(r["speedup_vs_eager"]) for r in rows) / len(rows))
            med = sorted(r["TFLOPS" if conv else "GBps"] for r in rows)[len(rows) // 2]
            lines.append(f"  {impl:20s} {mode:14s} {gm:6.2f}x  {med:8.4g} {what}  ({len(rows)} cases)")
    model = [r for r in doc["rows"] if r["suite"] == "model"]
    if model:
        lines.append(f"model suite ({model[0]['op']}, {model[0]['shape']}):")
        for r in model:
            mem = f"  peak {r['peak_mem_MiB']:.0f} MiB" if r.get("peak_mem_MiB") is not None else ""
            sp = f"  {r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else ""
            lines.append(f"  {r['mode']:5s} {r['dtype']:13s} {r['impl']:24s} {r['images_per_s']:9.1f} images/s{sp}{mem}")
    for c in doc["checks"]:
        lines.append(f"check {c['name']}: {'PASS' if c['passed'] else 'FAIL'}  {c['max_norm_rel_error']}")
    for s in doc["skipped"]:
        lines.append(f"not run: {s['suite']} {s['impl']} ({s['cases']} cases): {s['reason']}")
    for e in doc["errors"][:10]:
        where = " ".join(str(e.get(k, "")) for k in ("suite", "op", "mode", "impl", "shape", "dtype"))
        lines.append(f"ERROR {where}: {e['error'][:300]}")
    if len(doc["errors"]) > 10:
        lines.append(f"... and {len(doc['errors']) - 10} more errors (see the JSON)")
    lines += [f"wrote {f}" for f in files]
    return "\n".join(lines)


class _Terminated(BaseException):
    """SIGTERM (e.g. from `timeout`): not an Exception, so the per-case handlers let it through."""


def _on_sigterm(signum, frame):
    raise _Terminated()


SIM_TIMER = dict(warmup=0, min_reps=1, max_reps=2, budget_s=0.02)  # --simulate: rehearse the plumbing, quickly


def _tiny(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """--simulate: a ResNet-50 BN shape shrunk for the CPU (C/16, at most 7x7), still distinct per shape."""
    c, h, w = shape
    return (max(1, c // 16), min(h, 7), min(w, 7))


def _kernel_plan(kernels, gpu: bool, plan: str, simulate: bool) -> list[dict]:
    """The BN suite's selections (each a kernel_cases(**sel)) for a plan; batch filled in."""
    batch = 2 if simulate else (256 if gpu else 2)
    if plan == "headline":
        sels = [dict(s) for s in kernels.HEADLINE]
    elif plan == "rest":
        sels = [dict(ops=("batch_norm_relu", "batch_norm"), modes=("train_fwd_bwd", "eval_fwd"),
                     shapes=kernels.HEADLINE[0]["shapes"], dtypes=("bf16",)),
                dict(ops=("batch_norm_add_relu",), modes=("train_fwd",), shapes=kernels.HEADLINE[0]["shapes"],
                     dtypes=("bf16",))]
    else:
        sels = [dict(kernels.SELECTIONS[(gpu or simulate, plan == "quick")])]
    for s in sels:
        s["batch"] = batch
        if simulate:
            s["shapes"] = tuple(_tiny(sh) for sh in s["shapes"])
    return sels


def _conv_plan(convs, gpu: bool, plan: str, simulate: bool) -> dict:
    if plan == "headline":
        sel = dict(layers=convs.QUICK_LAYERS, dtypes=("bf16",), batch=256)
    elif plan == "rest":
        sel = dict(layers=tuple(l for l in convs.LAYERS if l not in convs.QUICK_LAYERS), dtypes=("bf16",), batch=256)
    else:
        sel = dict(convs.SELECTIONS[(gpu or simulate, plan == "quick")])
    if simulate:
        sel["batch"] = 2
    return sel


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.simulate:  # before anything imports triton
        import os
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("RESFUSED_TRITON_AUTOTUNE", "0")
    import torch

    from resfused import _backend

    gpu = torch.cuda.is_available() and not args.cpu and not args.simulate
    if not gpu and not args.simulate:
        print(NO_GPU_BANNER, flush=True)

    from bench import _harness
    from bench import bench_bn_add_relu as kernels
    from bench import bench_conv_bias_act as convs
    from bench import bench_resnet as models

    _harness.SIMULATE = args.simulate
    device = torch.device("cuda" if gpu else "cpu")
    if gpu:
        torch.backends.cudnn.benchmark = True
        print(f"resfused benchmarks on {_harness.device_name(device)} (plan {args.plan})", flush=True)
    elif args.simulate:
        print(f"SIMULATE: the {args.plan} plan on the CPU (tiny shapes, Triton in the interpreter); not a measurement",
              flush=True)

    sels = _kernel_plan(kernels, gpu, args.plan, args.simulate)
    try:
        for sel in sels:
            for name in ("ops", "modes", "dtypes"):
                if getattr(args, name):
                    sel[name] = tuple(getattr(args, name))
            if args.shapes:
                sel["shapes"] = tuple(_parse_shape(s) for s in args.shapes)
            if args.batch:
                sel["batch"] = args.batch
        cases = [c for sel in sels for c in kernels.kernel_cases(**sel)]
        cases = list(dict.fromkeys(cases))  # --ops/--shapes overrides can make the selections overlap
        conv_sel = _conv_plan(convs, gpu, args.plan, args.simulate)
        if args.conv_layers:
            conv_sel["layers"] = tuple(args.conv_layers)
        if args.conv_dtypes:
            conv_sel["dtypes"] = tuple(args.conv_dtypes)
        if args.batch:
            conv_sel["batch"] = args.batch
        conv_cases = convs.conv_cases(**conv_sel)
        if args.simulate:
            conv_cases = [convs.shrunk(c) for c in conv_cases]
        if args.max_cases is not None:
            cases, conv_cases = cases[:args.max_cases], conv_cases[:args.max_cases]
    except ValueError as e:
        print(f"bench/run.py: {e}", file=sys.stderr)
        return 2
    if args.impls:
        impls = tuple(i for i in args.impls if i in kernels.CPU_IMPLS)
        conv_impls = tuple(i for i in args.impls if i in convs.CPU_IMPLS)
    else:
        impls = kernels.GPU_IMPLS if (gpu or args.simulate) else kernels.CPU_IMPLS
        conv_impls = convs.GPU_IMPLS if (gpu or args.simulate) else convs.CPU_IMPLS
        if args.plan == "headline":  # cuDNN + separate ops is the baseline; compile's conv rows are in the rest
            conv_impls = tuple(i for i in conv_impls if i != "compile")
    unknown = [i for i in args.impls or () if i not in kernels.CPU_IMPLS + convs.CPU_IMPLS]
    unknown += [i for i in args.model_impls or () if i not in {m.name for m in models.MODEL_IMPLS}]
    if unknown:
        print(f"bench/run.py: unknown implementation(s) {unknown}; kernel: {list(kernels.CPU_IMPLS)}, "
              f"conv: {list(convs.CPU_IMPLS)}, model: {sorted({m.name for m in models.MODEL_IMPLS})}", file=sys.stderr)
        return 2

    if gpu:
        warm = args.warmup_ms or (10.0 if args.quick else 25.0)
        rep = args.rep_ms or (40.0 if args.quick else 100.0)
        kernel_timer = (_harness.DoBenchTimer(warm, rep) if args.timer == "do_bench"
                        else _harness.CudaEventTimer(warm, rep))
        model_timer = _harness.CudaEventTimer(warmup_ms=300 if args.quick else 1000, rep_ms=1500 if args.quick else 4000,
                                              min_reps=5 if args.quick else 10, max_reps=50, prefill=False)
    elif args.simulate:
        kernel_timer = model_timer = _harness.WallTimer(**SIM_TIMER)
    else:
        kernel_timer = _harness.WallTimer(warmup=1, min_reps=3, max_reps=20, budget_s=0.1 if args.quick else 0.15)
        model_timer = _harness.WallTimer(warmup=0, min_reps=2, max_reps=3, budget_s=0.5)

    small = not gpu
    model_cfgs = [models.ModelConfig(model=args.model, batch=args.model_batch or (2 if small else 256),
                                     image_size=args.image_size or (32 if small else 224), dtype=dt)
                  for dt in args.model_dtypes or ((("bf16",) if args.quick else ("bf16", "fp32"))
                                                  if (gpu or args.simulate) else ("fp32",))]
    model_impls, left_out = models.select_impls(args.model_impls, args.model_modes, args.quick,
                                                plan=args.plan if args.plan in ("headline", "rest") else None)

    copy_bw = _harness.copy_bandwidth_GBps(device, kernel_timer, nbytes=(1 << 20) if args.simulate else None)
    doc = _harness.new_result(
        device, copy_bw, complete=False, quick=args.quick, plan=args.plan, simulate=args.simulate, suite=args.suite,
        argv=list(sys.argv[1:] if argv is None else argv),
        timer={"kernel": kernel_timer.describe(), "model": model_timer.describe()},
        bytes_model=kernels.BYTES_MODEL, conv_model=convs.CONV_MODEL,
        cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
        cudnn_allow_tf32=_backend.cudnn_conv_allows_tf32(),
        triton_autotune=_backend_triton_autotune(),
        kernel_selection=[{k: list(v) if isinstance(v, tuple) else v for k, v in sel.items()} for sel in sels],
        conv_selection={k: list(v) if isinstance(v, tuple) else v for k, v in conv_sel.items()},
        model_configs=[dataclasses.asdict(c) for c in model_cfgs])
    if args.simulate:
        doc["notes"].append("SIMULATE: a rehearsal of the GPU plan on the CPU (tiny shapes, Triton in the "
                            "interpreter); the times are not measurements of anything.")
    out_dir = args.out or (_harness.RESULTS_DIR if gpu else _harness.CPU_RESULTS_DIR)
    tag = {"full": "", "quick": "quick"}.get(args.plan, args.plan) + ("-simulate" if args.simulate else "")
    path = _harness.attach_sink(doc, args.json or _harness.default_json_path(doc, out_dir, tag.strip("-")))
    print(f"copy bandwidth: {copy_bw:.1f} GB/s ({device.type}); results: {path} (rewritten after every row)",
          flush=True)
    if not gpu and not args.simulate:
        doc["notes"].append(_harness.CPU_NOTE)
    if not gpu and not args.simulate and args.check_model != "none":
        print(f"conversion check: resfused.convert({args.check_model}) vs stock on CPU (reference backend) ...",
              flush=True)
        try:
            check = models.conversion_check(model_name=args.check_model)
        except Exception as e:
            check = {"name": f"convert({args.check_model}) vs stock", "passed": False, "max_norm_rel_error": {},
                     "error": f"{type(e).__name__}: {e}"}
        doc["checks"].append(check)
        _harness.flush(doc)
        print(f"  {'PASS' if check['passed'] else 'FAIL'}: {check.get('max_norm_rel_error')}", flush=True)

    show = not args.no_progress
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        for phase in _phases(args, impls, model_impls):
            kind, chosen = phase
            if kind == "bn":
                kernels.run_kernel_suite(doc, cases, chosen, device, kernel_timer, show_progress=show,
                                         check=not args.no_check)
            elif kind == "conv":
                convs.run_conv_suite(doc, conv_cases, conv_impls, device, kernel_timer, show_progress=show,
                                     check=not args.no_check)
            else:
                models.run_model_suite(doc, model_cfgs, chosen, device, model_timer, show_progress=show,
                                       warmup_steps=2 if gpu else 1, check=not args.no_check)
        if args.suite in ("model", "all"):
            for impl, reason in left_out:
                for cfg in model_cfgs:
                    _harness.add_skipped(doc, "model", impl.name, reason, f"{impl.mode} {cfg.row_dtype}")
        if gpu:  # on a GPU every resfused row (but the reference oracle's) must run: a missing backend fails the run
            for s in doc["skipped"]:
                if s["impl"].startswith("resfused") and not s["impl"].endswith("reference"):
                    doc["errors"].append({"suite": s["suite"], "impl": s["impl"],
                                          "error": f"not run on a GPU ({s['cases']} cases): {s['reason']}"})
        if not gpu and not args.simulate and args.cpu_rows and args.suite in ("model", "all"):
            from bench import bench_cpu  # ResNet-50 fp32 8x112x112 on CPU: stock, convert, fused, jit anchor
            print("CPU model rows (bench/bench_cpu.py): resnet50 fp32 8x3x112x112 ...", flush=True)
            bench_cpu.run_cpu_rows(doc, show_progress=show)
    except (_Terminated, KeyboardInterrupt) as e:  # keep what was measured; the run still fails
        what = "SIGTERM (a timeout?)" if isinstance(e, _Terminated) else "Ctrl-C"
        doc["notes"].append(f"Interrupted by {what}: partial results.")
        doc["errors"].append({"suite": "run", "error": f"interrupted by {what} after {len(doc['rows'])} rows"})
        print(f"\ninterrupted by {what}: writing the {len(doc['rows'])} rows measured so far", file=sys.stderr)
    except Exception as e:  # a bug outside the per-case handlers: keep the rows, report it, fail
        traceback.print_exc()
        doc["errors"].append({"suite": "run", "error": f"{type(e).__name__}: {e}"})
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)

    doc["complete"] = True
    files = [_harness.flush(doc)]
    if not args.no_report:
        from bench import report
        try:
            files += report.write_report(files[0])
        except Exception as e:  # the JSON is the result; a failed plot must not lose it, but is reported
            doc["errors"].append({"suite": "report", "error": f"{type(e).__name__}: {e}"})
            _harness.flush(doc)
            print(f"report failed: {type(e).__name__}: {e}", file=sys.stderr)
    print(_summary(doc, files), flush=True)
    failed = bool(doc["errors"]) or not all(c["passed"] for c in doc["checks"])
    return 1 if failed else 0


def _phases(args, impls, model_impls) -> list:
    """The order the suites run in: [(suite, impls)]. Compiles come late (their first call per case compiles for
    seconds): headline runs BN, conv, the model rows but the fused-conv training ones, the BN compile rows, then the
    fused-conv training rows (their warm-up compiles or plans every conv of ResNet-50); other plans run BN (compile
    last), conv, model (fused-conv training rows last, as MODEL_IMPLS orders them). A timeout keeps every row
    measured before it."""
    bn = args.suite in ("kernel", "bn", "all")
    conv = args.suite in ("kernel", "conv", "all")
    model = args.suite in ("model", "all")
    plain, compiled = [i for i in impls if i != "compile"], [i for i in impls if i == "compile"]
    convbn = [m for m in model_impls if "convbn" in m.name]
    other = [m for m in model_impls if "convbn" not in m.name]
    if args.plan == "headline":
        phases = [("bn", plain), ("conv", None), ("model", other), ("bn", compiled), ("model", convbn)]
    else:
        phases = [("bn", plain), ("bn", compiled), ("conv", None), ("model", other + convbn)]
    wanted = {"bn": bn, "conv": conv, "model": model}
    return [(k, v) for k, v in phases if wanted[k] and (v is None or v)]


def _backend_triton_autotune() -> str:
    import os
    return "off (RESFUSED_TRITON_AUTOTUNE=0)" if os.environ.get("RESFUSED_TRITON_AUTOTUNE", "1") in ("", "0") else "on"


if __name__ == "__main__":
    sys.exit(main())
