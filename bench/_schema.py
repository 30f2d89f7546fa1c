"""The benchmark result document: schema, validation, derived columns, file names. No torch import,
so bench/report.py runs wherever the JSON is.

Schema (../shared/CONVENTIONS.md, Benchmarks): top-level device, torch, triton, cuda, cudnn, git_sha,
timestamp, copy_bandwidth_GBps, rows; a row has suite ("kernel" or "model"), op, mode, impl, shape,
dtype, layout, p20_ms, p50_ms, p80_ms and, where they apply, GBps (kernel rows), images_per_s and
peak_mem_MiB (model rows). Added here: TFLOPS on the fused-conv kernel rows (ops in CONV_OPS), speedup_vs_eager
and frac_copy_bw per row, speedup_vs_cudnn_fused on fused-conv rows, and top-level
``skipped`` (an implementation that could not run, with the reason and how many cases), ``errors``
(a case that failed, with the message), ``checks`` and ``notes``, plus the run's settings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
CPU_RESULTS_DIR = RESULTS_DIR / "cpu"  # CPU runs are not results to commit (bench/.gitignore)

TOP_KEYS = ("device", "torch", "triton", "cuda", "cudnn", "git_sha", "timestamp", "copy_bandwidth_GBps", "rows")
ROW_KEYS = ("suite", "op", "mode", "impl", "shape", "dtype", "layout", "p20_ms", "p50_ms", "p80_ms")
SUITES = ("kernel", "model")
# The fused-conv kernel suite's ops (bench/bench_conv_bias_act.py): their rows also carry TFLOPS.
CONV_OPS = ("conv_bias_relu", "conv_bias_add_relu", "conv_bias_shortcut_add_relu")

CPU_NOTE = ("CPU run (no CUDA device): reference-path timings on small shapes. These are not GPU "
            "performance numbers and say nothing about the CUDA or Triton kernels.")


SINK_KEY = "_sink"  # a document's file while it is being filled (not written into the JSON)


def attach_sink(doc: dict, path: Path) -> Path:
    """From now on every add_row / add_skipped / add_error rewrites ``path`` (atomically), so a run that is
    killed (SIGKILL, a crash, the device's time limit) leaves a valid JSON holding every row done so far."""
    doc[SINK_KEY] = Path(path)
    return flush(doc)


def flush(doc: dict) -> Optional[Path]:
    """Rewrite the document's sink file, derived columns included (no-op without a sink)."""
    path = doc.get(SINK_KEY)
    if path is None:
        return None
    add_derived(doc)
    return write_result(doc, path)


def add_row(doc: dict, row: dict) -> None:
    doc["rows"].append(row)
    flush(doc)


def add_skipped(doc: dict, suite: str, impl: str, reason: str, what: str = "") -> None:
    """Record that ``impl`` did not run (once per suite/impl/reason, counting the cases)."""
    for s in doc["skipped"]:
        if (s["suite"], s["impl"], s["reason"]) == (suite, impl, reason):
            s["cases"] += 1
            break
    else:
        doc["skipped"].append({"suite": suite, "impl": impl, "reason": reason, "cases": 1, "first_case": what})
    flush(doc)


def add_error(doc: dict, fields: dict, exc: BaseException) -> None:
    msg = f"{type(exc).__name__}: {exc}"
    doc["errors"].append({**fields, "error": msg[:2000]})
    flush(doc)


def _baseline_key(row: dict) -> tuple:
    """Rows compared with each other: the same case under the same precision regime (a model row's
    param_dtype: bf16 parameters are compared with stock at bf16 parameters, autocast with autocast)."""
    return tuple(row.get(k) for k in ("suite", "op", "mode", "shape", "dtype", "layout", "param_dtype"))


def add_derived(doc: dict) -> None:
    """Fill each row's speedup_vs_eager (eager p50 / this p50, same case), on fused-conv rows
    speedup_vs_cudnn_fused (the same against torch.cudnn_convolution_add_relu's row) and, for rows with
    GBps, frac_copy_bw (GBps / the copy bandwidth measured in the same run)."""
    eager = {_baseline_key(r): r["p50_ms"] for r in doc["rows"] if r["impl"] == "eager"}
    fused = {_baseline_key(r): r["p50_ms"] for r in doc["rows"] if r["impl"] == "cudnn-fused"}
    copy_bw = doc.get("copy_bandwidth_GBps")
    for r in doc["rows"]:
        base = eager.get(_baseline_key(r))
        r["speedup_vs_eager"] = (base / r["p50_ms"]) if base and r["p50_ms"] > 0 else None
        if r["suite"] == "kernel" and r["op"] in CONV_OPS:
            base = fused.get(_baseline_key(r))
            r["speedup_vs_cudnn_fused"] = (base / r["p50_ms"]) if base and r["p50_ms"] > 0 else None
        if r.get("GBps") is not None and copy_bw:
            r["frac_copy_bw"] = r["GBps"] / copy_bw


def validate(doc: dict) -> list[str]:
    """Problems with a result document against the CONVENTIONS schema (empty when it is valid)."""
    problems = [f"missing top-level key {k!r}" for k in TOP_KEYS if k not in doc]
    rows = doc.get("rows")
    if not isinstance(rows, list):
        return problems + ["rows is not a list"]
    for i, r in enumerate(rows):
        missing = [k for k in ROW_KEYS if k not in r]
        if missing:
            problems.append(f"row {i} misses {missing}")
            continue
        if r["suite"] not in SUITES:
            problems.append(f"row {i}: suite {r['suite']!r} is not one of {SUITES}")
        ps = [r["p20_ms"], r["p50_ms"], r["p80_ms"]]
        if not all(isinstance(p, (int, float)) and p > 0 for p in ps):
            problems.append(f"row {i}: times must be positive numbers, got {ps}")
        elif not ps[0] <= ps[1] <= ps[2]:
            problems.append(f"row {i}: expected p20 <= p50 <= p80, got {ps}")
        if r["suite"] == "kernel" and not isinstance(r.get("GBps"), (int, float)):
            problems.append(f"row {i}: a kernel row needs GBps")
        if r["suite"] == "kernel" and r["op"] in CONV_OPS and not isinstance(r.get("TFLOPS"), (int, float)):
            problems.append(f"row {i}: a fused-conv kernel row ({r['op']}) needs TFLOPS")
        if r["suite"] == "model" and not isinstance(r.get("images_per_s"), (int, float)):
            problems.append(f"row {i}: a model row needs images_per_s")
    for k in ("skipped", "errors", "checks"):
        if k in doc and not isinstance(doc[k], list):
            problems.append(f"{k} is not a list")
    return problems


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:40] or "device"


def default_json_path(doc: dict, out_dir: Path, tag: str = "") -> Path:
    stamp = doc["timestamp"].replace("-", "").replace(":", "")
    dev = "cpu" if doc.get("device_type") == "cpu" else _slug(doc["device"].split(" (")[0])
    return Path(out_dir) / f"{stamp}-{dev}{'-' + tag if tag else ''}.json"


def write_result(doc: dict, path: Path) -> Path:
    problems = validate(doc)
    if problems:
        raise ValueError("result document does not match the schema: " + "; ".join(problems[:5]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    body = {k: v for k, v in doc.items() if k != SINK_KEY}
    tmp.write_text(json.dumps(body, indent=1, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
    return path


def load_result(path: Path) -> dict:
    doc = json.loads(Path(path).read_text())
    problems = validate(doc)
    if problems:
        raise ValueError(f"{path}: not a benchmark result: " + "; ".join(problems[:5]))
    return doc


