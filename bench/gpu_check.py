"""bench/gpu_check.sh: the one prepared check for a lent GPU machine (one H100, 15 device-minutes in all, machine
start included, at most 600 s a command, no network, results back only as at most 8 files under $OUT).

    [OUT=dir] [GIT_SHA=sha] [PYTHON=python3] bash bench/gpu_check.sh [--simulate | --dry-run | --plan | --stamp]

The plan, ordered by value, every step time-boxed; the caps sum to BUDGET_S (420 s), so after the first call
(about 2-3 minutes of machine start, then at most 420 s) one rerun of a failed part still fits the loan:

    step            cap   what
    preflight        15   versions, nvidia-smi, torch.cuda.is_available(); no device: abort with one clear line
    build           100   pip install --no-build-isolation --no-deps -e . building resfused._C for the local GPU
    build-fallback   15   only when build failed: reinstall pure Python (RESFUSED_SKIP_CUDA_BUILD=1) so the
                          Triton rows and tests still run; the build failure stays a failure
    info             10   python -m resfused: the cuda and triton backends and the conv ops must be there
    bench-headline  150   bench/run.py --plan headline (autotuning off): BN kernels, 3 fused convs, ResNet-50
    report            5   bench/report.py: markdown + 2 plots of the headline JSON
    tests            60   pytest -m cuda (per-test timeout, xdist), compile and distributed tests left out
    memcheck         15   compute-sanitizer memcheck on the BN kernels (bench/sanitize_case.py --group bn)
    racecheck        15   compute-sanitizer racecheck on the BN kernels
    memcheck-conv    10   compute-sanitizer memcheck on the conv ops (conv_bias_act, conv_bn), small cases
    bench-rest       25+  bench/run.py --plan rest (autotuning on): the other rows, compiles last; it also gets
                          every second the steps before it left unused
    tests-rest        0+  the backend-parametrized, compile and distributed tests, on whatever time is left

A step's limit is min(its cap, what is left of the budget minus the caps of the steps after it); steps marked
+ extend into time left unused. Every step runs even after an earlier one failed (except after a failed
preflight). The plan is printed first, the step table last.

Nothing is lost: $OUT/gpu_check.json ({"steps": [{"name", "cap_s", "status", "seconds", "rc", "log_tail"}, ...]}
in run order, pending steps included) is rewritten after every step, the bench JSONs after every row, and the
step logs are archived into $OUT/logs.tar.gz after every step. What $OUT holds (7 files, within the 8 that
come back): gpu_check.json, bench-headline.json, bench-headline.md, bench-headline-speedup.png,
bench-headline-conv-speedup.png, bench-rest.json, logs.tar.gz.

--simulate  the same plan on this CPU machine: tiny shapes, TRITON_INTERPRET=1, the GPU-only steps (build,
            tests, sanitizers) reported SKIPPED with the reason; writes the same files. `make test` runs it.
--dry-run   runs no step: imports torch, triton and resfused, checks each step's tools and files, writes the
            git-SHA stamp (.git-sha) for a device run to carry, prints the plan; exit 1 when a step could not run.
--plan      prints the plan and exits.
--stamp     writes the git-SHA stamp .git-sha and exits: what the git hooks of `make hooks` run after every
            commit, checkout and merge, so the stamp is current whenever the tree is copied to a device.

The git SHA: $GIT_SHA, else `git rev-parse HEAD`, else the stamp file .git-sha (a device copy has no .git: carry
it, or pass GIT_SHA). Exit status: 0 when every step passed (simulate: when none failed), 1 otherwise, 2 for
bad usage. Knobs: GPU_CHECK_BUDGET_S, GPU_CHECK_CAP_<STEP>_S (e.g. GPU_CHECK_CAP_TESTS_S=90),
GPU_CHECK_STEPS (comma-separated names to run; the others are listed as "-"), GPU_CHECK_TEST_WORKERS (8).
This file imports no torch: a broken torch is reported by the steps, not by the orchestrator.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 420
MAX_OUT_FILES = 8
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
LOG_TAIL_CHARS = 2000
PREFLIGHT_NO_DEVICE = 3  # preflight's exit status when torch sees no CUDA device


@dataclasses.dataclass
class Step:
    name: str
    cap_s: int
    what: str
    cmd: Callable[["Check"], list]      # the argv (run under bash -c when it is one string)
    gpu_only: bool = False              # --simulate reports it SKIPPED
    extends: bool = False               # also gets the time the steps before it left unused
    when: Callable[["Check"], Optional[str]] = lambda c: None  # a reason not to run it ("-": not needed)
    env: Callable[["Check"], dict] = lambda c: {}


PREFLIGHT = r"""
import importlib.metadata as md, os, platform, shutil, subprocess, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "torchvision", "numpy", "pytest", "pytest-xdist", "pytest-timeout", "matplotlib"):
    try:
        print(f"{name:15s}", md.version(name))
    except md.PackageNotFoundError:
        print(f"{name:15s} MISSING")
