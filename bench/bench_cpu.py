"""CPU model rows: ResNet-50 fp32 at batch 8, 112x112 on the CPU, stock against resfused, ratios from one run.

    python -m bench.bench_cpu [--batch 8] [--image-size 112] [--rounds 7] [--summary]   (OMP_NUM_THREADS=2 here)

Rows (suite "model", dtype fp32, layout nchw: NCHW input images, as a CPU user feeds them):
  train  eager                        stock torchvision model, one SGD step (forward, loss, backward, step)
         resfused                     resfused.convert(model): on CPU its BN + add + ReLU run "native"
                                      (aten's batch norm + in-place add_/relu_, resfused/ops/bn_add_relu.py)
  infer  eager                        stock model, eval, torch.no_grad()
         resfused                     resfused.convert(model), eval
         resfused-fused               resfused.fuse_for_inference(model): BN folded, oneDNN fused convs
                                      ("mkldnn", resfused/_cpu/conv_bias_act.py)
         jit-optimize-for-inference   torch.jit.optimize_for_inference(torch.jit.script(model)): the anchor,
                                      what a CPU user would pick instead (oneDNN convs, BN folded, fused ReLU/add)
The implementations of one mode are timed interleaved, one step of each per round, for ``rounds`` rounds after
a warm-up step each: the machine's background load then hits every implementation alike, and each row's p50
is the median of its rounds (p20/p80 give the run-to-run spread). Ratios (``speedup_vs_eager``) are p50s of
the same run. Before timing, every infer implementation's logits are checked against the stock eval model's.

``bench/run.py`` adds these rows to its no-GPU run (``make bench`` on a CPU-only machine); ``--summary`` writes
bench/results/cpu-summary/<stamp>.json and .md (machine, torch, git SHA, threads, the rows and ratios): the
committed CPU result.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench import bench_resnet as models  # noqa: E402

SUMMARY_DIR = Path(__file__).resolve().parent / "results" / "cpu-summary"


def _fuse_auto(model: nn.Module) -> nn.Module:
    import resfused
    return resfused.fuse_for_inference(model)


def _jit_anchor(model: nn.Module) -> nn.Module:
    return torch.jit.optimize_for_inference(torch.jit.script(model.eval()))


CPU_IMPLS: list[models.ModelImpl] = [
    models.ModelImpl("eager", "train", models._stock),
    models.ModelImpl("resfused", "train", models._convert),
    models.ModelImpl("eager", "infer", models._stock),
    models.ModelImpl("resfused", "infer", models._convert),
    models.ModelImpl("resfused-fused", "infer", _fuse_auto),
    models.ModelImpl("jit-optimize-for-inference", "infer", _jit_anchor),
]

# What each row's implementation resolves to on CPU float32 (the row's ``backend``).
_BACKENDS = {"resfused": "native", "resfused-fused": "mkldnn"}


def cpu_name() -> str:
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {model or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def run_cpu_rows(doc: dict, batch: int = 8, image_size: int = 112, rounds: int = 7, show_progress: bool = True,
                 modes: Sequence[str] = ("train", "infer"), impls: Optional[Sequence[str]] = None) -> None:
    """Append the CPU model rows (module docstring) to ``doc``; a failing implementation is an error entry."""
    from bench import _gate, _harness

    device = torch.device("cpu")
    cfg = models.ModelConfig(batch=batch, image_size=image_size, dtype="fp32")
    ref = models.reference_logits(cfg, device)
    for mode in modes:
        chosen = [i for i in CPU_IMPLS if i.mode == mode and (not impls or i.name in impls)]
        steps = {}
        for impl in chosen:
            fields = {**cfg.row_fields(mode), "impl": impl.name}
            try:
                step, _ = models.make_model_step(impl, cfg, device)
                out = step(0)  # warm-up (jit: profiling run; oneDNN: primitive creation)
                if mode == "infer":  # the correctness gate of the GPU model rows (bench/_gate.py)
                    fields["gate"] = _gate.check_model(out, ref["fp64"], ref["autocast"])
                steps[impl.name] = (step, fields)
            except Exception as e:
                _harness.add_error(doc, fields, e)
        samples: dict = {name: [] for name in steps}
        for r in range(rounds):
            for name, (step, _) in steps.items():
                t0 = time.perf_counter()
                step(r + 1)
                samples[name].append((time.perf_counter() - t0) * 1e3)
            if show_progress:
                print(f"  cpu {mode} round {r + 1}/{rounds}: " + ", ".join(
                    f"{n} {s[-1]:.0f} ms" for n, s in samples.items()), flush=True)
        for name, (_, fields) in steps.items():
            t = _harness.Timing.from_samples(samples[name])
            row = {**fields, "p20_ms": t.p20_ms, "p50_ms": t.p50_ms, "p80_ms": t.p80_ms,
                   "images_per_s": batch / (t.p50_ms * 1e-3), "reps": t.reps, "device_type": "cpu",
                   "param_dtype": "float32", "threads": torch.get_num_threads(), "timing": "interleaved rounds",
                   "samples_ms": [round(s, 2) for s in samples[name]]}
            if name in _BACKENDS:
                row["backend"] = _BACKENDS[name]
            _harness.add_row(doc, row)
        steps = samples = None


def _markdown(doc: dict, rows: list) -> str:
    lines = [f"# CPU model benchmark ({rows[0]['op']}, {rows[0]['shape']}, fp32)", "",
             f"- machine: {doc['machine']}", f"- torch {doc['torch']}, {doc['threads']} threads "
             f"(OMP_NUM_THREADS={doc['omp_num_threads']}), oneDNN {doc['mkldnn']}",
             f"- git SHA {doc['git_sha']}{' (dirty tree)' if doc.get('git_dirty') else ''}, {doc['timestamp']}",
             f"- {doc['timing']}", "",
             "| mode | impl | backend | p20 ms | p50 ms | p80 ms | images/s | vs eager |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        sp = f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else "—"
        lines.append(f"| {r['mode']} | {r['impl']} | {r.get('backend', '')} | {r['p20_ms']:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['p80_ms']:.1f} | {r['images_per_s']:.1f} | {sp} |")
    return "\n".join(lines) + "\n"


def write_summary(doc: dict, out_dir: Path = SUMMARY_DIR) -> list[Path]:
    """bench/results/cpu-summary/<stamp>.json + .md from a document holding run_cpu_rows' rows."""
    stamp = doc["timestamp"].replace(":", "").replace("-", "")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stamp}.json", out_dir / f"{stamp}.md"]
    paths[0].write_text(json.dumps(doc, indent=1) + "\n")
    paths[1].write_text(_markdown(doc, doc["rows"]))
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/bench_cpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--modes", nargs="+", choices=("train", "infer"), default=("train", "infer"))
    p.add_argument("--summary", action="store_true", help="write bench/results/cpu-summary/<stamp>.json and .md")
    args = p.parse_args(argv)
    from bench import _harness

    doc = _harness.new_result(torch.device("cpu"), None, suite="cpu-model")
    doc.update(machine=cpu_name(), threads=torch.get_num_threads(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
               mkldnn=torch.backends.mkldnn.is_available(),
               timing=f"{args.rounds} interleaved rounds per mode after one warm-up step each; p50 = median of rounds")
    run_cpu_rows(doc, args.batch, args.image_size, args.rounds, modes=args.modes)
    _harness.add_derived(doc)
    for r in doc["rows"]:
        sp = f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else ""
        print(f"{r['mode']:5s} {r['impl']:28s} p20 {r['p20_ms']:7.1f}  p50 {r['p50_ms']:7.1f}  "
              f"p80 {r['p80_ms']:7.1f} ms  {sp}")
    for e in doc["errors"]:
        print(f"ERROR {e}")
    if args.summary:
        for path in write_summary(doc):
            print(f"wrote {path}")
    return 1 if doc["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
