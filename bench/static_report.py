"""Static kernel report for H100 (sm_90), no GPU needed: `make static` (full) and `make static-check` (CI).

Every Triton kernel is lowered for sm_90 through its own launcher: the launchers of triton_kernels/ are called
with CPU tensors of ResNet-50's batch-256 shapes while a stand-in Triton driver (target GPUTarget("cuda", 90, 32),
no device) turns each launch into a compile (JITFunction.run(warmup=True)), so the specialisation (integer
divisibility, pointer alignment, constexprs) and the configs are exactly those a GPU run would compile: every
config of an autotune list, the fixed config otherwise. The csrc kernels (csrc/*.cu with __global__ functions)
are compiled with nvcc 13.0 for sm_90 to PTX and assembled with `ptxas -v`.

Per kernel, config and shape (one row each in bench/results/static/sm90.json):
  regs, spills (bytes of spill stores), smem_bytes  from `ptxas -v` (Triton's PTX re-assembled with the flags
                    Triton uses; shared memory = Triton's dynamic allocation + ptxas' static smem; csrc: static
                    smem only, the dynamic smem a launch adds is not seen here)
  occupancy         theoretical, H100: 65536 registers/SM allocated per warp in units of 256, 228 KB smem/SM
                    (227 KB at most per block, 1 KB reserved per block), 2048 threads (64 warps) and 32 blocks
                    per SM; the fraction of the 64 warp slots the resident blocks fill
  load_bits, store_bits  the width of the most common static global load (ld.global, cp.async; TMA counts as
                    "tma") and store instruction in the PTX, e.g. 128 for ld.global.v4.b32 or a 16-byte
                    cp.async; load_widths/store_widths give the full histogram {bits: instructions}
  wgmma             whether the kernel's tl.dot became wgmma.mma_async (False: mma.sync or FMA; None: no dot)
  waits_per_iter    pipeline waits (cp.async.wait_group, wgmma.wait_group, mbarrier waits) per iteration of
                    the main loop: the innermost loop holding the MMA (or, without a dot, the first loop holding
                    a global load); loop_depth is that loop's nesting depth and drain_waits the waits of the
                    enclosing loop outside it (a pipeline drained and refilled once per outer iteration)

    python bench/static_report.py                  # full report -> bench/results/static/sm90.{json,md}
    python bench/static_report.py --check          # CI subset: fails on a compile error or an in-use spill
    python bench/static_report.py --markdown FILE  # regenerate the markdown from a JSON
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import glob
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "bench", "results", "static")
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
SM_COUNT = 132  # H100 SXM
BATCH = 256

# H100 (compute capability 9.0) limits for the occupancy model.
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers, allocated per warp
MAX_REGS_PER_THREAD = 255
SMEM_PER_SM = 228 * 1024
SMEM_PER_BLOCK_MAX = 227 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
SMEM_ALLOC_UNIT = 128
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def occupancy(regs: int, smem_bytes: int, threads: int) -> float:
    """Theoretical occupancy on H100: resident warps / 64 (0.0 when a block cannot launch at all)."""
    warps = -(-threads // 32)
    if regs > MAX_REGS_PER_THREAD or smem_bytes > SMEM_PER_BLOCK_MAX or warps > MAX_WARPS_PER_SM:
        return 0.0
    regs_per_warp = -(-max(regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (REGS_PER_SM // regs_per_warp) // warps
    smem_alloc = -(-(smem_bytes + SMEM_RESERVED_PER_BLOCK) // SMEM_ALLOC_UNIT) * SMEM_ALLOC_UNIT
    by_smem = SMEM_PER_SM // smem_alloc
    blocks = min(MAX_BLOCKS_PER_SM, by_regs, by_smem, MAX_WARPS_PER_SM // warps)
    return round(blocks * warps / MAX_WARPS_PER_SM, 4)


# ---------------------------------------------------------------------------------------------------
# PTX and ptxas analysis
# ---------------------------------------------------------------------------------------------------

_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")
_WAIT = re.compile(r"\b(cp\.async\.wait_group|cp\.async\.wait_all|cp\.async\.bulk\.wait_group(?:\.read)?|"
                   r"wgmma\.wait_group|mbarrier\.try_wait|mbarrier\.test_wait|mbarrier\.wait)\b")
_DOT = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\b")
_GLOBAL_LD = re.compile(r"\b(ld\.global[\w.:]*|cp\.async\.c[ag]\.shared\.global[\w.:]*|cp\.async\.bulk[\w.:]*)\s")
_GLOBAL_ST = re.compile(r"\b(st\.global[\w.:]*|red\.global[\w.:]*|atom\.global[\w.:]*|cp\.async\.bulk\.global"
                        r"[\w.:]*)\s")
_CP_SIZE = re.compile(r"cp\.async\.c[ag]\.shared\.global[\w.:]*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")


def _access_bits(instr: str, line: str):
    if instr.startswith("cp.async.bulk"):
        return "tma"
    if instr.startswith("cp.async"):
        m = _CP_SIZE.search(line)
        return int(m.group(1), 0) * 8 if m else None
    parts = instr.split(".")
    vec = 1
    bits = None
    for p in parts:
        if re.fullmatch(r"v\d+", p):
            vec = int(p[1:])
        elif re.fullmatch(r"[bfsu]\d+", p):
            bits = int(p[1:])
    return None if bits is None else vec * bits


def _histogram(regex, lines):
    hist = collections.Counter()
    for line in lines:
        for m in regex.finditer(line):
            bits = _access_bits(m.group(1), line)
            if bits is not None:
                hist[bits] += 1
    return hist


def _dominant(hist) -> Optional[object]:
    if not hist:
        return None
    # most instructions; a tie goes to the narrower access (the one a reader should worry about)
    return sorted(hist.items(), key=lambda kv: (-kv[1], kv[0] if isinstance(kv[0], int) else 1 << 20))[0][0]


def analyse_ptx(ptx: str) -> dict:
    """Load/store widths, MMA kind and the main loop's pipeline waits from one kernel's PTX."""
    lines = [ln.split("//")[0] for ln in ptx.splitlines()]
    labels = {}
    for i, ln in enumerate(lines):
        m = _LABEL.match(ln.strip())
        if m:
            labels[m.group(1)] = i
    loops = {}  # start line -> end line of each backward branch's loop
    for j, ln in enumerate(lines):
        for m in _BRANCH.finditer(ln):
            i = labels.get(m.group(1))
            if i is not None and i < j:
                loops[i] = max(loops.get(i, j), j)
    intervals = sorted(loops.items())

    dot_lines = [k for k, ln in enumerate(lines) if _DOT.search(ln)]
    loop = None
    if dot_lines:
        first = dot_lines[0]
        containing = [(i, j) for i, j in intervals if i <= first <= j]
        loop = min(containing, key=lambda ij: ij[1] - ij[0]) if containing else None
    else:
        ld_lines = [k for k, ln in enumerate(lines) if _GLOBAL_LD.search(ln)]
        for k in ld_lines:
            containing = [(i, j) for i, j in intervals if i <= k <= j]
            if containing:
                loop = min(containing, key=lambda ij: ij[1] - ij[0])
                break

    def waits(i, j):
        return sum(len(_WAIT.findall(lines[k])) for k in range(i, j + 1))

    waits_per_iter = depth = drain = None
    if loop is not None:
        waits_per_iter = waits(*loop)
        parents = [(i, j) for i, j in intervals if i <= loop[0] and loop[1] <= j and (i, j) != loop]
        depth = 1 + len(parents)
        if parents:
            parent = min(parents, key=lambda ij: ij[1] - ij[0])
            drain = waits(*parent) - waits_per_iter
    ld, st = _histogram(_GLOBAL_LD, lines), _histogram(_GLOBAL_ST, lines)
    # the main loop's loads are the bulk of the traffic; a kernel without a loop: all of its loads
    ld_main = _histogram(_GLOBAL_LD, lines[loop[0]:loop[1] + 1]) if loop is not None else ld
    return {
        "load_bits": _dominant(ld_main or ld), "store_bits": _dominant(st),
        "load_widths": {str(k): v for k, v in sorted(ld.items(), key=lambda kv: str(kv[0]))},
        "store_widths": {str(k): v for k, v in sorted(st.items(), key=lambda kv: str(kv[0]))},
        "wgmma": True if "wgmma.mma_async" in ptx else (False if "mma.sync" in ptx else None),
        "waits_per_iter": waits_per_iter, "loop_depth": depth, "drain_waits": drain,
    }


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict:
    """{entry: {"regs", "spills", "spill_loads", "stack", "static_smem"}} from `ptxas -v` output."""
    out, cur = {}, None
    for line in log.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            cur = out.setdefault(m.group(1), {"regs": 0, "spills": 0, "spill_loads": 0, "stack": 0,
                                              "static_smem": 0})
            continue
        if cur is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            cur.update(stack=int(m.group(1)), spills=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _PTXAS_USED.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            s = _PTXAS_SMEM.search(line)
            cur["static_smem"] = int(s.group(1)) if s else 0
    return out


# ---------------------------------------------------------------------------------------------------
# Triton: launchers driven with CPU tensors, each launch compiled for sm_90
# ---------------------------------------------------------------------------------------------------

class _Sm90Driver:
    """Just enough of a Triton driver for JITFunction.run(warmup=True) to compile for sm_90 without a GPU."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.driver import CudaDriver

        self._target = GPUTarget("cuda", 90, 32)
        self._cpp = CudaDriver.map_python_to_cpp_type

    def get_current_target(self):
        return self._target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty):
        return self._cpp(self, ty)


