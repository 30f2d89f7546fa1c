"""Triton backend of the fused BatchNorm + residual add + ReLU op.

Same contract as resfused/reference/bn_add_relu.py (forward_train, forward_eval, backward); the packed
ReLU mask is bit-identical to resfused._layout.pack_mask, so masks and saved statistics move freely
between backends.

Passes over memory, counted in tensors of x's size (the 1-bit mask is 1/16 of a 16-bit tensor):

  training forward                       reads                 writes        passes
    _bn_stats_partial_kernel             x                     partials      1
    _bn_stats_finalize_kernel            partials (C-sized)    mean, invstd, running stats   ~0
    _bn_apply_kernel                     x, z                  y, mask       3 + 1/16
                                                                      total  4 + 1/16  (3 + 1/16 without z)
  The floor for a kernel that cannot keep x on chip between the statistics and the output is the same:
  x read twice, z read, y and the mask written. (The per-channel scale a = weight*invstd and shift
  b = bias are folded by the apply kernel from the C-sized vectors, which lets training and eval share
  one apply kernel; it costs nothing measurable next to the tensor passes.)

  backward (all gradients, training)
    _bn_bwd_reduce_kernel                dy, x, mask           g (= grad_residual), partials   3 + 1/16
    _bn_bwd_finalize_kernel              partials              sum(g), sum(g*xhat)             ~0
    _bn_bwd_elementwise_kernel           g, x                  dx                              3
                                                                      total  6 + 1/16
  Without a residual gradient g is not written and the elementwise kernel re-derives it from dy and the
  mask: 5 + 2/16. With training=False (running statistics are constants) dx = w*invstd*g needs no
  reduction and no x: 2 + 1/16 (3 + 1/16 with grad_residual). Floor: dy, x and the mask read for the
  reduction, x and g (or dy and the mask) read again for dx, dx and g written: 6 + 1/16.

  eval forward
    _bn_apply_kernel, scale/shift folded in-kernel from the running stats:
                                         x (, z)               y (, mask when grad is needed)
                                                                      total  2 (3 with z; +1/16 mask)
  Floor: the same (one read of each input, one write of each output).

With a per-sample scale (sample_scale, stochastic depth: y = relu(s[n]*((x - mean)*a + b) + z)) every
kernel that touches the normalised branch also reads s: N values, nothing next to the tensor passes. The
backward stores g = dy*mask as grad_residual and reduces and differentiates s[n]*g.

Numerics: statistics, affine math and reductions accumulate in the statistics dtype (fp32, fp64 for
fp64 input), whatever the input dtype. Mean and variance use per-tile two-pass moments merged with
Chan's formula, on data shifted by one sample of the channel (so inputs far from zero, e.g. mean 1e4,
keep their digits); never E[x^2]-E[x]^2. Normalisation is applied centred, (x - mean)*a + b. All
reductions are deterministic: per-program partials in a workspace, merged in a fixed order; no atomics.

Launches allocate through PyTorch, run on the current stream and never synchronise with the host, so
they can be captured in CUDA graphs (after a first, autotuning call outside the capture).
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
from typing import Optional

import torch
import triton
import triton.language as tl

from resfused import _layout

Tensor = torch.Tensor

# The interpreter runs kernels on CPU tensors; autotuning (which times launches) cannot run there.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# ---------------------------------------------------------------------------------------------------
# Tile heuristic (Python side, so workspace sizes are known before any launch).
#
# A tile is BLOCK_R "rows" x BLOCK_C channels, where a row is one N*H*W position:
#   channels_last: rows are consecutive (n, h, w) positions of C contiguous values; the channel block is
#     the contiguous axis.
#   NCHW: a tile belongs to one sample n and covers BLOCK_R consecutive spatial positions of BLOCK_C
#     channel planes; the spatial block is the contiguous axis.
# The contiguous block is a power of two >= 8, so tiles start on mask-byte boundaries and every byte of
# the packed mask is written by exactly one program.
#
# GPU (_gpu_blocks): tiles of _TILE_ELEMS = 2048 elements (16 values a thread at 4 warps, a few such
# tensors live in registers at once). channels_last: BLOCK_C = next_pow2(C) in [8, 64] (64 fp32 = 256
# contiguous bytes a row), BLOCK_R = 2048 // BLOCK_C. NCHW: BLOCK_R = next_pow2(H*W) in [8, 2048] (a whole
# 7x7 or 14x14 plane in one tile), BLOCK_C = 2048 // BLOCK_R. Both capped by the problem size.
#
# Interpreter (_interpreter_blocks): there the cost is per interpreted op, not per byte, so tiles are sized
# to cut each tensor into ~8 row tiles and 2 channel blocks (up to 4096-element tiles): the small shapes
# that tests afford still exercise row and channel tails, several tiles per program and the partial
# merges, and larger shapes do not crawl through thousands of tiny tiles.
#
# Elementwise kernels run one tile per program on a (row tiles, channel blocks) grid. Reductions run
# (row_programs, channel blocks) programs, program p looping over row tiles p, p + row_programs, ...;
# row_programs = min(row tiles, max(1, 4 * SMs // channel blocks)) on a GPU, so the reduction grid fills
# the machine about four times over while the workspace stays (3, row_programs, C); 3 under the
# interpreter. Finalize kernels merge _FINAL_BLOCK_P partials at a time (in order) for _FINAL_BLOCK_C
# channels per program.
# ---------------------------------------------------------------------------------------------------
_TILE_ELEMS = 2048
_PROGRAMS_PER_SM = 4
_INTERPRET_ROW_PROGRAMS = 3
_FINAL_BLOCK_P, _FINAL_BLOCK_C = (2, 16) if _INTERPRET else (32, 64)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _prev_pow2(v: int) -> int:
    return 1 << max(0, int(v).bit_length() - 1)


def _gpu_blocks(c: int, hw: int, rows: int, channels_last: bool) -> tuple[int, int]:
    if channels_last:
        block_c = min(max(_next_pow2(c), 8), 64)
        block_r = max(1, min(_TILE_ELEMS // block_c, _next_pow2(rows)))
    else:
        block_r = min(max(_next_pow2(hw), 8), _TILE_ELEMS)
        block_c = max(1, min(_TILE_ELEMS // block_r, _next_pow2(c)))
    return block_r, block_c


def _interpreter_blocks(c: int, hw: int, rows: int, channels_last: bool) -> tuple[int, int]:
    if channels_last:
        block_c = min(max(_next_pow2(c) // 2, 8), 64)
        block_r = max(64 // block_c, min(_prev_pow2(max(rows // 8, 1)), 4096 // block_c))
    else:
        block_r = min(max(_next_pow2(hw) // 2, 8), 4096)
        block_c = max(1, min(_next_pow2(c) // 2, 4096 // block_r))
    return block_r, block_c


_tile_blocks = _interpreter_blocks if _INTERPRET else _gpu_blocks

_INT32_MAX = 2**31 - 1


def _cap_rows(block_r: int, c: int, block_c: int) -> int:
    """channels_last: BLOCK_R capped so one tile's int32 offsets, r * C + j < BLOCK_R * (C + BLOCK_C), fit
    (binds only past 2^24 channels)."""
    return max(1, min(block_r, _prev_pow2(max(1, _INT32_MAX // (c + block_c)))))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _row_programs_target(device: torch.device, channel_blocks: int) -> int:
    if _INTERPRET:
        return _INTERPRET_ROW_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(1, _PROGRAMS_PER_SM * _sm_count(index) // channel_blocks)


class _Geometry:
    """Shape, layout and tiling of one (N, C, H, W) problem."""

    def __init__(self, x: Tensor):
        n, c, h, w = x.shape
        self.layout = _layout.layout_of(x)
        self.channels_last = self.layout == _layout.CL
        self.N, self.C, self.HW = n, c, h * w
        self.R = n * h * w  # rows (values per channel)
        self.CB = (c + 7) // 8  # mask bytes per row (channels_last)
        self.SB = (h * w + 7) // 8  # mask bytes per plane (NCHW)
        self.BLOCK_R, self.BLOCK_C = _tile_blocks(c, self.HW, self.R, self.channels_last)
        if self.channels_last:
            self.BLOCK_R = _cap_rows(self.BLOCK_R, c, self.BLOCK_C)
        if self.channels_last:
            self.S_TILES = 1  # unused
            self.row_tiles = triton.cdiv(self.R, self.BLOCK_R)
        else:
            self.S_TILES = triton.cdiv(self.HW, self.BLOCK_R)  # spatial tiles per sample
            self.row_tiles = n * self.S_TILES
        self.channel_blocks = triton.cdiv(c, self.BLOCK_C)
        self.row_programs = max(1, min(self.row_tiles, _row_programs_target(x.device, self.channel_blocks)))

    def common(self):
        """Arguments every tile kernel takes, in order: C, HW, R, S_TILES, CB, SB."""
        return (self.C, self.HW, self.R, self.S_TILES, self.CB, self.SB)

    def blocks(self):
        return dict(CHANNELS_LAST=self.channels_last, BLOCK_R=self.BLOCK_R, BLOCK_C=self.BLOCK_C)


def _split_f64(v: float) -> tuple[float, float]:
    """v as hi + lo, both exactly representable in fp32: float kernel arguments travel as fp32, and the
    fp64 path rebuilds v to ~48 bits from the pair (the fp32 path just gets hi)."""
    hi = struct.unpack("f", struct.pack("f", v))[0]
    lo = struct.unpack("f", struct.pack("f", v - hi))[0]
    return hi, lo


# RESFUSED_TRITON_AUTOTUNE=0: every kernel runs its one fixed config (num_warps 4), on a GPU as under the
# interpreter.
_AUTOTUNE = os.environ.get("RESFUSED_TRITON_AUTOTUNE", "1") not in ("", "0")
_FIXED_NUM_WARPS = 4
_TUNED_NUM_WARPS = (2, 4, 8)


def _autotuned(key):
    """triton.autotune over num_warps on a GPU, for the elementwise kernels only; the bare kernel (one
    fixed config, num_warps _FIXED_NUM_WARPS) under the interpreter or with RESFUSED_TRITON_AUTOTUNE=0.

    The reducing kernels (statistics partials and finalize, the backward's reduce and finalize) are never
    tuned: num_warps decides how tl.sum splits a tile among threads, so their order of summation, and with
    it the bits of the statistics, would follow whichever config won the timing in that process. Their tiles
    and grids are functions of the shape and the device (_Geometry), so the order is fixed by the shape. The
    elementwise kernels sum nothing in floating point (the mask's bit packing is an integer sum), so any
    config gives the same bits. No tuned kernel mutates a buffer it reads, so none needs restore_value."""

    def wrap(fn):
        if _INTERPRET or not _AUTOTUNE:
            return fn
        configs = [triton.Config({}, num_warps=w) for w in _TUNED_NUM_WARPS]
        return triton.autotune(configs=configs, key=key)(fn)

    return wrap


@contextlib.contextmanager
def _on_device(t: Tensor):
    if t.is_cuda:
        with torch.cuda.device(t.device):
            yield
    else:
        yield


# ---------------------------------------------------------------------------------------------------
# tile indexing helpers
# ---------------------------------------------------------------------------------------------------

@triton.jit
def _tile_index(t, c0, c, C, HW, R, S_TILES, CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr):
    """Element addressing of row tile ``t`` for channels ``c`` = c0 + [0, BLOCK_C).

    Returns (base: int64 scalar, offs: int32 [BLOCK_R, BLOCK_C], rows_ok: [BLOCK_R]); the element of
    tile row i and channel j lives at base + offs[i, j]. Contiguous along axis 1 (channels_last) or
    axis 0 (NCHW).

    Everything that grows with the tensor (the tile's row, sample, plane and first channel) is in the
    int64 scalar base; offs spans one tile only: (c - c0) * HW + r < BLOCK_C * HW <= 2 * _TILE_ELEMS
    (NCHW: BLOCK_R >= HW/2 whenever BLOCK_C > 1), r * C + (c - c0) < BLOCK_R * (C + BLOCK_C) < 2^31
    (channels_last: _cap_rows), so int32 cannot overflow however large one sample or plane is."""
    r = tl.arange(0, BLOCK_R)
    if CHANNELS_LAST:
        row0 = tl.cast(t, tl.int64) * BLOCK_R
        base = row0 * C + c0
        offs = r[:, None] * C + (c - c0)[None, :]
        rows_ok = r < tl.minimum(R - row0, BLOCK_R).to(tl.int32)
    else:
        n = t // S_TILES
        s0 = tl.cast(t - n * S_TILES, tl.int64) * BLOCK_R
        base = (tl.cast(n, tl.int64) * C + c0) * HW + s0
        offs = (c - c0)[None, :] * HW + r[:, None]
        rows_ok = r < tl.minimum(HW - s0, BLOCK_R).to(tl.int32)
    return base, offs, rows_ok


@triton.jit
def _store_mask_bits(mask_ptr, pos, t, c0, C, HW, R, S_TILES, CB, SB, CHANNELS_LAST: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pack ``pos`` [BLOCK_R, BLOCK_C] (False outside the tensor) eight to a byte along the contiguous
    axis and store the bytes of tile ``t``: bit j of a byte is element 8k+j of that axis, as pack_mask.
    Tiles start at multiples of 8 on the packed axis, so each byte belongs to exactly one tile. Offsets
    as in _tile_index: what grows with the tensor in an int64 base, one tile's span in int32."""
    if CHANNELS_LAST:
        shift = tl.arange(0, BLOCK_C) % 8
        bits = pos.to(tl.int32) << shift[None, :]
        packed = tl.sum(tl.reshape(bits, [BLOCK_R, BLOCK_C // 8, 8]), axis=2)
        r = tl.arange(0, BLOCK_R)
        kk = tl.arange(0, BLOCK_C // 8)
        row0 = tl.cast(t, tl.int64) * BLOCK_R
        base = row0 * CB + c0 // 8
        offs = r[:, None] * CB + kk[None, :]
        ok = (r < tl.minimum(R - row0, BLOCK_R).to(tl.int32))[:, None] & ((c0 // 8 + kk) < CB)[None, :]
    else:
        shift = tl.arange(0, BLOCK_R) % 8
        bits = pos.to(tl.int32) << shift[:, None]
        packed = tl.sum(tl.reshape(bits, [BLOCK_R // 8, 8, BLOCK_C]), axis=1)
        n = t // S_TILES
        k0 = tl.cast(t - n * S_TILES, tl.int64) * (BLOCK_R // 8)
        kk = tl.arange(0, BLOCK_R // 8)
        j = tl.arange(0, BLOCK_C)
        base = (tl.cast(n, tl.int64) * C + c0) * SB + k0
        offs = j[None, :] * SB + kk[:, None]
        ok = (kk < tl.minimum(SB - k0, BLOCK_R // 8).to(tl.int32))[:, None] & ((c0 + j) < C)[None, :]
    tl.store(mask_ptr + base + offs, packed.to(tl.uint8), mask=ok)


@triton.jit
def _load_mask_bits(mask_ptr, t, c0, c, ok, C, HW, R, S_TILES, CB, SB, CHANNELS_LAST: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    """The mask bits of tile ``t`` as a bool [BLOCK_R, BLOCK_C] (False where ``ok`` is False)."""
    r = tl.arange(0, BLOCK_R)
    if CHANNELS_LAST:
        base = tl.cast(t, tl.int64) * BLOCK_R * CB + c0 // 8
        offs = r[:, None] * CB + ((c - c0) // 8)[None, :]
        shift = (c % 8)[None, :]
    else:
        n = t // S_TILES
        s0 = tl.cast(t - n * S_TILES, tl.int64) * BLOCK_R
        base = (tl.cast(n, tl.int64) * C + c0) * SB + s0 // 8
        offs = (c - c0)[None, :] * SB + (r // 8)[:, None]
        shift = (r % 8)[:, None]
    byte = tl.load(mask_ptr + base + offs, mask=ok, other=0)
    return ((byte.to(tl.int32) >> shift) & 1) != 0


@triton.jit
def _sample_scale_rows(ss_ptr, t, HW, R, S_TILES, CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr):
    """sample_scale[n] of each row of tile ``t`` as [BLOCK_R] (sample_scale's dtype, the statistics dtype).
    channels_last rows are (n, h, w) positions, n = row // HW; an NCHW tile lies inside one sample,
    n = t // S_TILES."""
    if CHANNELS_LAST:
        rows = tl.cast(t, tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        s = tl.load(ss_ptr + rows // HW, mask=rows < R, other=0.0)
    else:
        s = tl.zeros([BLOCK_R], dtype=ss_ptr.dtype.element_ty) + tl.load(ss_ptr + t // S_TILES)
    return s


@triton.jit
def _inv_sqrt(v):
    """1/sqrt(v) with a correctly rounded sqrt (tl.rsqrt is an approximation on GPUs); the fp32 division
    compiles to div.full (within 2 ulp), so invstd may differ from torch.rsqrt by an ulp or two."""
    if v.dtype == tl.float64:
        r = 1.0 / tl.sqrt(v)
    else:
        r = 1.0 / tl.math.sqrt_rn(v)
    return r


@triton.jit
def _shift_of(x_ptr, c, c_ok, HW, CHANNELS_LAST: tl.constexpr):
    """Per-channel shift for the moments: the channel's first value (row 0), in x's dtype."""
    return tl.load(x_ptr + _shift_offset(c, HW, CHANNELS_LAST), mask=c_ok, other=0.0)


@triton.jit
def _shift_offset(c, HW, CHANNELS_LAST: tl.constexpr):
    """Offsets of channels c's first values in sample 0: c (channels_last) or c * HW in int64 (C * HW may pass
    2^31)."""
    if CHANNELS_LAST:
        off = c
    else:
        off = c.to(tl.int64) * HW
    return off


# ---------------------------------------------------------------------------------------------------
# training forward: statistics
# ---------------------------------------------------------------------------------------------------

@triton.jit
def _bn_stats_partial_kernel(x_ptr, ws_ptr, C, HW, R, S_TILES, CB, SB, row_tiles,
                             CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-program (count, mean, M2) of x - shift over row tiles pid, pid + P, ... for BLOCK_C channels.

    ws: (3, P, C) of the statistics dtype; the mean is of the shifted data."""
    pid_r = tl.program_id(0)
    n_prog = tl.num_programs(0)
    c0 = tl.program_id(1) * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc_ty = ws_ptr.dtype.element_ty
    shift = _shift_of(x_ptr, c, c_ok, HW, CHANNELS_LAST).to(acc_ty)
    cnt = tl.zeros([BLOCK_C], dtype=acc_ty)
    mean = tl.zeros([BLOCK_C], dtype=acc_ty)
    m2 = tl.zeros([BLOCK_C], dtype=acc_ty)
    for t in range(pid_r, row_tiles, n_prog):
        base, offs, rows_ok = _tile_index(t, c0, c, C, HW, R, S_TILES, CHANNELS_LAST, BLOCK_R)
        ok = rows_ok[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + base + offs, mask=ok, other=0.0).to(acc_ty)
        d = tl.where(ok, x - shift[None, :], 0.0)
        # every tile has at least one valid row
        nt = tl.sum(rows_ok.to(acc_ty), axis=0)
        tmean = tl.sum(d, axis=0) / nt
        dev = tl.where(ok, d - tmean[None, :], 0.0)
        tm2 = tl.sum(dev * dev, axis=0)
        # Chan et al. merge of (cnt, mean, m2) with the tile's (nt, tmean, tm2)
        n_new = cnt + nt
        frac = nt / n_new
        delta = tmean - mean
        mean = mean + delta * frac
        m2 = m2 + tm2 + delta * delta * cnt * frac
        cnt = n_new
    plane = n_prog * C
    out = pid_r * C + c
    tl.store(ws_ptr + out, cnt, mask=c_ok)
    tl.store(ws_ptr + plane + out, mean, mask=c_ok)
    tl.store(ws_ptr + 2 * plane + out, m2, mask=c_ok)


@triton.jit
def _bn_stats_finalize_kernel(ws_ptr, x_ptr, mean_ptr, invstd_ptr, rm_ptr, rv_ptr, C, HW, P,
                              eps_hi, eps_lo, mom_hi, mom_lo,
                              HAS_RUNNING: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the P partials in a fixed order (blocks of BLOCK_P, in order) -> mean, invstd and the
    running-stats update (unbiased variance)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc_ty = ws_ptr.dtype.element_ty
    cnt = tl.zeros([BLOCK_C], dtype=acc_ty)
    mean = tl.zeros([BLOCK_C], dtype=acc_ty)
    m2 = tl.zeros([BLOCK_C], dtype=acc_ty)
    plane = P * C
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ok = (p < P)[:, None] & c_ok[None, :]
        idx = p[:, None] * C + c[None, :]
        n_i = tl.load(ws_ptr + idx, mask=ok, other=0.0)
        mean_i = tl.load(ws_ptr + plane + idx, mask=ok, other=0.0)
        m2_i = tl.load(ws_ptr + 2 * plane + idx, mask=ok, other=0.0)
        nb = tl.sum(n_i, axis=0)
        mb = tl.sum(n_i * mean_i, axis=0) / tl.maximum(nb, 1.0)
        dev = tl.where(ok, mean_i - mb[None, :], 0.0)
        m2b = tl.sum(m2_i + n_i * dev * dev, axis=0)
        n_new = cnt + nb
        frac = tl.where(n_new > 0, nb / tl.maximum(n_new, 1.0), 0.0)
        delta = mb - mean
        mean = mean + delta * frac
        m2 = m2 + m2b + delta * delta * cnt * frac
        cnt = n_new
    mean = mean + _shift_of(x_ptr, c, c_ok, HW, CHANNELS_LAST).to(acc_ty)
    zero = tl.zeros([BLOCK_C], dtype=acc_ty)
    eps = (zero + eps_hi) + eps_lo
    cnt_safe = tl.maximum(cnt, 1.0)  # channel lanes past C have no data
    invstd = _inv_sqrt(m2 / cnt_safe + eps)
    tl.store(mean_ptr + c, mean, mask=c_ok)
    tl.store(invstd_ptr + c, invstd, mask=c_ok)
    if HAS_RUNNING:
        mom = (zero + mom_hi) + mom_lo
        unbiased = m2 / tl.maximum(cnt - 1.0, 1.0)
        rm = tl.load(rm_ptr + c, mask=c_ok, other=0.0)
        rv = tl.load(rv_ptr + c, mask=c_ok, other=0.0)
        tl.store(rm_ptr + c, rm * (1.0 - mom) + mean * mom, mask=c_ok)
        tl.store(rv_ptr + c, rv * (1.0 - mom) + unbiased * mom, mask=c_ok)


# ---------------------------------------------------------------------------------------------------
# forward apply (training and eval)
# ---------------------------------------------------------------------------------------------------

@_autotuned(key=["C", "HW", "R", "HAS_RESIDUAL", "HAS_SAMPLE_SCALE", "RELU", "WRITE_MASK", "CHANNELS_LAST"])
@triton.jit
def _bn_apply_kernel(x_ptr, z_ptr, y_ptr, mask_ptr, mean_ptr, scale_ptr, weight_ptr, bias_ptr, ss_ptr,
                     C, HW, R, S_TILES, CB, SB, eps_hi, eps_lo,
                     SCALE_IS_VAR: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr, HAS_SAMPLE_SCALE: tl.constexpr, RELU: tl.constexpr,
                     WRITE_MASK: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """y = relu(s[n]*((x - mean)*a + b) + z) for one tile, a = weight*invstd, b = bias, s = sample_scale
    (1 without HAS_SAMPLE_SCALE); writes the packed mask.

    scale_ptr holds invstd (training) or the running variance (SCALE_IS_VAR, eval: invstd is folded
    here as 1/sqrt(var + eps))."""
    t = tl.program_id(0)
    c0 = tl.program_id(1) * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc_ty = mean_ptr.dtype.element_ty
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)
    a = tl.load(scale_ptr + c, mask=c_ok, other=1.0)
    if SCALE_IS_VAR:
        zero = tl.zeros([BLOCK_C], dtype=acc_ty)
        a = _inv_sqrt(a + ((zero + eps_hi) + eps_lo))
    if HAS_WEIGHT:
        a = a * tl.load(weight_ptr + c, mask=c_ok, other=1.0)
    if HAS_BIAS:
        b = tl.load(bias_ptr + c, mask=c_ok, other=0.0)
    else:
        b = tl.zeros([BLOCK_C], dtype=acc_ty)
    base, offs, rows_ok = _tile_index(t, c0, c, C, HW, R, S_TILES, CHANNELS_LAST, BLOCK_R)
    ok = rows_ok[:, None] & c_ok[None, :]
    x = tl.load(x_ptr + base + offs, mask=ok, other=0.0).to(acc_ty)
    acc = (x - mean[None, :]) * a[None, :] + b[None, :]
    if HAS_SAMPLE_SCALE:
        acc = acc * _sample_scale_rows(ss_ptr, t, HW, R, S_TILES, CHANNELS_LAST, BLOCK_R)[:, None].to(acc_ty)
    if HAS_RESIDUAL:
        acc = acc + tl.load(z_ptr + base + offs, mask=ok, other=0.0).to(acc_ty)
    if RELU:
        pos = acc > 0
        acc = tl.where(pos, acc, 0.0)
        if WRITE_MASK:
            _store_mask_bits(mask_ptr, pos & ok, t, c0, C, HW, R, S_TILES, CB, SB, CHANNELS_LAST, BLOCK_R,
                             BLOCK_C)
    tl.store(y_ptr + base + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------------

@triton.jit
def _bn_bwd_reduce_kernel(dy_ptr, x_ptr, mask_ptr, g_ptr, mean_ptr, ss_ptr, ws_ptr, C, HW, R, S_TILES, CB, SB,
                          row_tiles, HAS_MASK: tl.constexpr, WRITE_G: tl.constexpr, HAS_SAMPLE_SCALE: tl.constexpr,
                          CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """g = dy*mask (stored when WRITE_G: it is the residual's gradient); per-program partial sums of
    gb and gb*(x - mean) into ws (2, P, C), gb = s[n]*g the BN branch's gradient (g without
    HAS_SAMPLE_SCALE)."""
    pid_r = tl.program_id(0)
    n_prog = tl.num_programs(0)
    c0 = tl.program_id(1) * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc_ty = ws_ptr.dtype.element_ty
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(acc_ty)
    sum_g = tl.zeros([BLOCK_C], dtype=acc_ty)
    sum_gx = tl.zeros([BLOCK_C], dtype=acc_ty)
    for t in range(pid_r, row_tiles, n_prog):
        base, offs, rows_ok = _tile_index(t, c0, c, C, HW, R, S_TILES, CHANNELS_LAST, BLOCK_R)
        ok = rows_ok[:, None] & c_ok[None, :]
        g = tl.load(dy_ptr + base + offs, mask=ok, other=0.0).to(acc_ty)
        if HAS_MASK:
            bits = _load_mask_bits(mask_ptr, t, c0, c, ok, C, HW, R, S_TILES, CB, SB, CHANNELS_LAST, BLOCK_R)
            g = tl.where(bits, g, 0.0)
        if WRITE_G:
            tl.store(g_ptr + base + offs, g.to(g_ptr.dtype.element_ty), mask=ok)
        if HAS_SAMPLE_SCALE:
            g = g * _sample_scale_rows(ss_ptr, t, HW, R, S_TILES, CHANNELS_LAST, BLOCK_R)[:, None].to(acc_ty)
        x = tl.load(x_ptr + base + offs, mask=ok, other=0.0).to(acc_ty)
        xc = tl.where(ok, x - mean[None, :], 0.0)
        sum_g = sum_g + tl.sum(g, axis=0)
        sum_gx = sum_gx + tl.sum(g * xc, axis=0)
    out = pid_r * C + c
    tl.store(ws_ptr + out, sum_g, mask=c_ok)
    tl.store(ws_ptr + n_prog * C + out, sum_gx, mask=c_ok)


@triton.jit
def _bn_bwd_finalize_kernel(ws_ptr, invstd_ptr, sum_g_ptr, sum_gxhat_ptr, C, P,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Fixed-order sums of the partials: sum(g) (grad_bias) and sum(g*xhat) (grad_weight)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc_ty = ws_ptr.dtype.element_ty
    sum_g = tl.zeros([BLOCK_C], dtype=acc_ty)
    sum_gx = tl.zeros([BLOCK_C], dtype=acc_ty)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ok = (p < P)[:, None] & c_ok[None, :]
        idx = p[:, None] * C + c[None, :]
        sum_g = sum_g + tl.sum(tl.load(ws_ptr + idx, mask=ok, other=0.0), axis=0)
        sum_gx = sum_gx + tl.sum(tl.load(ws_ptr + P * C + idx, mask=ok, other=0.0), axis=0)
    invstd = tl.load(invstd_ptr + c, mask=c_ok, other=0.0)
    tl.store(sum_g_ptr + c, sum_g, mask=c_ok)
    tl.store(sum_gxhat_ptr + c, sum_gx * invstd, mask=c_ok)


@_autotuned(key=["C", "HW", "R", "G_FROM_BUFFER", "HAS_MASK", "WRITE_G", "WRITE_DX", "TRAINING", "HAS_SAMPLE_SCALE",
                 "CHANNELS_LAST"])
@triton.jit
def _bn_bwd_elementwise_kernel(dy_ptr, mask_ptr, g_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, weight_ptr,
                               sum_g_ptr, sum_gxhat_ptr, ss_ptr, C, HW, R, S_TILES, CB, SB,
                               G_FROM_BUFFER: tl.constexpr, HAS_MASK: tl.constexpr, WRITE_G: tl.constexpr,
                               WRITE_DX: tl.constexpr, TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                               HAS_SAMPLE_SCALE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = w*invstd*(gb - sum(gb)/n - xhat*sum(gb*xhat)/n) (training) or w*invstd*gb (eval), for one tile,
    gb = s[n]*g (g without HAS_SAMPLE_SCALE); the sums are the BN branch's (the reduce kernel's).

    g (= dy*mask) is read from g_ptr (G_FROM_BUFFER, written by the reduce kernel) or rebuilt from dy and
    the mask, and then optionally stored to g_ptr (WRITE_G: grad_residual when no reduction ran)."""
    t = tl.program_id(0)
    c0 = tl.program_id(1) * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc_ty = invstd_ptr.dtype.element_ty
    base, offs, rows_ok = _tile_index(t, c0, c, C, HW, R, S_TILES, CHANNELS_LAST, BLOCK_R)
    ok = rows_ok[:, None] & c_ok[None, :]
    if G_FROM_BUFFER:
        g = tl.load(g_ptr + base + offs, mask=ok, other=0.0).to(acc_ty)
    else:
        g = tl.load(dy_ptr + base + offs, mask=ok, other=0.0).to(acc_ty)
        if HAS_MASK:
            bits = _load_mask_bits(mask_ptr, t, c0, c, ok, C, HW, R, S_TILES, CB, SB, CHANNELS_LAST, BLOCK_R)
            g = tl.where(bits, g, 0.0)
        if WRITE_G:
            tl.store(g_ptr + base + offs, g.to(g_ptr.dtype.element_ty), mask=ok)
    if WRITE_DX:
        if HAS_SAMPLE_SCALE:
            g = g * _sample_scale_rows(ss_ptr, t, HW, R, S_TILES, CHANNELS_LAST, BLOCK_R)[:, None].to(acc_ty)
        invstd = tl.load(invstd_ptr + c, mask=c_ok, other=0.0)
        k = invstd
        if HAS_WEIGHT:
            k = k * tl.load(weight_ptr + c, mask=c_ok, other=0.0)
        if TRAINING:
            inv_n = 1.0 / (tl.zeros([BLOCK_C], dtype=acc_ty) + R)
            mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)
            mean_g = tl.load(sum_g_ptr + c, mask=c_ok, other=0.0) * inv_n
            coef_x = tl.load(sum_gxhat_ptr + c, mask=c_ok, other=0.0) * inv_n * invstd
            x = tl.load(x_ptr + base + offs, mask=ok, other=0.0).to(acc_ty)
            dx = k[None, :] * (g - mean_g[None, :] - (x - mean[None, :]) * coef_x[None, :])
        else:
            dx = k[None, :] * g
        tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------------
# launchers (the backend contract)
# ---------------------------------------------------------------------------------------------------

def _vec(v: Optional[Tensor]) -> Optional[Tensor]:
    return None if v is None else v.contiguous()


def _dense_like(t: Tensor, geo: _Geometry) -> Tensor:
    fmt = _layout.memory_format(geo.layout)
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def _empty_mask_for(x: Tensor, geo: _Geometry, relu: bool, want: bool) -> Tensor:
    if not (relu and want):
        return _layout.empty_mask(x.device)
    return torch.empty(_layout.mask_shape(x.shape, geo.layout), dtype=torch.uint8, device=x.device)


def _launch_apply(x, residual, y, mask, mean, scale, weight, bias, sample_scale, eps, scale_is_var, relu,
                  write_mask, geo: _Geometry):
    eps_hi, eps_lo = _split_f64(eps)
    _bn_apply_kernel[(geo.row_tiles, geo.channel_blocks)](
        x, residual if residual is not None else x, y, mask if write_mask else y, mean, scale,
        weight if weight is not None else mean, bias if bias is not None else mean,
        sample_scale if sample_scale is not None else mean,
        *geo.common(), eps_hi, eps_lo,
        SCALE_IS_VAR=scale_is_var, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, HAS_SAMPLE_SCALE=sample_scale is not None, RELU=relu,
        WRITE_MASK=write_mask, **geo.blocks())


def forward_train(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float, eps: float,
                  relu: bool, sample_scale: Optional[Tensor] = None):
    """Batch statistics (of x), running-stats update, y = relu(s[n]*((x - mean)*a + b) + residual).

    x: (N, C, H, W) NCHW-contiguous or channels_last; residual None or like x; sample_scale None (s = 1)
    or (N,) in the statistics dtype. Returns (y, mask, mean, invstd): y like x, the packed uint8 ReLU
    mask (empty without relu), mean/invstd (C,) in the statistics dtype. running_mean/running_var are
    updated in place (unbiased variance)."""
    geo = _Geometry(x)
    stats_dtype = _layout.stats_dtype(x.dtype)
    c = geo.C
    y = torch.empty_like(x)
    mask = _empty_mask_for(x, geo, relu, True)
    mean = torch.empty(c, dtype=stats_dtype, device=x.device)
    invstd = torch.empty(c, dtype=stats_dtype, device=x.device)
    if x.numel() == 0:
        # Statistics of nothing are NaN; the running stats are left as they are, as F.batch_norm does.
        mean.fill_(float("nan"))
        invstd.fill_(float("nan"))
        mask.zero_()
        return y, mask, mean, invstd
    if residual is not None:
        residual = _dense_like(residual, geo)
    weight, bias = _vec(weight), _vec(bias)
    rm, rv = _vec(running_mean), _vec(running_var)
    has_running = rm is not None and rv is not None
    ws = torch.empty((3, geo.row_programs, c), dtype=stats_dtype, device=x.device)
    eps_hi, eps_lo = _split_f64(eps)
    mom_hi, mom_lo = _split_f64(momentum)
    with _on_device(x):
        _bn_stats_partial_kernel[(geo.row_programs, geo.channel_blocks)](
            x, ws, *geo.common(), geo.row_tiles, **geo.blocks())
        _bn_stats_finalize_kernel[(triton.cdiv(c, _FINAL_BLOCK_C),)](
            ws, x, mean, invstd, rm if has_running else mean, rv if has_running else invstd, c, geo.HW,
            geo.row_programs, eps_hi, eps_lo, mom_hi, mom_lo,
            HAS_RUNNING=has_running, CHANNELS_LAST=geo.channels_last, BLOCK_P=_FINAL_BLOCK_P,
            BLOCK_C=_FINAL_BLOCK_C)
        _launch_apply(x, residual, y, mask, mean, invstd, weight, bias, _vec(sample_scale), eps, False, relu, relu,
                      geo)
    if has_running:
        if rm is not running_mean:
            running_mean.copy_(rm)
        if rv is not running_var:
            running_var.copy_(rv)
    return y, mask, mean, invstd


def forward_eval(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                 running_mean: Tensor, running_var: Tensor, eps: float, relu: bool, save_mask: bool,
                 sample_scale: Optional[Tensor] = None):
    """y = relu(s[n]*((x - running_mean)*a + b) + residual), a = weight/sqrt(running_var + eps), in one pass.

    Returns (y, mask); the mask is empty unless relu and save_mask."""
    geo = _Geometry(x)
    y = torch.empty_like(x)
    write_mask = relu and save_mask
    mask = _empty_mask_for(x, geo, relu, save_mask)
    if x.numel() == 0:
        mask.zero_()
        return y, mask
    if residual is not None:
        residual = _dense_like(residual, geo)
    with _on_device(x):
        _launch_apply(x, residual, y, mask, _vec(running_mean), _vec(running_var), _vec(weight), _vec(bias),
                      _vec(sample_scale), eps, True, relu, write_mask, geo)
    return y, mask


def backward(grad_out: Tensor, x: Tensor, mask: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
             relu: bool, training: bool, need_input_grad: bool, need_residual_grad: bool, need_weight_grad: bool,
             sample_scale: Optional[Tensor] = None):
    """Gradients of y = relu(s[n]*(w*(x - mean)*invstd + b) + residual) (s = 1 without sample_scale).

    grad_out and x: (N, C, H, W) in x's layout; mask as saved by the forward; mean/invstd (C,) in the
    statistics dtype (batch statistics, or the running ones with training=False, when they are constants).
    Returns (grad_input, grad_residual, grad_weight, grad_bias); outputs not asked for are fresh empty
    tensors (grad_weight and grad_bias come together). grad_residual is g = dy*mask, the BN branch gets
    s[n]*g."""
    geo = _Geometry(x)
    stats_dtype = mean.dtype
    c = geo.C

    def empty(dtype):
        return torch.empty(0, dtype=dtype, device=x.device)

    grad_input = torch.empty_like(x) if need_input_grad else empty(x.dtype)
    grad_residual = torch.empty_like(x) if need_residual_grad else empty(x.dtype)
    if need_weight_grad:
        grad_weight = torch.empty(c, dtype=stats_dtype, device=x.device)
        grad_bias = torch.empty(c, dtype=stats_dtype, device=x.device)
    else:
        grad_weight, grad_bias = empty(stats_dtype), empty(stats_dtype)
    if x.numel() == 0:
        if need_weight_grad:
            grad_weight.zero_()
            grad_bias.zero_()
        return grad_input, grad_residual, grad_weight, grad_bias

    grad_out = _dense_like(grad_out, geo)
    mask = mask.contiguous() if relu else x  # x: a placeholder pointer, never read without a mask
    mean, invstd, weight = _vec(mean), _vec(invstd), _vec(weight)
    w_arg = weight if weight is not None else invstd
    has_ss = sample_scale is not None
    ss_arg = _vec(sample_scale) if has_ss else invstd
    need_reduce = need_weight_grad or (need_input_grad and training)
    with _on_device(x):
        if need_reduce:
            ws = torch.empty((2, geo.row_programs, c), dtype=stats_dtype, device=x.device)
            _bn_bwd_reduce_kernel[(geo.row_programs, geo.channel_blocks)](
                grad_out, x, mask, grad_residual if need_residual_grad else grad_out, mean, ss_arg, ws,
                *geo.common(), geo.row_tiles, HAS_MASK=relu, WRITE_G=need_residual_grad, HAS_SAMPLE_SCALE=has_ss,
                **geo.blocks())
            if need_weight_grad:
                sum_g, sum_gxhat = grad_bias, grad_weight
            else:
                sums = torch.empty((2, c), dtype=stats_dtype, device=x.device)
                sum_g, sum_gxhat = sums[0], sums[1]
            _bn_bwd_finalize_kernel[(triton.cdiv(c, _FINAL_BLOCK_C),)](
                ws, invstd, sum_g, sum_gxhat, c, geo.row_programs, BLOCK_P=_FINAL_BLOCK_P, BLOCK_C=_FINAL_BLOCK_C)
            if need_input_grad:
                # g was stored in x's dtype: reuse it only when that loses nothing.
                g_from_buffer = need_residual_grad and grad_out.dtype == x.dtype
                _bn_bwd_elementwise_kernel[(geo.row_tiles, geo.channel_blocks)](
                    grad_out, mask, grad_residual if need_residual_grad else grad_out, x, grad_input, mean, invstd,
                    w_arg, sum_g, sum_gxhat, ss_arg, *geo.common(),
                    G_FROM_BUFFER=g_from_buffer, HAS_MASK=relu, WRITE_G=False, WRITE_DX=True, TRAINING=training,
                    HAS_WEIGHT=weight is not None, HAS_SAMPLE_SCALE=has_ss, **geo.blocks())
        elif need_input_grad or need_residual_grad:
            # No reduction: dx (if asked) is w*invstd*g with constant statistics; g written if asked.
            _bn_bwd_elementwise_kernel[(geo.row_tiles, geo.channel_blocks)](
                grad_out, mask, grad_residual if need_residual_grad else grad_out, x,
                grad_input if need_input_grad else grad_out, mean, invstd, w_arg, invstd, invstd, ss_arg,
                *geo.common(), G_FROM_BUFFER=False, HAS_MASK=relu, WRITE_G=need_residual_grad,
                WRITE_DX=need_input_grad, TRAINING=False, HAS_WEIGHT=weight is not None, HAS_SAMPLE_SCALE=has_ss,
                **geo.blocks())
    return grad_input, grad_residual, grad_weight, grad_bias
