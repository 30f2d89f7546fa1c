"""Benchmark machinery shared by the suites: timers, copy bandwidth, environment, the result document.

Timers take ``fn(i)`` (one call on input set ``i``, rotated over ``n_inputs`` sets) and return a
``Timing`` of per-call milliseconds (p20, median, p80):

  CudaEventTimer  GPU. A first call outside the measurement (compilation, autotuning, cuDNN
                  benchmark mode), then warm-up, then one CUDA event pair per call. With
                  ``prefill`` each chunk of calls is queued behind a GPU sleep so the events time
                  the GPU's work, not Python's launch rate (kernel suite); without it they time
                  the step as the program sees it (model suite).
  DoBenchTimer    GPU, triton.testing.do_bench with quantiles (it also clears L2 between calls).
  WallTimer       CPU, time.perf_counter around each call.
  FakeTimer       tests: calls fn once per input set, returns the times it is told to.

environment() and new_result() start a result document; its schema, validation and files live in
_schema.py (re-exported here).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from ._schema import (CPU_NOTE, CPU_RESULTS_DIR, RESULTS_DIR, ROOT, add_derived, add_error, add_row,  # noqa: F401
                      add_skipped, attach_sink, default_json_path, flush, load_result, validate, write_result)


# bench/run.py --simulate sets this: the GPU plan rehearsed on the CPU (Triton rows run in the interpreter).
SIMULATE = False


# ---------------------------------------------------------------------------------------------------
# statistics and timers
# ---------------------------------------------------------------------------------------------------

def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method) of a non-empty sequence."""
    if not values:
        raise ValueError("quantile of an empty sequence")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclasses.dataclass(frozen=True)
class Timing:
    p20_ms: float
    p50_ms: float
    p80_ms: float
    reps: int
    # Per-call wall time of back-to-back calls (launch overhead included), where the timer measures it: on a
    # GPU a kernel as short as its launch (BN at 2048x7x7) is launch-bound in a real program.
    wall_ms: Optional[float] = None

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], wall_ms: Optional[float] = None) -> "Timing":
        return cls(quantile(samples_ms, 0.2), quantile(samples_ms, 0.5), quantile(samples_ms, 0.8), len(samples_ms),
                   wall_ms)


class _Rotation:
    """Calls fn on input sets 0, 1, ..., n-1, 0, ... so consecutive calls touch different memory."""

    def __init__(self, fn: Callable[[int], Any], n_inputs: int):
        self.fn, self.n, self.k = fn, max(1, n_inputs), 0

    def __call__(self):
        self.fn(self.k % self.n)
        self.k += 1


_sleep_cycles_per_ms: Optional[float] = None


def _gpu_sleep(ms: float) -> None:
    """Keep the current stream busy for about ``ms`` (torch.cuda._sleep spins on the SM clock)."""
    global _sleep_cycles_per_ms
    if ms <= 0 or not hasattr(torch.cuda, "_sleep"):
        return
    if _sleep_cycles_per_ms is None:
        torch.cuda._sleep(1000)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(20_000_000)
        end.record()
        end.synchronize()
        _sleep_cycles_per_ms = 20_000_000 / max(start.elapsed_time(end), 1e-3)
    torch.cuda._sleep(int(ms * _sleep_cycles_per_ms))