_LAUNCHES: list = []
_INSTALLED = False


def _install():
    """Route every `kernel[grid](...)` to a compile (every config of an autotuner) and record it."""
    global _INSTALLED
    if _INSTALLED:
        return
    import torch
    import triton
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction, KernelInterface

    driver.set_active(_Sm90Driver())
    # The launchers size split-K and reduction grids from the SM count; answer for an H100.
    torch.cuda.get_device_properties = lambda *a, **k: type("Props", (), {"multi_processor_count": SM_COUNT})()
    torch.cuda.current_device = lambda: 0

    def getitem(self, grid):
        def launch(*args, **kwargs):
            if isinstance(self, Autotuner):
                # the configs this launch could pick: the list after the autotuner's own pruning, if any
                self.nargs = dict(zip(self.arg_names, args))
                fn, configs, tuned = self.fn, self.prune_configs(kwargs), True
            else:
                fn, configs, tuned = self, [None], False
            while not isinstance(fn, JITFunction):
                fn = fn.fn
            for cfg in configs:
                kw = dict(kwargs)
                if cfg is not None:
                    kw.update(cfg.all_kwargs())
                meta = {k: v for k, v in kw.items() if k.startswith("BLOCK")}
                try:
                    compiled = fn.run(*args, grid=grid, warmup=True, **kw)
                    err = None
                except Exception as e:  # noqa: BLE001 - reported as a row, and fails the check
                    compiled, err = None, f"{type(e).__name__}: {str(e)[-2000:]}"
                _LAUNCHES.append((fn, meta, tuned, compiled, err))
        return launch

    KernelInterface.__getitem__ = getitem
    _INSTALLED = True