import torch
print("torch cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
smi = shutil.which("nvidia-smi")
if smi:
    subprocess.run([smi, "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,memory.total,power.limit",
                    "--format=csv"], check=False)
if not torch.cuda.is_available():
    print("NO CUDA DEVICE: torch.cuda.is_available() is False" + ("" if smi else " and there is no nvidia-smi"))
    sys.exit(0 if os.environ.get("GPU_CHECK_SIMULATE") == "1" else %d)
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
""" % PREFLIGHT_NO_DEVICE

INFO = r"""
import os, runpy, sys
runpy.run_module("resfused", run_name="__main__")  # python -m resfused: versions, backends, why one is missing
import resfused
print("available backends:", resfused.available_backends())
need = ["triton"] if os.environ.get("GPU_CHECK_NO_C") else ["cuda", "triton"]
problems = [f"{b.name}: {b.reason}" for b in resfused.backends() if b.name in need and not b.available]
if "cuda" in need and not problems:  # _C's conv ops too, not only the BN kernels
    from resfused.ops import conv_bias_act, conv_bn
    problems += [f"cuda {op}: {why}" for op, why in (("conv_bias_act", conv_bias_act.cuda_op_reason()),
                                                      ("conv_bn", conv_bn.cuda_op_reason())) if why is not None]
if problems:
    sys.exit("on a GPU these must be available: " + "; ".join(problems))
"""


def _sanitizer(c: "Check") -> str:
    found = shutil.which("compute-sanitizer")
    return found or str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "compute-sanitizer")


def _pytest(c: "Check", selection: list, timeout_s: int) -> list:
    args = [c.python, "-m", "pytest", "tests", "-v", "-rfE", "-p", "no:cacheprovider", "--durations=10", *selection]
    if c.has_module("pytest_timeout"):
        args += [f"--timeout={timeout_s}"]
    if c.workers and c.has_module("xdist"):
        args += ["-n", str(c.workers)]
    return args


# Tests left to tests-rest: Inductor compiles of whole models and multi-process gloo/NCCL runs.
HEAVY_TESTS = ("tests/test_compile.py", "tests/test_distributed.py")


def _bench(c: "Check", plan: str) -> list:
    args = [c.python, "bench/run.py", "--plan", plan, "--no-report", "--no-progress", "--json",
            str(c.out / f"bench-{plan}.json")]
    if c.simulate:  # the CPU rehearsal: a small model in fp32 (bf16 convs are slow on a CPU), a short rest plan
        args += ["--simulate", "--model", "resnet18", "--model-dtypes", "fp32"]
        args += ["--max-cases", "2"] if plan == "rest" else []
    return args


def _report(c: "Check") -> list:
    return [c.python, "bench/report.py", str(c.out / "bench-headline.json"), "--plots", "speedup,conv-speedup"]


PLAN = [
    Step("preflight", 15, "versions, nvidia-smi, torch.cuda.is_available(); abort without a device",
         lambda c: [c.python, "-c", PREFLIGHT]),
    Step("build", 100, "pip install --no-build-isolation --no-deps -e . (RESFUSED_FORCE_CUDA_BUILD=1, this GPU's arch)",
         lambda c: [c.python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], gpu_only=True,
         env=lambda c: {"RESFUSED_FORCE_CUDA_BUILD": "1", "MAX_JOBS": str(os.cpu_count() or 4),
                        **({"TORCH_CUDA_ARCH_LIST": c.arch} if c.arch else {})}),
    Step("build-fallback", 15, "only after a failed build: pure-Python reinstall so Triton still runs",
         lambda c: [c.python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], gpu_only=True,
         when=lambda c: None if c.status_of("build") in ("FAIL", "TIMEOUT") else "-",
         env=lambda c: {"RESFUSED_SKIP_CUDA_BUILD": "1"}),
    Step("info", 10, "python -m resfused; cuda and triton backends and the conv ops present",
         lambda c: [c.python, "-c", INFO],
         env=lambda c: {"GPU_CHECK_NO_C": "1"} if c.simulate or c.status_of("build-fallback") == "PASS" else {}),
    Step("bench-headline", 150, "bench/run.py --plan headline (RESFUSED_TRITON_AUTOTUNE=0): BN kernels, 3 fused "
         "convs, ResNet-50 train/infer", lambda c: _bench(c, "headline"), env=lambda c: {"RESFUSED_TRITON_AUTOTUNE": "0"}),
    Step("report", 5, "bench/report.py on the headline JSON: markdown + 2 plots", _report,
         when=lambda c: None if (c.out / "bench-headline.json").exists() else "no headline JSON to report on"),
    Step("tests", 60, "pytest -m cuda, per-test timeout 30 s, xdist; compile and distributed tests left out",
         lambda c: _pytest(c, ["-m", "cuda"] + [f"--ignore={t}" for t in HEAVY_TESTS], 30), gpu_only=True,
         env=lambda c: {"RESFUSED_TRITON_AUTOTUNE": "0"}),
    Step("memcheck", 15, "compute-sanitizer --tool memcheck, BN kernels",
         lambda c: [_sanitizer(c), "--tool", "memcheck", "--error-exitcode", "86", "--print-limit", "50", c.python,
                    "bench/sanitize_case.py", "--group", "bn"], gpu_only=True,
         env=lambda c: {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}),
    Step("racecheck", 15, "compute-sanitizer --tool racecheck, BN kernels",
         lambda c: [_sanitizer(c), "--tool", "racecheck", "--error-exitcode", "86", "--print-limit", "50", c.python,
                    "bench/sanitize_case.py", "--group", "bn"], gpu_only=True),
    Step("memcheck-conv", 10, "compute-sanitizer --tool memcheck, conv_bias_act and conv_bn ops (small cases)",
         lambda c: [_sanitizer(c), "--tool", "memcheck", "--error-exitcode", "86", "--print-limit", "50", c.python,
                    "bench/sanitize_case.py", "--group", "conv"], gpu_only=True,
         env=lambda c: {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}),
    Step("bench-rest", 25, "bench/run.py --plan rest (autotuning on): the other quick rows, then the compiles",
         lambda c: _bench(c, "rest"), extends=True),
    Step("tests-rest", 0, "pytest: the tests the tests step left out (backend-parametrized, compile, distributed)",
         lambda c: _pytest(c, ["-m", "not cuda"], 60), gpu_only=True, extends=True,
         env=lambda c: {"RESFUSED_TRITON_AUTOTUNE": "0"}),
]
STEP_NAMES = [s.name for s in PLAN]


def plan_sum(plan=PLAN) -> int:
    return sum(s.cap_s for s in plan)


def print_plan(budget: int, out=sys.stdout) -> None:
    print(f"gpu_check plan (budget {budget} s; caps sum to {plan_sum()} s; + extends into unused time):", file=out)
    for s in PLAN:
        tags = ", GPU only" if s.gpu_only else ""
        print(f"  {s.name:15s} {s.cap_s:4d}{'+' if s.extends else ' '} s  {s.what}{tags}", file=out)


class Check:
    def __init__(self, mode: str, out: Path, python: str, budget: int, selected: Optional[set], workers: int):
        self.mode, self.out, self.python = mode, out, python
        self.simulate = mode == "simulate"
        # A 2-core CPU runs the rehearsal's steps (imports, the interpreter) slower than the GPU machine's 16 cores
        # run the real ones: --simulate stretches every cap and the budget by GPU_CHECK_TIME_SCALE (default 3).
        self.scale = int(os.environ.get("GPU_CHECK_TIME_SCALE", "3" if self.simulate else "1"))
        self.budget = budget * self.scale
        self.selected, self.workers = selected, workers
        self.records: list[dict] = [{"name": s.name, "cap_s": self.cap(s), "status": "PENDING", "seconds": 0,
                                     "rc": None, "log_tail": ""} for s in PLAN]
        self.start = time.monotonic()
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.work = Path(os.environ.get("GPU_CHECK_WORK") or f"/tmp/gpu_check-{stamp}-{os.getpid()}")
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.arch = ""
        self.git_sha, self.git_source = git_sha()
        self.meta = {"mode": mode, "budget_s": self.budget, "caps_sum_s": plan_sum(), "time_scale": self.scale,
                     "git_sha": self.git_sha,
                     "git_sha_source": self.git_source, "started": stamp, "python": python, "root": str(ROOT)}
        self._modules: dict = {}

    def cap(self, step: Step) -> int:
        var = f"GPU_CHECK_CAP_{step.name.upper().replace('-', '_')}_S"
        return int(os.environ.get(var, step.cap_s * self.scale))

    def has_module(self, name: str) -> bool:
        if name not in self._modules:
            probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is None)"
            self._modules[name] = subprocess.run([self.python, "-c", probe], capture_output=True).returncode == 0
        return self._modules[name]

    def status_of(self, name: str) -> str:
        return next(r["status"] for r in self.records if r["name"] == name)

    def record(self, name: str, **fields) -> None:
        rec = next(r for r in self.records if r["name"] == name)
        rec.update(fields)
        self.save()

    def save(self) -> None:
        doc = {**self.meta, "elapsed_s": round(time.monotonic() - self.start, 1), "steps": self.records,
               "result": self.result() if all(r["status"] not in ("PENDING", "RUNNING") for r in self.records)
               else "RUNNING"}
        write_json_atomic(self.out / "gpu_check.json", doc)

    def archive_logs(self) -> None:
        tmp = self.out / "logs.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(self.logs, arcname="logs")
        tmp.replace(self.out / "logs.tar.gz")

    def failed(self) -> list:
        bad = ("FAIL", "TIMEOUT", "ABORTED", "NO_TIME") + (() if self.simulate else ("SKIPPED",))
        return [r["name"] for r in self.records if r["status"] in bad]

    def result(self) -> str:
        failed = self.failed()
        return "PASS" if not failed else f"FAIL ({', '.join(failed)})"

    def limit(self, i: int) -> int:
        """min(cap, what is left of the budget minus the caps of the later steps); extending steps get the rest."""
        step = PLAN[i]
        left = self.budget - (time.monotonic() - self.start)
        reserve = sum(self.cap(s) for s in PLAN[i + 1:] if self.wanted(s))
        room = round(left - reserve)
        return int(room if step.extends else min(self.cap(step), room))

    def wanted(self, step: Step) -> bool:
        return self.selected is None or step.name in self.selected

    def run_step(self, i: int) -> None:
        step = PLAN[i]
        if not self.wanted(step):
            self.record(step.name, status="-", log_tail="not in GPU_CHECK_STEPS")
            return
        if self.simulate and step.gpu_only:
            self.record(step.name, status="SKIPPED", log_tail=f"simulate: {step.name} needs a GPU ({step.what})")
            return
        why = step.when(self)
        if why is not None:
            self.record(step.name, status="-" if why == "-" else "SKIPPED", log_tail="not needed" if why == "-" else why)
            return
        limit = self.limit(i)
        if limit < 2:
            self.record(step.name, status="NO_TIME" if not step.extends else "-",
                        log_tail=f"no time left ({limit} s) in the {self.budget} s budget")
            return
        log = self.logs / f"{i:02d}-{step.name}.log"
        argv = step.cmd(self)
        env = {**os.environ, **step.env(self), "GIT_SHA": self.git_sha or "", "PYTHONUNBUFFERED": "1"}
        if self.simulate:
            env.update(GPU_CHECK_SIMULATE="1", CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
        self.record(step.name, status="RUNNING", log_tail=f"started, limit {limit} s")
        shown = " ".join(shlex.join(argv).split())
        print(f"=== [{step.name}] {time.strftime('%H:%M:%S')} limit {limit} s: "
              f"{shown if len(shown) < 200 else step.what}", flush=True)
        t0 = time.monotonic()
        rc = run_bounded(argv, log, env, limit)
        seconds = round(time.monotonic() - t0, 1)
        tail = read_tail(log)
        if rc in (124, 137) or rc < 0:
            status = "TIMEOUT"
        elif rc == 0:
            status = "PASS"
        elif step.name == "preflight" and rc == PREFLIGHT_NO_DEVICE:
            status = "ABORTED"
        else:
            status = "FAIL"
        self.record(step.name, status=status, seconds=seconds, rc=rc, log_tail=tail)
        self.archive_logs()
        line = f"=== [{step.name}] {status} in {seconds} s (rc {rc})"
        print(line, flush=True)
        if status != "PASS":
            print("\n".join("    | " + t for t in tail.splitlines()[-15:]), flush=True)

    def run(self) -> int:
        print_plan(self.budget // self.scale)
        if self.scale != 1:
            print(f"caps and budget stretched x{self.scale} (GPU_CHECK_TIME_SCALE): budget {self.budget} s")
        print(f"mode {self.mode}; out {self.out}; python {self.python}; git {self.git_sha} ({self.git_source}); "
              f"logs {self.logs}", flush=True)
        self.save()
        for i, step in enumerate(PLAN):
            if step.name == "build" and not self.simulate:
                self.arch = device_arch(self.python)
            self.run_step(i)
            if step.name == "preflight" and self.status_of("preflight") in ("ABORTED", "FAIL", "TIMEOUT"):
                print("ABORT: preflight failed (no usable CUDA device or a broken torch): nothing else can run; "
                      "see the preflight log above", flush=True)
                for r in self.records:
                    if r["status"] == "PENDING":
                        r.update(status="ABORTED", log_tail="not run: preflight failed")
                break
        self.save()
        self.archive_logs()
        self.print_table()
        return 0 if not self.failed() else 1

    def print_table(self) -> None:
        total = round(time.monotonic() - self.start, 1)
        print(f"\n=============================== gpu_check summary ({self.mode}) ===============================")
        print(f"total {total} s of the {self.budget} s budget; git {self.git_sha}")
        print(f"{'step':15s} {'status':8s} {'cap':>5s} {'seconds':>8s}  note")
        for r in self.records:
            note = r["log_tail"].strip().splitlines()[-1] if r["log_tail"].strip() else ""
            print(f"{r['name']:15s} {r['status']:8s} {r['cap_s']:5d} {r['seconds']:8}  {note[:150]}")
        print(f"files in {self.out}:")
        for f in sorted(self.out.iterdir()):
            print(f"  {f.name} ({f.stat().st_size} bytes)")
        print(f"result: {self.result()}", flush=True)


def run_bounded(argv: list, log: Path, env: dict, limit_s: float) -> int:
    """Run argv in its own process group (same session: whoever ends the check's session ends it too) with output
    to ``log``; at the limit SIGTERM the group (run.py then writes what it has), SIGKILL 10 s later. Returns the
    exit status, 124 on a timeout."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                process_group=0)
        try:
            return proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            f.write(f"\n[gpu_check: killed at the {limit_s:.0f} s limit]\n".encode())
            return 124


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def read_tail(log: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        data = log.read_bytes()[-chars:]
    except OSError:
        return ""
    return data.decode("utf-8", "replace")


def write_json_atomic(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def git_sha() -> tuple[Optional[str], str]:
    """($GIT_SHA, git, or the .git-sha stamp), and which of them it came from."""
    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"], "GIT_SHA"
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip(), "git"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        words = (ROOT / ".git-sha").read_text().split()
        if words:
            return " ".join(words), "stamp .git-sha"
    except OSError:
        pass
    return None, "unknown (no GIT_SHA, no git, no .git-sha stamp)"


def write_git_stamp() -> Optional[str]:
    """.git-sha: the commit and whether the tree differs from it, for a device copy (which has no .git)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not sha:
        return None
    text = sha + (" dirty" if dirty else "")
    (ROOT / ".git-sha").write_text(text + "\n")
    return text


def device_arch(python: str) -> str:
    code = "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')"
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def check_outputs(out: Path) -> list[str]:
    """Problems with $OUT against what the device tool brings back (at most 8 files, 16 MiB each, names of letters,
    digits, '.', '_' and '-', at most two folders down)."""
    problems = []
    files = [p for p in out.rglob("*") if p.is_file()]
    if len(files) > MAX_OUT_FILES:
        problems.append(f"{len(files)} files in {out}, at most {MAX_OUT_FILES} come back: {sorted(p.name for p in files)}")
    for p in files:
        rel = p.relative_to(out)
        if len(rel.parts) > 3:
            problems.append(f"{rel}: more than two folders down")
        if not all(OUT_NAME.match(part) for part in rel.parts):
            problems.append(f"{rel}: a name with characters other than letters, digits, '.', '_' and '-'")
        if p.stat().st_size > 16 * 2**20:
            problems.append(f"{rel}: {p.stat().st_size} bytes, over 16 MiB")
    return problems


def dry_run(python: str, budget: int) -> int:
    """No step runs: what each step needs, checked here (torch imported in a child)."""
    print_plan(budget)
    stamp = write_git_stamp()
    print(f"git-SHA stamp .git-sha: {stamp or 'not written (no git here)'}")
    checks = [
        ("python imports torch, triton, resfused", [python, "-c", "import torch, triton, resfused, bench._harness; "
                                                    "print('torch', torch.__version__, 'triton', triton.__version__)"]),
        ("bench/run.py --help", [python, "bench/run.py", "--help"]),
        ("bench/report.py --help", [python, "bench/report.py", "--help"]),
        ("bench/sanitize_case.py --list", [python, "bench/sanitize_case.py", "--list"]),
        ("pytest collects the tests step", [python, "-m", "pytest", "tests", "-q", "--collect-only", "-m", "cuda",
                                            "-p", "no:cacheprovider"] + [f"--ignore={t}" for t in HEAVY_TESTS]),
        ("pip", [python, "-m", "pip", "--version"]),
        ("nvidia-smi (NVIDIA driver)", ["nvidia-smi", "-L"]),
        ("nvcc (CUDA_HOME)", [str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"), "--version"]),
        ("compute-sanitizer", [_sanitizer(None), "--version"]),
    ]
    missing = []
    for name, argv in checks:
        try:
            proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
            ok, why = proc.returncode == 0, (proc.stdout + proc.stderr).strip().splitlines()[-1:]
        except (OSError, subprocess.SubprocessError) as e:
            ok, why = False, [f"{type(e).__name__}: {e}"]
        print(f"  {'READY' if ok else 'MISSING':8s} {name}" + ("" if ok else f"  ({' '.join(why)[:200]})"))
        if not ok:
            missing.append(name)
    print(f"result: {'READY (every step can run)' if not missing else 'MISSING: ' + '; '.join(missing)}")
    return 0 if not missing else 1


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    modes = {"--simulate": "simulate", "--dry-run": "dry-run", "--plan": "plan", "--stamp": "stamp"}
    unknown = [a for a in args if a not in modes and a not in ("-h", "--help")]
    if unknown or len(args) > 1:
        print(f"gpu_check: unknown or extra arguments {args} (use --simulate, --dry-run, --plan, --stamp or --help)",
              file=sys.stderr)
        return 2
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    mode = modes[args[0]] if args else "gpu"
    budget = int(os.environ.get("GPU_CHECK_BUDGET_S", BUDGET_S))
    python = os.environ.get("PYTHON") or shutil.which("python3") or sys.executable
    if mode == "plan":
        print_plan(budget)
        return 0
    if mode == "stamp":
        stamp = write_git_stamp()
        print(f"git-SHA stamp .git-sha: {stamp or 'not written (no git here)'}")
        return 0 if stamp else 1
    if mode == "dry-run":
        return dry_run(python, budget)
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results" / "gpu-check").resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = os.environ.get("GPU_CHECK_STEPS")
    selected = set(steps.split(",")) if steps else None
    if selected and not selected <= set(STEP_NAMES):
        print(f"gpu_check: GPU_CHECK_STEPS names unknown steps {sorted(selected - set(STEP_NAMES))}", file=sys.stderr)
        return 2
    workers = int(os.environ.get("GPU_CHECK_TEST_WORKERS", "8"))
    return Check(mode, out, python, budget, selected, workers).run()


if __name__ == "__main__":
    sys.exit(main())