class CudaEventTimer:
    def __init__(self, warmup_ms: float = 25.0, rep_ms: float = 100.0, min_reps: int = 10, max_reps: int = 1000,
                 prefill: bool = True, chunk: int = 25, max_sleep_ms: float = 200.0):
        self.warmup_ms, self.rep_ms, self.min_reps, self.max_reps = warmup_ms, rep_ms, min_reps, max_reps
        self.prefill, self.chunk, self.max_sleep_ms = prefill, chunk, max_sleep_ms

    def describe(self) -> str:
        return (f"CUDA events per call, median/p20/p80 of >= {self.min_reps} calls over ~{self.rep_ms:g} ms after "
                f"~{self.warmup_ms:g} ms warm-up" + ("; calls queued behind a GPU sleep (GPU time, not launch rate)"
                                                     if self.prefill else "; no prefill (end-to-end step time)"))

    def __call__(self, fn: Callable[[int], Any], n_inputs: int = 1, key: Any = None) -> Timing:
        call = _Rotation(fn, n_inputs)
        call()
        torch.cuda.synchronize()
        est_start, est_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        n_est = 3
        t0 = time.perf_counter()
        est_start.record()
        for _ in range(n_est):
            call()
        est_end.record()
        cpu_ms = (time.perf_counter() - t0) * 1e3 / n_est  # launch cost per call (queue not full yet)
        torch.cuda.synchronize()
        gpu_ms = max(est_start.elapsed_time(est_end) / n_est, 1e-3)
        for _ in range(min(self.max_reps, int(self.warmup_ms / gpu_ms))):
            call()
        n_rep = max(self.min_reps, min(self.max_reps, int(self.rep_ms / gpu_ms)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        torch.cuda.synchronize()
        for c0 in range(0, n_rep, self.chunk):
            c1 = min(n_rep, c0 + self.chunk)
            if self.prefill:
                _gpu_sleep(min(self.max_sleep_ms, 1.5 * cpu_ms * (c1 - c0) + 0.05))
            for j in range(c0, c1):
                starts[j].record()
                call()
                ends[j].record()
        torch.cuda.synchronize()
        samples = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        n_wall = max(3, min(n_rep, self.chunk))
        t0 = time.perf_counter()
        for _ in range(n_wall):
            call()
        torch.cuda.synchronize()
        return Timing.from_samples(samples, wall_ms=(time.perf_counter() - t0) * 1e3 / n_wall)


class DoBenchTimer:
    def __init__(self, warmup_ms: float = 25.0, rep_ms: float = 100.0):
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms

    def describe(self) -> str:
        return f"triton.testing.do_bench(warmup={self.warmup_ms:g}, rep={self.rep_ms:g}), L2 cleared between calls"

    def __call__(self, fn: Callable[[int], Any], n_inputs: int = 1, key: Any = None) -> Timing:
        from triton.testing import do_bench

        call = _Rotation(fn, n_inputs)
        call()
        torch.cuda.synchronize()
        p20, p50, p80 = do_bench(call, warmup=self.warmup_ms, rep=self.rep_ms, quantiles=[0.2, 0.5, 0.8])
        return Timing(float(p20), float(p50), float(p80), reps=0)


class WallTimer:
    def __init__(self, warmup: int = 1, min_reps: int = 3, max_reps: int = 50, budget_s: float = 0.2):
        self.warmup, self.min_reps, self.max_reps, self.budget_s = warmup, min_reps, max_reps, budget_s

    def describe(self) -> str:
        return (f"CPU wall clock (time.perf_counter) per call, median/p20/p80 of {self.min_reps}-{self.max_reps} "
                f"calls within ~{self.budget_s:g} s after {self.warmup} warm-up call(s)")

    def __call__(self, fn: Callable[[int], Any], n_inputs: int = 1, key: Any = None) -> Timing:
        call = _Rotation(fn, n_inputs)
        for _ in range(1 + self.warmup):
            call()
        samples: list[float] = []
        begin = time.perf_counter()
        while len(samples) < self.max_reps and (len(samples) < self.min_reps
                                                or time.perf_counter() - begin < self.budget_s):
            t0 = time.perf_counter()
            call()
            samples.append((time.perf_counter() - t0) * 1e3)
        return Timing.from_samples(samples, wall_ms=quantile(samples, 0.5))


class FakeTimer:
    """For tests: runs fn on every input set once, then returns ``ms(key)`` (a number or a callable)."""

    def __init__(self, ms: Any = 1.0):
        self.ms = ms
        self.keys: list = []

    def describe(self) -> str:
        return "fake timer (tests)"

    def __call__(self, fn: Callable[[int], Any], n_inputs: int = 1, key: Any = None) -> Timing:
        for i in range(max(1, n_inputs)):
            fn(i)
        self.keys.append(key)
        ms = float(self.ms(key) if callable(self.ms) else self.ms)
        return Timing(0.9 * ms, ms, 1.1 * ms, reps=max(1, n_inputs), wall_ms=1.2 * ms)


def copy_bandwidth_GBps(device: torch.device, timer, nbytes: Optional[int] = None) -> float:
    """Device-to-device copy bandwidth, counting the read and the write: 2 * nbytes / time.

    The buffer (1 GiB on a GPU, 20x an H100's L2; 64 MiB on a CPU) is large enough that caches
    do not flatter the result."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = timer(lambda i: dst.copy_(src), 1, key="copy_bandwidth")
    del src, dst
    return 2 * nbytes / (t.p50_ms * 1e-3) / 1e9


def l2_cache_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))


def rotation_sets(bytes_per_set: int, l2_bytes: int, limit: int = 64) -> int:
    """How many input sets to rotate through so consecutive calls do not find their inputs in L2:
    enough to cover 4x the L2 size when one set is smaller than that, else 1."""
    if l2_bytes <= 0 or bytes_per_set <= 0 or bytes_per_set >= 4 * l2_bytes:
        return 1
    return max(1, min(limit, math.ceil(4 * l2_bytes / bytes_per_set)))


# ---------------------------------------------------------------------------------------------------
# environment and result document
# ---------------------------------------------------------------------------------------------------

def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# Written by `bash bench/gpu_check.sh --stamp` (the post-commit/post-checkout/post-merge hooks of `make hooks` run
# it) and by `--dry-run`: "<sha>[ dirty]". Git-ignored; a device run carries it (carry: .git-sha).
GIT_SHA_STAMP = ROOT / ".git-sha"


def git_state() -> tuple[Optional[str], Optional[bool]]:
    """(sha, dirty). GIT_SHA in the environment wins (a copied tree without .git can still say which commit it
    is), then git itself, then the stamp file GIT_SHA_STAMP written at commit time."""
    env = os.environ.get("GIT_SHA")
    if env:
        return env, None
    sha = _git("rev-parse", "HEAD")
    if sha is None:
        try:
            words = GIT_SHA_STAMP.read_text().split()
        except OSError:
            return None, None
        return (words[0], "dirty" in words[1:]) if words else (None, None)
    status = _git("status", "--porcelain", "--untracked-files=no")
    return sha, (bool(status) if status is not None else None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} (sm_{props.major}{props.minor})"
    cpu = platform.processor() or platform.machine()
    return f"CPU: {cpu}, {os.cpu_count()} cores (no CUDA device)"


_NVIDIA_SMI_FIELDS = ("name", "driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem",
                      "power.limit", "temperature.gpu", "persistence_mode")


def gpu_environment(device: torch.device) -> dict:
    """Driver, clocks (MHz, now and max), power limit and device properties of a CUDA device; {} on CPU."""
    if device.type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(device)
    info: dict = {"sm_count": props.multi_processor_count, "total_memory_GiB": round(props.total_memory / 2**30, 1),
                  "l2_cache_MiB": round(l2_cache_bytes(device) / 2**20, 1)}
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        out = subprocess.run(["nvidia-smi", f"--id={index}", f"--query-gpu={','.join(_NVIDIA_SMI_FIELDS)}",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
        values = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")] if out.returncode == 0 else []
    except (OSError, subprocess.SubprocessError, IndexError):
        values = []
    if len(values) == len(_NVIDIA_SMI_FIELDS):
        info["nvidia_smi"] = dict(zip(_NVIDIA_SMI_FIELDS, values))
        info["driver"] = values[1]
    return info


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    try:
        cudnn = torch.backends.cudnn.version()
    except Exception:
        cudnn = None
    sha, dirty = git_state()
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "python": platform.python_version(),
        "git_sha": sha,
        "git_dirty": dirty,
        **gpu_environment(device),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def new_result(device: torch.device, copy_bw_GBps: Optional[float], **settings) -> dict:
    doc = environment(device)
    doc["copy_bandwidth_GBps"] = copy_bw_GBps
    doc.update(settings)
    doc.setdefault("notes", [])
    doc["rows"], doc["skipped"], doc["errors"], doc["checks"] = [], [], [], []
    return doc


# ---------------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------------

def progress(items: Iterable, total: int, desc: str, enabled: bool = True):
    """tqdm on stderr when it is installed (updates every 5 s when stderr is not a terminal)."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return _plain_progress(items, total, desc)
    tty = sys.stderr.isatty()
    return tqdm(items, total=total, desc=desc, file=sys.stderr, mininterval=0.5 if tty else 5.0,
                dynamic_ncols=tty, ascii=not tty)


def _plain_progress(items: Iterable, total: int, desc: str):
    step = max(1, total // 10)
    for i, item in enumerate(items):
        if i % step == 0:
            print(f"{desc}: {i}/{total}", file=sys.stderr, flush=True)
        yield item
    print(f"{desc}: {total}/{total}", file=sys.stderr, flush=True)


def pytest_benchmark_target(suite, case, impl: str,
                            device: Optional[torch.device] = None) -> tuple[Callable[[], None], int]:
    """The timed callable of a pytest-benchmark entry (bench/bench_*.py ``test_*``) for ``case`` and ``impl``.

    ``suite`` is the kernel module (make_inputs, bytes_per_input_set, make_step, make_forward,
    impl_unavailable_reason). ``device`` None means the GPU: skips without one. Skips when ``impl`` cannot run
    the case. The callable runs one step on the next rotated input set and synchronises (wall clock per call,
    ~10 us above run.py's CUDA events). Returns (callable, number of input sets); the caller makes the first,
    untimed call."""
    import itertools

    import pytest

    if device is None:
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        device = torch.device("cuda")
    why = suite.impl_unavailable_reason(impl, device, case.torch_dtype)
    if why is not None:
        pytest.skip(why)
    torch.backends.cudnn.benchmark = True
    if impl == "compile":
        torch._dynamo.reset()
    inputs = suite.make_inputs(case, device, rotation_sets(suite.bytes_per_input_set(case), l2_cache_bytes(device)))
    step = suite.make_step(suite.make_forward(impl), case, inputs)
    counter = itertools.count()

    def target():
        step(next(counter) % inputs.n_sets)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return target, inputs.n_sets