def _config_name(meta: dict, compiled) -> str:
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K", "BLOCK_R": "R", "BLOCK_C": "C", "BLOCK_I": "I",
             "BLOCK_P": "P", "BLOCK": "B"}
    parts = [f"{short.get(k, k)}{v}" for k, v in meta.items()]
    if compiled is not None:
        parts += [f"w{compiled.metadata.num_warps}", f"s{compiled.metadata.num_stages}"]
    return " ".join(parts)


@functools.lru_cache(maxsize=None)
def _ptxas_path() -> str:
    from triton import knobs
    return knobs.nvidia.ptxas.path


_KERNEL_CACHE: dict = {}


def _analyse_compiled(compiled) -> dict:
    key = compiled.hash
    if key in _KERNEL_CACHE:
        return _KERNEL_CACHE[key]
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # the flags Triton's make_cubin passes (fmad on, -lineinfo, --regAllocOptLevel=2)
        proc = subprocess.run([_ptxas_path(), "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", src,
                               "-o", os.path.join(d, "k.o")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
    (res,) = parse_ptxas_log(proc.stderr).values()
    threads = compiled.metadata.num_warps * 32
    smem = compiled.metadata.shared + res["static_smem"]
    out = dict(regs=res["regs"], spills=res["spills"], spill_loads=res["spill_loads"], smem_bytes=smem,
               threads=threads, occupancy=occupancy(res["regs"], smem, threads), **analyse_ptx(ptx))
    _KERNEL_CACHE[key] = out
    return out


@dataclasses.dataclass(frozen=True)
class TritonCase:
    family: str        # triton_kernels module
    site: str          # the ResNet-50 layer(s) the shape stands for
    shape: str
    dtype: str
    layout: str        # "cl" or "nchw"
    call: Callable     # (torch dtype, memory format) -> None: calls the launcher(s)


def run_triton_case(case: TritonCase) -> list[dict]:
    _install()
    import torch

    _LAUNCHES.clear()
    t0 = time.time()
    dtype = getattr(torch, DTYPE_NAMES[case.dtype])
    fmt = torch.channels_last if case.layout == "cl" else torch.contiguous_format
    rows = []
    base = dict(backend="triton", family=case.family, site=case.site, shape=case.shape, dtype=case.dtype,
                layout=case.layout)
    try:
        case.call(dtype, fmt)
    except Exception as e:  # noqa: BLE001
        rows.append(dict(base, kernel=f"{case.family} launcher", config="", in_use=True,
                         error=f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"))
    seen = set()
    for fn, meta, tuned, compiled, err in _LAUNCHES:
        name = fn.__name__
        cfg = _config_name(meta, compiled)
        if (name, cfg) in seen:
            continue
        seen.add((name, cfg))
        row = dict(base, kernel=name, config=cfg, autotuned=tuned, in_use=True)
        if err is None:
            try:
                row.update(_analyse_compiled(compiled))
                src = fn.src if hasattr(fn, "src") else ""
                if row["wgmma"] is None and ("_mma(" in src or "tl.dot(" in src):
                    row["wgmma"] = False
            except Exception as e:  # noqa: BLE001
                err = f"{type(e).__name__}: {e}"
        if err is not None:
            row["error"] = err
        rows.append(row)
    for r in rows:
        r["case_seconds"] = round(time.time() - t0, 2)
    return rows


# ---------------------------------------------------------------------------------------------------
# the cases: ResNet-50 at batch 256
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Conv:
    site: str
    c_in: int
    h: int
    c_out: int
    k: int
    stride: int = 1
    residual: bool = False
    shortcut: Optional[tuple[int, int, int]] = None  # (C_sc, H_sc, stride)
    prologue: bool = False   # conv_bn: BN + ReLU of the previous layer applied to x

    @property
    def ho(self):
        return (self.h + 2 * (self.k // 2) - self.k) // self.stride + 1

    def shape(self) -> str:
        s = f"{BATCH}x{self.c_in}x{self.h}x{self.h} k{self.k}s{self.stride} ->{self.c_out}x{self.ho}x{self.ho}"
        if self.shortcut:
            s += f" +sc {self.shortcut[0]}x{self.shortcut[1]}x{self.shortcut[1]}/{self.shortcut[2]}"
        elif self.residual:
            s += " +res"
        return s


def resnet50_inference_convs() -> list[Conv]:
    """Every distinct conv of fuse_for_inference(ResNet-50): conv + bias (+ residual or shortcut) + ReLU."""
    convs = [Conv("conv1 (stem)", 3, 224, 64, 7, 2)]
    for i, (width, res, c_first) in enumerate(((64, 56, 64), (128, 28, 256), (256, 14, 512), (512, 7, 1024)), 1):
        s = 1 if i == 1 else 2
        c_out = 4 * width
        convs.append(Conv(f"layer{i}.0.conv1", c_first, s * res, width, 1))
        if i > 1:
            convs.append(Conv(f"layer{i}.0.conv2", width, 2 * res, width, 3, 2))
        convs.append(Conv(f"layer{i}.0.conv3", width, res, c_out, 1, shortcut=(c_first, s * res, s)))
        convs.append(Conv(f"layer{i}.1+.conv1", c_out, res, width, 1))
        convs.append(Conv(f"layer{i}.{'0' if i == 1 else '1'}+.conv2", width, res, width, 3))
        convs.append(Conv(f"layer{i}.1+.conv3", width, res, c_out, 1, residual=True))
    return convs


def resnet50_training_convs() -> list[Conv]:
    """Every distinct conv of convert(ResNet-50, fuse_convs=True): conv1 and the downsample conv read the block
    input (no prologue), conv2 and conv3 apply the previous BN + ReLU in their prologue; all with statistics."""
    convs = []
    for i, (width, res, c_first) in enumerate(((64, 56, 64), (128, 28, 256), (256, 14, 512), (512, 7, 1024)), 1):
        s = 1 if i == 1 else 2
        c_out = 4 * width
        convs.append(Conv(f"layer{i}.0.conv1", c_first, s * res, width, 1))
        convs.append(Conv(f"layer{i}.0.downsample", c_first, s * res, c_out, 1, s))
        if i > 1:
            convs.append(Conv(f"layer{i}.0.conv2", width, 2 * res, width, 3, 2, prologue=True))
        convs.append(Conv(f"layer{i}.1+.conv1", c_out, res, width, 1))
        convs.append(Conv(f"layer{i}.{'0' if i == 1 else '1'}+.conv2", width, res, width, 3, prologue=True))
        convs.append(Conv(f"layer{i}.*.conv3", width, res, c_out, 1, prologue=True))
    return convs


# (C, H) of ResNet-50's BatchNorms
BN_SHAPES = ((64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28), (256, 28), (256, 14), (1024, 14),
             (512, 14), (512, 7), (2048, 7))


def _t(shape, dtype, fmt):
    import torch
    return torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt)


def _v(c):
    import torch
    return torch.empty(c, dtype=torch.float32)


def _conv_bias_act_call(cv: Conv):
    def call(dtype, fmt):
        from resfused.triton_kernels import conv_bias_act as k
        x = _t((BATCH, cv.c_in, cv.h, cv.h), dtype, fmt)
        w = _t((cv.c_out, cv.c_in, cv.k, cv.k), dtype, fmt)
        b = _t((cv.c_out,), dtype, _contig())
        res = _t((BATCH, cv.c_out, cv.ho, cv.ho), dtype, fmt) if cv.residual else None
        sx = sw = None
        sc_stride = (1, 1)
        if cv.shortcut:
            c_sc, h_sc, s_sc = cv.shortcut
            sx = _t((BATCH, c_sc, h_sc, h_sc), dtype, fmt)
            sw = _t((cv.c_out, c_sc, 1, 1), dtype, fmt)
            sc_stride = (s_sc, s_sc)
        p = cv.k // 2
        k.conv_bias_act(x, w, b, res, sx, sw, (cv.stride,) * 2, (p, p), (1, 1), 1, sc_stride, True)
    return call


def _contig():
    import torch
    return torch.contiguous_format


def _conv_bn_call(cv: Conv):
    def call(dtype, fmt):
        from resfused.triton_kernels import conv_bn as k
        x = _t((BATCH, cv.c_in, cv.h, cv.h), dtype, fmt)
        w = _t((cv.c_out, cv.c_in, cv.k, cv.k), dtype, fmt)
        pro = (_v(cv.c_in), _v(cv.c_in), _v(cv.c_in), _v(cv.c_in)) if cv.prologue else (None,) * 4
        p = cv.k // 2
        geo = ((cv.stride,) * 2, (p, p), (1, 1), 1)
        k.forward(x, w, *pro, _v(cv.c_out), _v(cv.c_out), *geo, cv.prologue, True, 0.1, 1e-5)
        gy = _t((BATCH, cv.c_out, cv.ho, cv.ho), dtype, fmt)
        k.backward(gy, x, w, *pro, *geo, cv.prologue, True, True, True, cv.prologue)
    return call


def _tail_call(c: int, h: int, residual_bn: bool):
    def call(dtype, fmt):
        from resfused.triton_kernels import conv_bn as k
        y = _t((BATCH, c, h, h), dtype, fmt)
        r = _t((BATCH, c, h, h), dtype, fmt)
        vec = [_v(c) for _ in range(4)]
        rv = [_v(c) for _ in range(4)] if residual_bn else [None] * 4
        out, mask = k.tail_forward(y, *vec, r, *rv, residual_bn)
        k.tail_backward(out, mask, y, vec[0], vec[1], vec[2], r, rv[0], rv[1], rv[2], residual_bn, True, True,
                        True, True, True, residual_bn)
    return call


def _bn_call(c: int, h: int):
    def call(dtype, fmt):
        from resfused.triton_kernels import bn_add_relu as k
        x = _t((BATCH, c, h, h), dtype, fmt)
        z = _t((BATCH, c, h, h), dtype, fmt)
        w, b, rm, rv = (_v(c) for _ in range(4))
        y, mask, mean, invstd = k.forward_train(x, z, w, b, rm, rv, 0.1, 1e-5, True)
        k.forward_train(x, None, w, b, rm, rv, 0.1, 1e-5, True)
        k.forward_eval(x, z, w, b, rm, rv, 1e-5, True, False)
        k.backward(y, x, mask, mean, invstd, w, True, True, True, True, True)
        k.backward(y, x, mask, mean, invstd, w, True, True, True, False, False)
    return call


_CASES: list = []


def _run_case_index(i: int) -> list[dict]:
    return run_triton_case(_CASES[i])  # the cases hold closures: forked workers index the parent's list


def triton_cases(check: bool) -> list[TritonCase]:
    inf = resnet50_inference_convs()
    train = resnet50_training_convs()
    if check:
        # a few shapes that between them take every kernel and the main K-loop variants (flat-K stem, per-tap
        # 3x3 channel loop, projection shortcut, BN prologue, strided 1x1): ~21 cases, ~200 CPU-seconds
        pick = lambda convs, names: [c for c in convs if c.site in names]  # noqa: E731
        inf = pick(inf, {"conv1 (stem)", "layer1.0+.conv2", "layer2.0.conv3"})
        train = pick(train, {"layer1.0+.conv2", "layer2.0.downsample"})
        bn_shapes, tails = ((256, 56),), ((256, 56, True),)
        combos = (("bf16", "cl"), ("fp32", "cl"), ("bf16", "nchw"))
    else:
        bn_shapes = BN_SHAPES
        tails = [(c, h, rb) for c, h in ((256, 56), (512, 28), (1024, 14), (2048, 7)) for rb in (True, False)]
        combos = (("bf16", "cl"), ("fp32", "cl"), ("bf16", "nchw"), ("fp32", "nchw"), ("fp16", "cl"))
    cases = []
    for dtype, layout in combos:
        for cv in inf:
            cases.append(TritonCase("conv_bias_act", cv.site, cv.shape(), dtype, layout, _conv_bias_act_call(cv)))
        for cv in train:
            cases.append(TritonCase("conv_bn", cv.site, cv.shape() + (" +prologue" if cv.prologue else ""), dtype,
                                    layout, _conv_bn_call(cv)))
        for c, h, rb in tails:
            cases.append(TritonCase("conv_bn", "tail" + (" +downsample bn" if rb else ""),
                                    f"{BATCH}x{c}x{h}x{h}", dtype, layout, _tail_call(c, h, rb)))
        for c, h in bn_shapes:
            cases.append(TritonCase("bn_add_relu", "bn", f"{BATCH}x{c}x{h}x{h}", dtype, layout, _bn_call(c, h)))
    return cases


# ---------------------------------------------------------------------------------------------------
# csrc: nvcc -> PTX -> ptxas -v
# ---------------------------------------------------------------------------------------------------

def _torch_includes() -> list[str]:
    from torch.utils.cpp_extension import include_paths
    return [f"-I{p}" for p in include_paths()]


def _csrc_includes(path: str) -> list[str]:
    """The include path setup.py builds csrc with: torch's headers, csrc/ and the file's own folder, and the
    nvidia-* wheels' include folders (ATen's CUDA headers need cusparse.h, csrc/conv_bn.cpp cudnn.h)."""
    import importlib.util

    dirs = [os.path.join(ROOT, "csrc"), os.path.dirname(path)]
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        dirs += sorted(d for d in glob.glob(os.path.join(base, "*", "include"))
                       if os.path.exists(os.path.join(d, "cusparse.h")) or os.path.exists(os.path.join(d, "cudnn.h")))
    return _torch_includes() + [f"-I{d}" for d in dict.fromkeys(dirs)]


def _csrc_sources():
    """(name, path, text) of every .cu under csrc/ (subfolders too; not the CPU runtime in csrc/sim/), the text
    with the headers of its folder appended: a per-dtype translation unit's kernels, and the constants their
    __launch_bounds__ use, live in those headers."""
    root = os.path.join(ROOT, "csrc")
    for path in sorted(glob.glob(os.path.join(root, "**", "*.cu"), recursive=True)):
        name = os.path.relpath(path, root)
        if name.split(os.sep)[0] == "sim":
            continue
        folder = os.path.dirname(path)
        headers = sorted(glob.glob(os.path.join(folder, "*.cuh")) + glob.glob(os.path.join(folder, "*.h")))
        texts = []
        for p in [path] + headers:
            with open(p) as f:
                texts.append(f.read())
        yield name, path, "\n".join(texts)


_CU_DTYPES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "__nv_bfloat16": "bf16", "__half": "fp16",
              "float": "fp32", "c10::BFloat16": "bf16", "c10::Half": "fp16"}


def _launch_threads(source: str) -> dict:
    """{kernel base name: threads per block} from __launch_bounds__(expr) and the file's int constants."""
    consts = {m.group(1): int(m.group(2)) for m in re.finditer(r"constexpr int (k\w+)\s*=\s*(\d+)\s*;", source)}
    out = {}
    for m in re.finditer(r"__global__\s+void\s+__launch_bounds__\(([^,)]+)(?:,[^)]*)?\)\s+(\w+)\s*\(", source):
        expr = m.group(1)
        for name, val in consts.items():
            expr = re.sub(rf"\b{name}\b", str(val), expr)
        if re.fullmatch(r"[\d\s*+()]+", expr):
            out[m.group(2)] = int(eval(expr))  # noqa: S307 - digits and * + ( ) only
    return out


def csrc_rows() -> list[dict]:
    rows = []
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    ptxas = os.path.join(CUDA_HOME, "bin", "ptxas")
    filt = os.path.join(CUDA_HOME, "bin", "cu++filt")
    if not os.path.exists(filt):
        filt = shutil.which("cu++filt") or shutil.which("c++filt") or "c++filt"
    for name, path, source in _csrc_sources():
        if "__global__" not in source:
            continue
        base = dict(backend="cuda", family=name, site="all", shape="any (not shape-specialised)", in_use=True)
        with tempfile.TemporaryDirectory() as d:
            ptx_path = os.path.join(d, "k.ptx")
            proc = subprocess.run([nvcc, "-arch=sm_90", "-std=c++20", "-O3", "--expt-relaxed-constexpr", "--ptx",
                                   *_csrc_includes(path), path, "-o", ptx_path], capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append(dict(base, kernel=name, dtype="", layout="", config="",
                                 error=f"nvcc failed: {proc.stderr[-3000:]}"))
                continue
            proc = subprocess.run([ptxas, "-v", "-arch=sm_90", ptx_path, "-o", os.path.join(d, "k.cubin")],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append(dict(base, kernel=name, dtype="", layout="", config="",
                                 error=f"ptxas failed: {proc.stderr[-3000:]}"))
                continue
            with open(ptx_path) as f:
                ptx = f.read()
        usage = parse_ptxas_log(proc.stderr)
        demangled = subprocess.run([filt], input="\n".join(usage), capture_output=True, text=True).stdout.split("\n")
        threads_of = _launch_threads(source)
        bodies = _split_ptx_entries(ptx)
        for (mangled, res), pretty in zip(usage.items(), demangled):
            m = re.search(r"(\w+)(?:<([^>]*)>)?\(", pretty)
            kname = m.group(1) if m else pretty
            targ = (m.group(2) or "") if m else ""
            targ_last = targ.split("::")[-1].strip() if targ else ""
            dtype = _CU_DTYPES.get(targ_last, _CU_DTYPES.get(targ.strip(), "fp32" if not targ else targ))
            layout = "cl" if kname.startswith("cl_") else ("nchw" if kname.startswith("nchw_") else "any")
            threads = threads_of.get(kname)
            row = dict(base, kernel=kname, dtype=dtype, layout=layout,
                       config=f"threads={threads}" if threads else "threads=?",
                       regs=res["regs"], spills=res["spills"], spill_loads=res["spill_loads"],
                       smem_bytes=res["static_smem"], threads=threads,
                       occupancy=occupancy(res["regs"], res["static_smem"], threads) if threads else None)
            row.update(analyse_ptx(bodies.get(mangled, "")))
            rows.append(row)
    return rows


def _csrc_rows_or_error() -> list[dict]:
    try:
        return csrc_rows()
    except Exception as e:  # noqa: BLE001 - a row that fails the check, not a lost report
        return [dict(backend="cuda", family="csrc", site="all", shape="any", dtype="", layout="", config="",
                     kernel="csrc", in_use=True, error=f"{type(e).__name__}: {e}")]


def _split_ptx_entries(ptx: str) -> dict:
    """{entry name: its PTX text} for a multi-kernel PTX file."""
    out = {}
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"\.entry\s+(\w+)\s*\(", ptx)]
    for idx, (pos, name) in enumerate(starts):
        end = starts[idx + 1][0] if idx + 1 < len(starts) else len(ptx)
        out[name] = ptx[pos:end]
    return out


# ---------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------

FIELDS = ("kernel", "backend", "shape", "dtype", "layout", "config", "in_use", "regs", "spills", "smem_bytes",
          "occupancy", "load_bits", "wgmma", "waits_per_iter")


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.1%}" if v <= 1 else f"{v:g}"
    return str(v)


def markdown(doc: dict) -> str:
    rows = doc["rows"]
    out = [f"# Static kernel report: {doc['target']}", "",
           f"Generated by `{doc['command']}` from `{os.path.relpath(doc.get('json', 'sm90.json'), ROOT)}` "
           f"(git {doc['git_sha']}, triton {doc['triton']}, torch {doc['torch']}, {doc['nvcc']}); "
           f"{len(rows)} rows, {doc['seconds']:.0f} s on {doc['cpus']} CPUs ({doc.get('cpu_seconds', 0):.0f} CPU-seconds). "
           "Do not edit: regenerate.", "",
           "Occupancy: theoretical, from registers, shared memory and threads with H100's limits (65536 "
           "registers/SM in 256-register warp units, 228 KB smem/SM, 227 KB/block, 1 KB reserved per block, "
           "64 warps and 32 blocks/SM). load/store bits: the most common global access width in the PTX "
           "(cp.async counts its bytes). waits/iter: cp.async / wgmma / mbarrier waits in the main loop "
           "(innermost loop with the MMA); drain: waits once per iteration of the enclosing loop (the "
           "pipeline refilled per filter tap); depth: that loop's nesting depth.", ""]
    errors = [r for r in rows if r.get("error")]
    spills = [r for r in rows if r.get("in_use") and (r.get("spills") or 0) > 0]
    out += ["## Headline", ""]
    out.append(f"- compile errors: {len(errors)}")
    out.append(f"- in-use rows that spill: {len(spills)} (kernel, dtype, layout, config: bytes of spill stores)")
    agg = collections.defaultdict(list)
    for r in spills:
        agg[(r["kernel"], r["dtype"], r["layout"], r["config"])].append(r["spills"])
    for (k, d, l, c), v in sorted(agg.items()):
        out.append(f"  - `{k}` {d} {l} `{c}`: {min(v)}-{max(v)} B over {len(v)} shapes")
    nowg = sorted({(r["kernel"], r["config"]) for r in rows if r.get("wgmma") is False})
    out.append("- tl.dot not lowered to wgmma (mma.sync or FMA instead): "
               + (", ".join(f"`{k}` `{c}`" for k, c in nowg) if nowg else "none"))
    occ = [r["occupancy"] for r in rows if r.get("occupancy") is not None and r["backend"] == "triton"
           and r.get("wgmma") is not None]
    if occ:
        out.append(f"- occupancy of the Triton GEMM kernels (wgmma or not): {min(occ):.1%} to {max(occ):.1%}, "
                   f"{sum(o <= 0.125 for o in occ)} of {len(occ)} rows at 12.5 % or less")
    out.append("")
    out += ["## Summary per kernel and config (worst case over shapes)", "",
            "| backend | kernel | dtype | layout | config | shapes | regs | spills B | smem B | occupancy | "
            "load bits | store bits | wgmma | waits/iter | drain | depth |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = collections.OrderedDict()
    for r in rows:
        groups.setdefault((r["backend"], r["kernel"], r["dtype"], r["layout"], r["config"]), []).append(r)
    for (b, k, d, l, c), rs in groups.items():
        ok = [r for r in rs if not r.get("error")]
        if not ok:
            out.append(f"| {b} | `{k}` | {d} | {l} | {c} | {len(rs)} | ERROR | | | | | | | | | |")
            continue

        def span(field, worst=max):
            vals = [r.get(field) for r in ok if r.get(field) is not None]
            if not vals:
                return "-"
            lo, hi = min(vals, key=str), max(vals, key=str)
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                lo, hi = min(vals), max(vals)
            return _fmt(lo) if lo == hi else f"{_fmt(lo)}-{_fmt(hi)}"

        out.append(f"| {b} | `{k}` | {d} | {l} | {c} | {len(rs)} | {span('regs')} | {span('spills')} | "
                   f"{span('smem_bytes')} | {span('occupancy')} | {span('load_bits')} | {span('store_bits')} | "
                   f"{span('wgmma')} | {span('waits_per_iter')} | {span('drain_waits')} | {span('loop_depth')} |")
    out += ["", "## Every row", "", "<details><summary>all rows</summary>", "",
            "| backend | kernel | site | shape | dtype | layout | config | regs | spills B | smem B | occupancy | "
            "load bits | store bits | wgmma | waits/iter | drain |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            out.append(f"| {r['backend']} | `{r['kernel']}` | {r.get('site', '')} | {r['shape']} | {r['dtype']} | "
                       f"{r['layout']} | {r['config']} | ERROR: {r['error'].splitlines()[0][:120]} "
                       "| | | | | | | | |")
            continue
        out.append(f"| {r['backend']} | `{r['kernel']}` | {r.get('site', '')} | {r['shape']} | {r['dtype']} | "
                   f"{r['layout']} | {r['config']} | {r['regs']} | {r['spills']} | {r['smem_bytes']} | "
                   f"{_fmt(r['occupancy'])} | {_fmt(r['load_bits'])} | {_fmt(r.get('store_bits'))} | "
                   f"{_fmt(r['wgmma'])} | {_fmt(r['waits_per_iter'])} | {_fmt(r.get('drain_waits'))} |")
    out += ["", "</details>", ""]
    return "\n".join(out)


def _git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "triton_kernels", "csrc"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def _nvcc_version() -> str:
    try:
        v = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], capture_output=True,
                           text=True).stdout
        m = re.search(r"release ([\d.]+)", v)
        return f"nvcc {m.group(1)}" if m else "nvcc ?"
    except OSError:
        return "no nvcc"


def check_failures(rows: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """What ``--check`` fails on: rows whose kernel did not compile, rows of a config in use that spill, and rows
    of a config in use whose main loop drains its pipeline in an enclosing loop (drain_waits: the conv K loop
    is one loop over (tap, channel block), issue 15)."""
    errors = [r for r in rows if r.get("error")]
    ok = [r for r in rows if r.get("in_use") and not r.get("error")]
    spills = [r for r in ok if r.get("spills", 0) > 0]
    drains = [r for r in ok if (r.get("drain_waits") or 0) > 0]
    return errors, spills, drains


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true",
                    help="CI subset; exit 1 on a compile error, an in-use spill or an in-use pipeline drain")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/static/sm90.json; "
                                                "with --check nothing is written unless given)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-csrc", action="store_true", help="skip the csrc kernels")
    ap.add_argument("--filter", default=None, help="only Triton cases whose family/site/shape contains this")
    ap.add_argument("--dtype", default=None, help="only Triton cases of this dtype (bf16, fp16, fp32)")
    ap.add_argument("--layout", default=None, help="only Triton cases of this layout (cl, nchw)")
    ap.add_argument("--update", action="store_true",
                    help="re-run the selected Triton cases and replace their rows in --out (default: the report)")
    ap.add_argument("--markdown", default=None, metavar="JSON", help="only regenerate the markdown of JSON")
    args = ap.parse_args(argv)
    # the launchers' GPU paths (autotune lists, GPU tile heuristics): set before resfused.triton_kernels loads
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["RESFUSED_TRITON_AUTOTUNE"] = "1"

    if args.markdown:
        with open(args.markdown) as f:
            doc = json.load(f)
        doc["json"] = os.path.abspath(args.markdown)
        md_path = os.path.splitext(args.markdown)[0] + ".md"
        with open(md_path, "w") as f:
            f.write(markdown(doc))
        print(f"wrote {md_path}")
        return 0

    t0 = time.time()
    cases = triton_cases(args.check)
    if args.filter:
        cases = [c for c in cases if args.filter in f"{c.family} {c.site} {c.shape}"]
    if args.dtype:
        cases = [c for c in cases if c.dtype == args.dtype]
    if args.layout:
        cases = [c for c in cases if c.layout == args.layout]
    if args.update:
        args.no_csrc = True
    global _CASES
    _CASES = cases
    rows: list[dict] = []
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(max(1, args.jobs)) as pool:
        csrc_async = None if args.no_csrc else pool.apply_async(_csrc_rows_or_error)
        for i, case_rows in enumerate(pool.imap(_run_case_index, range(len(cases)), chunksize=1)):
            rows.extend(case_rows)
            bad = sum(1 for r in case_rows if r.get("error"))
            print(f"[{time.time() - t0:6.1f}s] {i + 1}/{len(cases)} {cases[i].family} {cases[i].site} "
                  f"{cases[i].dtype} {cases[i].layout}: {len(case_rows)} kernels" + (f", {bad} ERRORS" if bad else ""),
                  flush=True)
        if csrc_async is not None:
            rows.extend(csrc_async.get())
    import torch
    import triton
    seconds = time.time() - t0
    import resource
    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    for r in rows:
        r.pop("case_seconds", None)
    doc = {"target": "sm_90 (H100), static", "command": "python bench/static_report.py" + (" --check" if args.check
                                                                                           else ""),
           "git_sha": _git_sha(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "torch": torch.__version__, "triton": triton.__version__, "nvcc": _nvcc_version(),
           "cpus": args.jobs, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "batch": BATCH, "fields": list(FIELDS), "rows": rows}
    out = args.out or (None if args.check else os.path.join(OUT_DIR, "sm90.json"))
    if args.update:
        with open(out) as f:
            old_doc = json.load(f)
        redone = {(c.family, c.site, c.shape, c.dtype, c.layout) for c in cases}
        kept = [r for r in old_doc["rows"]
                if (r.get("family"), r.get("site"), r["shape"], r["dtype"], r["layout"]) not in redone]
        doc = dict(old_doc, rows=kept + rows, git_sha=doc["git_sha"], timestamp=doc["timestamp"],
                   command=old_doc["command"] + f" (then {len(cases)} cases re-run with --update at "
                                                f"{doc['git_sha']})")
        rows = doc["rows"]
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(doc, f, indent=1)
        doc["json"] = os.path.abspath(out)
        with open(os.path.splitext(out)[0] + ".md", "w") as f:
            f.write(markdown(doc))
        print(f"wrote {out} and its .md")
    errors, spills, drains = check_failures(rows)
    for r in errors:
        print(f"COMPILE ERROR {r['backend']} {r['kernel']} {r['dtype']} {r['layout']} {r['config']} {r['shape']}:\n"
              f"  {r['error'][:1500]}", file=sys.stderr)
    for r in spills:
        print(f"SPILL {r['backend']} {r['kernel']} {r['dtype']} {r['layout']} [{r['config']}] {r['shape']}: "
              f"{r['spills']} B spill stores, {r['regs']} regs", file=sys.stderr)
    for r in drains:
        print(f"DRAIN {r['backend']} {r['kernel']} {r['dtype']} {r['layout']} [{r['config']}] {r['shape']}: "
              f"{r['drain_waits']} waits outside the main loop (loop depth {r['loop_depth']})", file=sys.stderr)
    print(f"{len(rows)} rows in {seconds:.1f} s ({cpu:.0f} CPU-seconds): {len(errors)} compile errors, "
          f"{len(spills)} in-use rows spill, {len(drains)} in-use rows drain their pipeline per outer iteration")
    if args.check and (errors or spills or drains):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
