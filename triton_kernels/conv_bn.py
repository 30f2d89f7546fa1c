"""Triton kernels of the fused conv + BatchNorm training path: forward with a BN + ReLU prologue and a
batch-statistics epilogue; backward (wgrad, dgrad) recomputing the prologue, dReLU + dBN sums in the epilogue;
the block tail (bn + add (+ downsample bn) + ReLU) and its backward.

Forward:
    a[m, k] = relu((x[m, k] - in_mean[c]) * in_scale[c] + in_shift[c])   (c = k's input channel; prologue)
    y[m, co] = sum_k a[m, k] * w[k, co]                                    (implicit GEMM, fp32 accumulator)
    per (row tile t, channel co): count_t, mean_t, M2_t of the fp32 accumulator over the tile's valid rows

The GEMM view and the two K loops (per-tap channel loop; flat-K for narrow groups) are those of
triton_kernels/conv_bias_act.py. The prologue is applied to each A tile right after it is gathered, in fp32,
then rounded to the input dtype for the dot; positions outside the image (zero padding) and past the tensor
are set to 0 AFTER the activation, so a padded position contributes 0, not relu(in_shift).

Statistics: per statistics tile of _STATS_M output rows (a function of the shape, not of the autotuned BLOCK_M,
which is a multiple of it; summed by a fixed pairwise tree, not tl.sum, whose order follows num_warps), each
program writes its tiles' (mean, M2) per output channel into a (T, C_out) fp32 buffer and their row counts into
a (T,) buffer (T = number of statistics tiles), so no autotuned parameter changes the order of any sum; ``_bn_stats_finalize_kernel`` merges the T
partials per channel in tile order with Chan's formula (centred; no E[x^2] - E[x]^2, no atomics, so the
result is deterministic), writes mean and invstd and updates running_mean / running_var as nn.BatchNorm2d
does (unbiased variance). Beyond _STATS_CHUNK tiles the merge takes two levels: ``_bn_stats_merge_kernel``
merges runs of about sqrt(T) tiles in parallel (one program per run and channel block), and the finalize
merges those, so no program walks more than about max(_STATS_CHUNK, sqrt(T)) partials.

Backward (three kernels and a torch.sum):
  * wgrad: dw = dy^T @ a with a regathered from x and the prologue recomputed per tile (a is never stored);
    each program owns a dw tile over one split of the rows (split-K: about 4 programs per SM, at least
    _WGRAD_MIN_ITERS row tiles per split), the fp32 split partials summed by torch.sum (no atomics: the same
    bits on every run with the same device and config).
  * dgrad: grad_a = dy (*) w^T as an implicit GEMM over input pixels (stride handled by divisibility masks);
    with a prologue its epilogue reloads x, recomputes z = bn(x), applies dReLU (gz = grad_a where z > 0),
    writes gz in x's dtype and per-tile partial sums of gz and gz * xhat from the fp32 accumulator (the dBN
    reductions; no atomics);
  * torch.sum adds the partials (a parallel, deterministic reduction): grad of the prologue BN's weight and bias;
  * _bn_input_grad_kernel: grad_x = w * invstd * (gz - mean(gz) - xhat * mean(gz * xhat)) elementwise, over
    the tail kernels' (rows, columns) tiles (flat offsets; per-channel vectors loaded once per tile).

Passes over memory per conv, training (activations only; w is small):
  forward   read x (once per N-tile of C_out), write y; partials 2 * T * C_out * 4 bytes (1/_STATS_M of y in fp32).
  backward  wgrad: read x + read dy (once per tile of dw); dgrad: read dy, read x, write gz; input grad:
            read gz + read x, write grad_x (gz, x and grad_x in x's dtype). Stock (conv, BN, ReLU as separate
            ops) additionally writes and reads the normalized activation in forward, saves it for backward, and
            runs BN/ReLU backward as separate passes. Floor aimed at: forward read(x) + write(y); backward
            read(x) + read(dy) per GEMM + write(grad_x); the gz round trip (write + read, one x-sized tensor
            each way) and the second read of x are what this version adds over that floor.

Block tail, out = relu(bn(y) + residual) or relu(bn(y) + bn_d(residual)) (the downsample BN applied here):
  forward   _tail_fwd_kernel: read y, read the residual, write out and the packed 1-bit mask: 3 + 1/16 passes
            (16-bit dtypes); floor the same.
  backward  _tail_bwd_reduce_kernel: read grad, mask, y (and the residual when its BN is here) -> per-program
            partial sums of gz and gz * xhat (no atomics; the small partial buffers are summed per channel with
            torch.sum, deterministic); _tail_bwd_elementwise_kernel: read grad, mask, y (, residual), write
            grad_y and grad_residual. Training, all gradients: 6 + 2/16 passes without a BN on the residual
            (grad_residual = gz), 8 + 2/16 with one. Floor: the reductions must finish before any grad_y element
            is known, so grad, mask and y are read twice: the same.

Forward conv autotuned on GPU over tiles that keep every order of summation (triton_kernels/conv_bias_act.py's
list: BLOCK_K fixed; tests/test_determinism.py checks every config gives the same bits); the backward and tail
kernels use one fixed GPU config; one fixed config for everything under TRITON_INTERPRET=1 or with
RESFUSED_TRITON_AUTOTUNE=0. Launches run on their tensors' device. Offsets are int32 unless a tensor of the call
holds 2^31 elements or more (INDEX64); the tail kernels run on a 1-D grid. Not yet run on a GPU.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .conv_bias_act import (_FLAT_K_BELOW, _PRUNE, _gemm_tile, _gpu_configs, _k_range, _mma, _out_size, _pixel,
                            _tap_channels, index64, input_precision, on_device)

Tensor = torch.Tensor

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _prologue(a, c, c_ok, ok, mean_ptr, scale_ptr, shift_ptr, PROLOGUE: tl.constexpr):
    """relu(bn(a)) in fp32 for a gathered (BLOCK_M, BLOCK_K) tile, zero where ``ok`` is False (padding)."""
    if PROLOGUE:
        mu = tl.load(mean_ptr + c, mask=c_ok, other=0.0)
        sc = tl.load(scale_ptr + c, mask=c_ok, other=0.0)
        sh = tl.load(shift_ptr + c, mask=c_ok, other=0.0)
        z = (a.to(tl.float32) - mu[None, :]) * sc[None, :] + sh[None, :]
        z = tl.where(ok, tl.maximum(z, 0.0), 0.0)
        a = z.to(a.dtype)
    return a


@triton.jit
def _conv_bn_fwd_kernel(
        x_ptr, w_ptr, mean_ptr, scale_ptr, shift_ptr, y_ptr, pmean_ptr, pm2_ptr, pcnt_ptr,
        M, M_BUCKET, H, W, C_IN_G, HO, WO, C_OUT_G, C_OUT,
        sxn, sxc, sxh, sxw,
        swo, swi, swh, sww,
        syn, syc, syh, syw,
        STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
        DIL_H: tl.constexpr, DIL_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        PROLOGUE: tl.constexpr, STATS: tl.constexpr,
        FLAT_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP64: tl.constexpr, INDEX64: tl.constexpr,
        STATS_M: tl.constexpr, STATS_LOG2: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    grp, rm, rn, m_ok, n_ok, img64, oh, ow = _gemm_tile(M, C_OUT_G, HO, WO, BLOCK_M, BLOCK_N, INDEX64)
    rk = _k_range(BLOCK_K, INDEX64)
    co = grp * C_OUT_G + rn
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W

    c_base = grp * C_IN_G
    x_rows = x_ptr + img64 * sxn + c_base * sxc
    w_cols = w_ptr + co * swo
    pro_mean = mean_ptr + c_base
    pro_scale = scale_ptr + c_base
    pro_shift = shift_ptr + c_base
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if FLAT_K:
        k_total = C_IN_G * KH * KW
        for k0 in range(0, k_total, BLOCK_K):
            k = k0 + rk
            k_ok = k < k_total
            c = k % C_IN_G
            tap = k // C_IN_G
            kh = tap // KW
            kw = tap % KW
            ih = ih0[:, None] + (kh * DIL_H)[None, :]
            iw = iw0[:, None] + (kw * DIL_W)[None, :]
            a_mask = (m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
            a = tl.load(x_rows[:, None] + ih * sxh + iw * sxw + (c * sxc)[None, :], mask=a_mask, other=0.0)
            a = _prologue(a, c, k_ok, a_mask, pro_mean, pro_scale, pro_shift, PROLOGUE)
            b = tl.load(w_cols[None, :] + (c * swi + kh * swh + kw * sww)[:, None],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, INPUT_PRECISION, DOT_IN_FP64)
    else:
        n_cb = tl.cdiv(C_IN_G, BLOCK_K)
        for t in range(0, KH * KW * n_cb):
            kh, kw, c = _tap_channels(t, n_cb, KH, KW, rk, BLOCK_K)
            ih = ih0 + kh * DIL_H
            iw = iw0 + kw * DIL_W
            row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            c_ok = c < C_IN_G
            a_mask = row_ok[:, None] & c_ok[None, :]
            a = tl.load((x_rows + ih * sxh + iw * sxw)[:, None] + (c * sxc)[None, :], mask=a_mask, other=0.0)
            a = _prologue(a, c, c_ok, a_mask, pro_mean, pro_scale, pro_shift, PROLOGUE)
            b = tl.load((w_cols + kh * swh + kw * sww)[None, :] + (c * swi)[:, None],
                        mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, INPUT_PRECISION, DOT_IN_FP64)

    out_mask = m_ok[:, None] & n_ok[None, :]
    y_ptrs = y_ptr + (img64 * syn + oh * syh + ow * syw)[:, None] + (co * syc)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)

    if STATS:
        # One (count, mean, M2) partial per STATS_M-row tile, BLOCK_M // STATS_M of them per program: the
        # statistics tile is a function of the shape, not of the autotuned BLOCK_M, and its sums run as a fixed
        # pairwise tree (_group_tree_sum), not tl.sum, whose order follows num_warps and the layout.
        # Rows past M hold exact zeros (their A rows were masked to 0), so the plain sum is the valid rows' sum.
        G: tl.constexpr = BLOCK_M // STATS_M
        tid = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)
        cnt = tl.minimum(tl.maximum(M - tid * STATS_M, 0), STATS_M).to(tl.float32)
        t_ok = cnt > 0
        t_mean = _group_tree_sum(acc, BLOCK_M, BLOCK_N, STATS_M, STATS_LOG2) / tl.maximum(cnt, 1.0)[:, None]
        dev = tl.reshape(tl.reshape(acc, [G, STATS_M, BLOCK_N]) - t_mean[:, None, :], [BLOCK_M, BLOCK_N])
        dev = tl.where(m_ok[:, None], dev, 0.0)
        t_m2 = _group_tree_sum(dev * dev, BLOCK_M, BLOCK_N, STATS_M, STATS_LOG2)
        p_off = tid[:, None] * C_OUT + co[None, :]
        p_ok = t_ok[:, None] & n_ok[None, :]
        tl.store(pmean_ptr + p_off, t_mean, mask=p_ok)
        tl.store(pm2_ptr + p_off, t_m2, mask=p_ok)
        tl.store(pcnt_ptr + tid, cnt, mask=t_ok & (tl.program_id(1) == 0))


@triton.jit
def _group_tree_sum(x, ROWS: tl.constexpr, N: tl.constexpr, GROUP: tl.constexpr, LOG2_GROUP: tl.constexpr):
    """[ROWS, N] -> [ROWS // GROUP, N]: each run of GROUP consecutive rows summed by a fixed pairwise tree (at
    every level row i gets row i + half), so the bits are those of the values alone, whatever the layout of x,
    num_warps or the tile holding the runs (two-operand fp32 additions are commutative; only grouping matters)."""
    v = tl.reshape(x, [ROWS // GROUP, GROUP, N])
    for level in tl.static_range(LOG2_GROUP):
        lo, hi = tl.split(tl.permute(tl.reshape(v, [ROWS // GROUP, 2, GROUP >> (level + 1), N]), (0, 2, 3, 1)))
        v = lo + hi
    return tl.reshape(v, [ROWS // GROUP, N])


@triton.jit
def _partial_offset(t, C, rc):
    """Offsets of channels rc in row t of a (T, C) partials buffer, in int64: T * C may pass 2^31."""
    return tl.cast(t, tl.int64) * C + rc


@triton.jit
def _chan_merge(pmean_ptr, pm2_ptr, pcnt_ptr, t0, t1, rc, c_ok, C, BLOCK_C: tl.constexpr):
    """(count, mean, M2) per channel of partials t0..t1-1 merged in order with Chan's formula (centred)."""
    n = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t in range(t0, t1):
        nb = tl.load(pcnt_ptr + t)
        off = _partial_offset(t, C, rc)
        # Partials with count 0 (past the chosen config's grid; never written) change nothing.
        used = nb > 0
        mb = tl.where(used, tl.load(pmean_ptr + off, mask=c_ok, other=0.0), mean)
        m2b = tl.where(used, tl.load(pm2_ptr + off, mask=c_ok, other=0.0), 0.0)
        n_ab = n + nb
        frac = tl.where(used, nb / tl.maximum(n_ab, 1.0), 0.0)
        delta = mb - mean
        mean = mean + delta * frac
        m2 = m2 + m2b + delta * delta * n * frac
        n = n_ab
    return n, mean, m2


@triton.jit
def _bn_stats_merge_kernel(pmean_ptr, pm2_ptr, pcnt_ptr, omean_ptr, om2_ptr, ocnt_ptr, T, C, CHUNK,
                           BLOCK_C: tl.constexpr):
    """First level of the merge: partials [chunk * CHUNK, (chunk + 1) * CHUNK) -> one (count, mean, M2) each."""
    chunk = tl.program_id(0)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    t0 = chunk * CHUNK
    n, mean, m2 = _chan_merge(pmean_ptr, pm2_ptr, pcnt_ptr, t0, tl.minimum(t0 + CHUNK, T), rc, c_ok, C, BLOCK_C)
    tl.store(omean_ptr + chunk * C + rc, mean, mask=c_ok)
    tl.store(om2_ptr + chunk * C + rc, m2, mask=c_ok)
    if tl.program_id(1) == 0:
        tl.store(ocnt_ptr + chunk, tl.max(n, axis=0))  # the same for every channel


@triton.jit
def _bn_stats_finalize_kernel(pmean_ptr, pm2_ptr, pcnt_ptr, mean_ptr, invstd_ptr, rmean_ptr, rvar_ptr,
                              T, C, momentum, eps,
                              UPDATE_RUNNING: tl.constexpr, BLOCK_C: tl.constexpr):
    """Chan-merge T (count, mean, M2) partials per channel in order; mean, invstd, running-stats update."""
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    n, mean, m2 = _chan_merge(pmean_ptr, pm2_ptr, pcnt_ptr, 0, T, rc, c_ok, C, BLOCK_C)
    var = m2 / n
    tl.store(mean_ptr + rc, mean, mask=c_ok)
    tl.store(invstd_ptr + rc, 1.0 / tl.math.sqrt_rn(var + eps), mask=c_ok)  # tl.sqrt is approximate on GPUs
    if UPDATE_RUNNING:
        rm = tl.load(rmean_ptr + rc, mask=c_ok, other=0.0)
        rv = tl.load(rvar_ptr + rc, mask=c_ok, other=0.0)
        unbiased = m2 / tl.maximum(n - 1.0, 1.0)
        tl.store(rmean_ptr + rc, (1.0 - momentum) * rm + momentum * mean, mask=c_ok)
        tl.store(rvar_ptr + rc, (1.0 - momentum) * rv + momentum * unbiased, mask=c_ok)


_AUTOTUNE_KEY = ["M_BUCKET", "C_IN_G", "C_OUT_G", "KH", "KW", "STRIDE_H", "FLAT_K", "PROLOGUE", "STATS", "sxc"]
_AUTOTUNE = os.environ.get("RESFUSED_TRITON_AUTOTUNE", "1") not in ("", "0")

# The statistics tile: partials are per _STATS_M output rows whatever BLOCK_M the forward runs with (every BLOCK_M
# is a multiple of it), so the merge order is fixed by the shape. 64 rows on a GPU (the smallest tuned BLOCK_M;
# partials 2 * 4 bytes per 64 rows and channel, 1/16 of a bf16 y), 16 under the interpreter (tests run 16-row
# tiles).
if _INTERPRET:
    _kernel = _conv_bn_fwd_kernel
    # Wide N and K tiles keep the interpreter's per-program cost down; tests swap in 16x16x16 tiles so tiny
    # shapes still run several row tiles (the Chan merge), K loops and tails.
    _FIXED = {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 128}
    _STATS_M = 16
elif _AUTOTUNE:
    # Every config writes every partial and count, so timing runs need no restore_value.
    _kernel = triton.autotune(configs=_gpu_configs(), key=_AUTOTUNE_KEY, prune_configs_by=_PRUNE)(_conv_bn_fwd_kernel)
    _FIXED = {}
    _STATS_M = 64
else:
    _kernel = _conv_bn_fwd_kernel
    _FIXED = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
    _STATS_M = 64

_FINALIZE_BLOCK_C = 128
# More partials than this take the two-level merge, in chunks of max(_STATS_CHUNK, ~sqrt(T)) partials, so
# neither level walks more than about sqrt(T) of them. (T counts tiles of the smallest autotuned BLOCK_M: for
# ResNet-50's layer1 at batch 256, 25088 partials of 32 rows, chunks of 159, 158 chunks.)
_STATS_CHUNK = 64


def _finalize_stats(pmean, pm2, pcnt, mean, invstd, running_mean, running_var, momentum, eps):
    """Merge the (T, C) partials (two levels when T > _STATS_CHUNK) into mean/invstd and the running stats."""
    tiles, c_out = pmean.shape
    if tiles > _STATS_CHUNK:
        chunk = max(_STATS_CHUNK, math.isqrt(tiles - 1) + 1)
        chunks = triton.cdiv(tiles, chunk)
        cmean = torch.empty((chunks, c_out), dtype=pmean.dtype, device=pmean.device)
        cm2 = torch.empty_like(cmean)
        ccnt = torch.empty((chunks,), dtype=pcnt.dtype, device=pcnt.device)
        _bn_stats_merge_kernel[(chunks, triton.cdiv(c_out, _FINALIZE_BLOCK_C))](
            pmean, pm2, pcnt, cmean, cm2, ccnt, tiles, c_out, chunk, BLOCK_C=_FINALIZE_BLOCK_C)
        pmean, pm2, pcnt, tiles = cmean, cm2, ccnt, chunks
    update = running_mean is not None
    _bn_stats_finalize_kernel[(triton.cdiv(c_out, _FINALIZE_BLOCK_C),)](
        pmean, pm2, pcnt, mean, invstd, running_mean if update else mean, running_var if update else mean,
        tiles, c_out, float(momentum), float(eps), UPDATE_RUNNING=update, BLOCK_C=_FINALIZE_BLOCK_C)


def forward(x: Tensor, weight: Tensor, in_mean: Optional[Tensor], in_invstd: Optional[Tensor],
            in_weight: Optional[Tensor], in_bias: Optional[Tensor], running_mean: Optional[Tensor],
            running_var: Optional[Tensor], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
            groups: int, prologue: bool, stats: bool, momentum: float, eps: float):
    """Triton launcher; contract in resfused/reference/conv_bn.py (forward). Returns (y, mean, invstd)."""
    if x.dtype not in _DTYPES:
        raise TypeError(f"the triton conv_bn supports float32, float16 and bfloat16, got {x.dtype}")
    n, _, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    ho = _out_size(h, kh, stride[0], padding[0], dilation[0])
    wo = _out_size(w, kw, stride[1], padding[1], dilation[1])
    fmt = torch.channels_last if (not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)) \
        else torch.contiguous_format
    y = torch.empty((n, c_out, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    m = n * ho * wo
    st = torch.float32
    mean = torch.empty((c_out if stats else 0,), dtype=st, device=x.device)
    invstd = torch.empty_like(mean)
    if y.numel() == 0:
        if stats:
            mean.fill_(float("nan"))
            invstd.fill_(float("nan"))
        return y, mean, invstd
    if prologue:
        pro_mean = in_mean
        pro_scale = (in_weight * in_invstd).contiguous()
        pro_shift = in_bias
    else:
        pro_mean = pro_scale = pro_shift = y  # never read: PROLOGUE is False
    tiles = triton.cdiv(m, _STATS_M) if stats else 1
    pmean = torch.empty((tiles, c_out) if stats else (1,), dtype=st, device=x.device)
    pm2 = torch.empty_like(pmean)
    pcnt = torch.empty((tiles,), dtype=st, device=x.device)
    c_out_g = c_out // groups
    flat_k = c_in_g < _FLAT_K_BELOW and kh * kw > 1

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), groups * triton.cdiv(c_out_g, meta["BLOCK_N"]))

    with on_device(x):
        _kernel[grid](
            x, weight, pro_mean, pro_scale, pro_shift, y, pmean, pm2, pcnt,
            m, triton.next_power_of_2(m), h, w, c_in_g, ho, wo, c_out_g, c_out,
            *x.stride(), *weight.stride(), *y.stride(),
            STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
            DIL_H=dilation[0], DIL_W=dilation[1], KH=kh, KW=kw,
            PROLOGUE=bool(prologue), STATS=bool(stats),
            FLAT_K=flat_k, INPUT_PRECISION=input_precision(x.dtype),
            DOT_IN_FP64=_INTERPRET, INDEX64=index64(x, weight, y),
            STATS_M=_STATS_M, STATS_LOG2=_STATS_M.bit_length() - 1,
            **_FIXED)
        if stats:
            _finalize_stats(pmean, pm2, pcnt, mean, invstd, running_mean, running_var, momentum, eps)
    return y, mean, invstd


# ---------------------------------------------------------------------------------------------------
# backward: wgrad and dgrad with the prologue recomputed, dReLU + dBN partial sums in the dgrad epilogue
# ---------------------------------------------------------------------------------------------------

@triton.jit
def _conv_bn_wgrad_kernel(
        x_ptr, dy_ptr, mean_ptr, scale_ptr, shift_ptr, dw_ptr,
        M, H, W, C_IN_G, HO, WO, C_OUT_G, ROWS_PER_SPLIT,
        sxn, sxc, sxh, sxw,
        sdn, sdc, sdh, sdw,
        swo, swi, swh, sww, sws,
        STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
        DIL_H: tl.constexpr, DIL_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        PROLOGUE: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP64: tl.constexpr, INDEX64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dw[co, (tap, c)] = sum_m dy[m, co] * a[m, (tap, c)], a = relu(bn(x)) regathered and recomputed per tile.

    Each program owns one (BLOCK_N x BLOCK_K) tile of dw over rows [split * ROWS_PER_SPLIT, ...) (split =
    program_id(2)) and writes it at dw_ptr + split * sws: with one split straight into dw, with several into an
    fp32 (splits, ...) buffer the launcher sums with torch.sum (no atomics; deterministic).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    if INDEX64:  # see _gemm_tile
        pid_n = pid_n.to(tl.int64)
        pid_k = pid_k.to(tl.int64)
        split = split.to(tl.int64)
    tiles_n = tl.cdiv(C_OUT_G, BLOCK_N)
    grp = pid_n // tiles_n
    tile_n = pid_n % tiles_n
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < C_OUT_G
    co = grp * C_OUT_G + rn
    k_total = C_IN_G * KH * KW
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < k_total
    c = k % C_IN_G
    tap = k // C_IN_G
    kh = tap // KW
    kw = tap % KW
    c_base = grp * C_IN_G
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    m_start = split * ROWS_PER_SPLIT
    m_end = tl.minimum(m_start + ROWS_PER_SPLIT, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + _k_range(BLOCK_M, INDEX64)
        m_ok = rm < m_end
        img64, oh, ow = _pixel(rm, HO, WO, INDEX64)
        ih = (oh * STRIDE_H - PAD_H)[:, None] + (kh * DIL_H)[None, :]
        iw = (ow * STRIDE_W - PAD_W)[:, None] + (kw * DIL_W)[None, :]
        a_mask = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_ptr + (img64 * sxn)[:, None] + ((c_base + c) * sxc)[None, :] + ih * sxh + iw * sxw,
                    mask=a_mask, other=0.0)
        a = _prologue(a, c, k_ok, a_mask, mean_ptr + c_base, scale_ptr + c_base, shift_ptr + c_base, PROLOGUE)
        g = tl.load(dy_ptr + (img64 * sdn + oh * sdh + ow * sdw)[:, None] + (co * sdc)[None, :],
                    mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(tl.trans(g), a, acc, INPUT_PRECISION, DOT_IN_FP64)
    dw_ptrs = dw_ptr + split.to(tl.int64) * sws + (co * swo)[:, None] + (c * swi + kh * swh + kw * sww)[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


# Split-K of wgrad: aim at this many programs (None: 4 per SM on a GPU, 1 in the interpreter), each split
# looping over at least _WGRAD_MIN_ITERS row tiles.
_WGRAD_TARGET_PROGRAMS: Optional[int] = None
_WGRAD_MIN_ITERS = 8


def _wgrad_rows_per_split(m: int, tile_programs: int, block_m: int, device: torch.device) -> int:
    """Rows per split (a multiple of block_m) for m rows and tile_programs dw tiles."""
    target = _WGRAD_TARGET_PROGRAMS
    if target is None:
        target = 1 if _INTERPRET else 4 * torch.cuda.get_device_properties(device).multi_processor_count
    iters = triton.cdiv(m, block_m)
    splits = max(1, min(target // max(tile_programs, 1), iters // max(_WGRAD_MIN_ITERS, 1), 65535))  # grid z
    return triton.cdiv(iters, splits) * block_m


@triton.jit
def _conv_bn_dgrad_kernel(
        dy_ptr, w_ptr, x_ptr, mean_ptr, scale_ptr, shift_ptr, invstd_ptr, out_ptr, psum_ptr, psumx_ptr,
        MI, H, W, C_IN_G, C_IN, HO, WO, C_OUT_G,
        sdn, sdc, sdh, sdw,
        swo, swi, swh, sww,
        sxn, sxc, sxh, sxw,
        son, soc, soh, sow,
        STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
        DIL_H: tl.constexpr, DIL_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        PROLOGUE: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP64: tl.constexpr, INDEX64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_a[p, ci] = sum_(tap, co) dy[p's output pixel for tap, co] * w[co, ci, tap] over input pixels p.

    With PROLOGUE the epilogue recomputes z = bn(x) at the tile, applies dReLU (gz = grad_a where z > 0),
    writes gz in x's dtype and the tile's per-channel partial sums of gz and gz * xhat from the fp32
    accumulator (deterministic, no atomics); without it, grad_a is the input gradient, written in x's dtype.
    """
    grp, rm, rn, m_ok, n_ok, img64, ih, iw = _gemm_tile(MI, C_IN_G, H, W, BLOCK_M, BLOCK_N, INDEX64)
    rk = _k_range(BLOCK_K, INDEX64)
    ci = grp * C_IN_G + rn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_cb = tl.cdiv(C_OUT_G, BLOCK_K)
    for t in range(0, KH * KW * n_cb):
        kh, kw, cg = _tap_channels(t, n_cb, KH, KW, rk, BLOCK_K)
        oh_num = ih + PAD_H - kh * DIL_H
        ow_num = iw + PAD_W - kw * DIL_W
        oh = oh_num // STRIDE_H
        ow = ow_num // STRIDE_W
        row_ok = (m_ok & (oh_num >= 0) & (ow_num >= 0) & (oh_num % STRIDE_H == 0) & (ow_num % STRIDE_W == 0)
                  & (oh < HO) & (ow < WO))
        co = grp * C_OUT_G + cg
        co_ok = cg < C_OUT_G
        g = tl.load((dy_ptr + img64 * sdn + oh * sdh + ow * sdw)[:, None] + (co * sdc)[None, :],
                    mask=row_ok[:, None] & co_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + (co * swo)[:, None] + (rn * swi)[None, :] + kh * swh + kw * sww,
                     mask=co_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(g, wt, acc, INPUT_PRECISION, DOT_IN_FP64)
    out_mask = m_ok[:, None] & n_ok[None, :]
    o_ptrs = out_ptr + (img64 * son + ih * soh + iw * sow)[:, None] + (ci * soc)[None, :]
    if PROLOGUE:
        xv = tl.load(x_ptr + (img64 * sxn + ih * sxh + iw * sxw)[:, None] + (ci * sxc)[None, :], mask=out_mask,
                     other=0.0).to(tl.float32)
        mu = tl.load(mean_ptr + ci, mask=n_ok, other=0.0)
        sc = tl.load(scale_ptr + ci, mask=n_ok, other=0.0)
        sh = tl.load(shift_ptr + ci, mask=n_ok, other=0.0)
        inv = tl.load(invstd_ptr + ci, mask=n_ok, other=0.0)
        centred = xv - mu[None, :]
        z = centred * sc[None, :] + sh[None, :]
        gz = tl.where(out_mask & (z > 0), acc, 0.0)
        tl.store(o_ptrs, gz.to(out_ptr.dtype.element_ty), mask=out_mask)
        p_off = tl.program_id(0).to(tl.int64) * C_IN + ci
        tl.store(psum_ptr + p_off, tl.sum(gz, axis=0), mask=n_ok)
        tl.store(psumx_ptr + p_off, tl.sum(gz * (centred * inv[None, :]), axis=0), mask=n_ok)
    else:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _bn_input_grad_kernel(gz_ptr, x_ptr, mean_ptr, invstd_ptr, weight_ptr, sum_g_ptr, sum_gx_ptr, out_ptr,
                          R, I, C, inv_n,
                          TRAINING: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX64: tl.constexpr,
                          NCHW_ONCE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    """grad_x = w * invstd * (gz - sum_g / n - xhat * sum_gx / n) (training) or w * invstd * gz, over x's dense
    (R, I) row view (_tail_geometry: gz, x and grad_x are dense in x's memory format): flat offsets, the channel
    of a row (NCHW) or a column (channels_last), its per-channel vectors loaded once per tile (_tail_vec)."""
    _, _, rr, ri = _tail_tile(R, I, BLOCK_R, BLOCK_I, INDEX64)
    ok = (rr < R)[:, None] & (ri < I)[None, :]
    off = _tail_offset(rr, ri, I)
    inv = _tail_vec(invstd_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE)
    k = _tail_vec(weight_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE) * inv
    gz = tl.load(gz_ptr + off, mask=ok, other=0.0).to(tl.float32)
    if TRAINING:
        xv = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
        xhat = (xv - _tail_vec(mean_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE)) * inv
        sg = _tail_vec(sum_g_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE)
        sgx = _tail_vec(sum_gx_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE)
        dx = k * (gz - sg * inv_n - xhat * sgx * inv_n)
    else:
        dx = k * gz
    tl.store(out_ptr + off, dx.to(out_ptr.dtype.element_ty), mask=ok)


# Backward tiles: one fixed config (no autotuning of the backward kernels yet). Under the interpreter, wide tiles:
# its cost is per program and per loop trip (resnet18 at 32x32: wgrad ~19 s with 32x128x128 tiles, ~6 s here).
if _INTERPRET:
    _BWD = {"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 256}
else:
    _BWD = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
# NCHW x (the scalar gather paths): 8 warps, as the forward's _NCHW_TILES; at 4 warps the fp32 dgrad spills 8 B on
# sm_90, at 8 none (198-209 registers). BLOCK_M, the dgrad statistics tile, is the same: the partials' grouping
# depends on the shape and layout only.
_BWD_NCHW_WARPS = 8


def backward(grad_y: Tensor, x: Tensor, weight: Tensor, in_mean: Optional[Tensor], in_invstd: Optional[Tensor],
             in_weight: Optional[Tensor], in_bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
             dilation: Sequence[int], groups: int, prologue: bool, in_training: bool, need_input_grad: bool,
             need_weight_grad: bool, need_in_affine_grad: bool):
    """Triton launcher; contract in resfused/reference/conv_bn.py (backward).

    Returns (grad_x, grad_weight, grad_in_weight, grad_in_bias); outputs not asked for are empty tensors.
    """
    if x.dtype not in _DTYPES:
        raise TypeError(f"the triton conv_bn supports float32, float16 and bfloat16, got {x.dtype}")
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        # grad_x's kernel walks x, gz and grad_x as one dense row view (_tail_geometry)
        raise ValueError("the triton conv_bn backward needs x contiguous or channels_last (ops/conv_bn.py makes it "
                         f"so), got strides {x.stride()}")
    kh, kw = weight.shape[2:]
    cfg = dict(_BWD)
    if "num_warps" in cfg and x.stride(1) != 1:
        cfg["num_warps"] = _BWD_NCHW_WARPS
    prec = input_precision(x.dtype)
    dot_in_fp64 = _INTERPRET
    geometry = dict(STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
                    DIL_H=dilation[0], DIL_W=dilation[1], KH=kh, KW=kw,
                    INDEX64=index64(x, weight, grad_y))
    with on_device(x):
        return _backward(grad_y, x, weight, in_mean, in_invstd, in_weight, in_bias, groups, prologue, in_training,
                         need_input_grad, need_weight_grad, need_in_affine_grad, cfg, prec, dot_in_fp64, geometry)


def _backward(grad_y, x, weight, in_mean, in_invstd, in_weight, in_bias, groups, prologue, in_training,
              need_input_grad, need_weight_grad, need_in_affine_grad, cfg, prec, dot_in_fp64, geometry):
    """backward's launches, on x's device."""
    n, c_in, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    _, _, ho, wo = grad_y.shape
    c_out_g = c_out // groups
    st = torch.float32
    dev = x.device
    if prologue:
        pro_mean, pro_scale, pro_shift = in_mean, (in_weight * in_invstd).contiguous(), in_bias
    else:
        pro_mean = pro_scale = pro_shift = x  # never read: PROLOGUE is False
    grad_weight = torch.empty((0,), dtype=weight.dtype, device=dev)
    if need_weight_grad:
        grad_weight = torch.empty_like(weight)
        m = n * ho * wo
        if m == 0:
            grad_weight.zero_()
        else:
            tiles = (groups * triton.cdiv(c_out_g, cfg["BLOCK_N"]), triton.cdiv(c_in_g * kh * kw, cfg["BLOCK_K"]))
            rows = _wgrad_rows_per_split(m, tiles[0] * tiles[1], cfg["BLOCK_M"], dev)
            splits = triton.cdiv(m, rows)
            # Several splits write fp32 partials, summed below (torch.sum: deterministic).
            dw = grad_weight if splits == 1 else torch.empty((splits, *weight.shape), dtype=st, device=dev)
            dw_strides = (*grad_weight.stride(), 0) if splits == 1 else (*dw.stride()[1:], dw.stride(0))
            _conv_bn_wgrad_kernel[(*tiles, splits)](
                x, grad_y, pro_mean, pro_scale, pro_shift, dw,
                m, h, w, c_in_g, ho, wo, c_out_g, rows,
                *x.stride(), *grad_y.stride(), *dw_strides,
                **geometry, PROLOGUE=bool(prologue), INPUT_PRECISION=prec, DOT_IN_FP64=dot_in_fp64, **cfg)
            if splits > 1:
                grad_weight.copy_(dw.sum(dim=0))
    grad_x = torch.empty((0,), dtype=x.dtype, device=dev)
    grad_in_w = torch.empty((0,), dtype=st, device=dev)
    grad_in_b = torch.empty((0,), dtype=st, device=dev)
    need_affine = prologue and need_in_affine_grad
    if not (need_input_grad or need_affine) or x.numel() == 0:
        return grad_x, grad_weight, grad_in_w, grad_in_b
    mi = n * h * w
    tiles = triton.cdiv(mi, cfg["BLOCK_M"])
    # Without a prologue dgrad writes the input gradient itself; with one it writes gz for the dBN step.
    out = torch.empty_like(x)
    psum = torch.empty((tiles, c_in) if prologue else (1,), dtype=st, device=dev)
    psumx = torch.empty_like(psum)
    grid = (tiles, groups * triton.cdiv(c_in_g, cfg["BLOCK_N"]))
    _conv_bn_dgrad_kernel[grid](
        grad_y, weight, x, pro_mean, pro_scale, pro_shift, in_invstd if prologue else x, out, psum, psumx,
        mi, h, w, c_in_g, c_in, ho, wo, c_out_g,
        *grad_y.stride(), *weight.stride(), *x.stride(), *out.stride(),
        **geometry, PROLOGUE=bool(prologue), INPUT_PRECISION=prec, DOT_IN_FP64=dot_in_fp64, **cfg)
    if not prologue:
        return out, grad_weight, grad_in_w, grad_in_b
    # The per-tile partials summed by torch.sum: a parallel reduction, deterministic (no atomics).
    sum_g, sum_gx = psum.sum(dim=0), psumx.sum(dim=0)
    if need_affine:
        grad_in_w, grad_in_b = sum_gx, sum_g
    if need_input_grad:
        grad_x = torch.empty_like(x)  # dense in x's memory format, as gz (out)
        rows, inner, channels_last = _tail_geometry(x)
        _bn_input_grad_kernel[_tail_grid(rows, inner, _TAIL)[0]](
            out, x, in_mean, in_invstd, in_weight, sum_g, sum_gx, grad_x, rows, inner, c_in, 1.0 / mi,
            TRAINING=bool(in_training), CHANNELS_LAST=channels_last, INDEX64=index64(x),
            NCHW_ONCE=_nchw_once(inner), **_TAIL)
    return grad_x, grad_weight, grad_in_w, grad_in_b


# ---------------------------------------------------------------------------------------------------
# block tail: relu(bn(y) + residual or bn_d(residual)), packed 1-bit mask; its backward
# ---------------------------------------------------------------------------------------------------
# A dense (N, C, H, W) tensor is walked as (R, I) rows in memory order: NCHW rows are (n, c) planes of H*W, so a
# row's channel is row % C; channels_last rows are pixels of C channels, so a column's channel is the column.
# The mask is resfused._layout's: (R, ceil(I/8)) bytes, bit j of byte k = element 8k+j of the row. Tiles start
# at multiples of 8 columns, so each mask byte is written by exactly one program.

@triton.jit
def _tail_tile(R, I, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, INDEX64: tl.constexpr):
    """(pid_r, pid_i, rr, ri) of this program on a 1-D grid of row tiles x column tiles, column tiles fastest
    (_tail_grid): one grid axis holds 2^31 - 1 programs, where a 2-D grid's y axis (65535) overflowed for NCHW
    planes of more than 65535 * BLOCK_I pixels. INDEX64 (a tensor of 2^31 elements or more): rows in int64."""
    pid = tl.program_id(0)
    tiles_i = tl.cdiv(I, BLOCK_I)
    pid_r = pid // tiles_i
    pid_i = pid % tiles_i
    if INDEX64:
        pid_r = pid_r.to(tl.int64)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    ri = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    return pid_r, pid_i, rr, ri


@triton.jit
def _tail_offset(rr, ri, I):
    """Flat offsets of a tile of the (R, I) row view: row * I + column, in int64 (R * I may pass 2^31)."""
    return rr.to(tl.int64)[:, None] * I + ri[None, :]


@triton.jit
def _tail_vec(ptr, rr, ri, C, R, I, ok, CHANNELS_LAST: tl.constexpr, NCHW_ONCE: tl.constexpr):
    """A per-channel fp32 vector at this tile. A channels_last tile's columns ri are channels: loaded once per tile
    (a row vector, broadcast). An NCHW tile's rows rr are (sample, channel) planes of channel rr % C: loaded once
    per tile (a column vector) with NCHW_ONCE, else gathered per element, which sm_90 code does better where the
    plane size is not a multiple of 16 (see _nchw_once)."""
    if CHANNELS_LAST:
        v = tl.load(ptr + ri, mask=ri < I, other=0.0)[None, :]
    elif NCHW_ONCE:
        v = tl.load(ptr + rr % C, mask=rr < R, other=0.0)[:, None]
    else:
        v = tl.load(ptr + (rr % C)[:, None] + 0 * ri[None, :], mask=ok, other=0.0)
    return v


def _nchw_once(inner: int) -> bool:
    """Whether the NCHW tail kernels load their per-channel vectors once per tile (_tail_vec). From the static
    report (sm_90, fp32, R32 I64 w4): with planes of 56x56 and 28x28 (a multiple of 16 pixels) once per tile
    halves the registers (127-128 -> 63-72) and doubles the occupancy (25 % -> 44-50 %); with 14x14 and 7x7 it
    costs registers (78-140 -> 104-166) and occupancy (19-38 % -> 19-31 %), so those keep the per-element gather."""
    return inner % 16 == 0


@triton.jit
def _tail_fwd_kernel(y_ptr, r_ptr, out_ptr, mask_ptr, mean_ptr, scale_ptr, bias_ptr, rmean_ptr, rscale_ptr,
                     rbias_ptr, R, I, C, NB,
                     RES_BN: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX64: tl.constexpr,
                     NCHW_ONCE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    _, pid_i, rr, ri = _tail_tile(R, I, BLOCK_R, BLOCK_I, INDEX64)
    r_ok = rr < R
    ok = r_ok[:, None] & (ri < I)[None, :]
    off = _tail_offset(rr, ri, I)
    mu = _tail_vec(mean_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE)
    scale = _tail_vec(scale_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE)
    z = (tl.load(y_ptr + off, mask=ok, other=0.0).to(tl.float32) - mu) * scale
    z += _tail_vec(bias_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE)
    r = tl.load(r_ptr + off, mask=ok, other=0.0).to(tl.float32)
    if RES_BN:
        r_scale = _tail_vec(rscale_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE)
        r = (r - _tail_vec(rmean_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE)) * r_scale
        r += _tail_vec(rbias_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE)
    z += r
    pos = (z > 0) & ok
    tl.store(out_ptr + off, tl.where(pos, z, 0.0).to(out_ptr.dtype.element_ty), mask=ok)
    bits = pos.to(tl.int32) << (tl.arange(0, BLOCK_I) % 8)[None, :]
    packed = tl.sum(tl.reshape(bits, [BLOCK_R, BLOCK_I // 8, 8]), axis=2)
    rb = pid_i * (BLOCK_I // 8) + tl.arange(0, BLOCK_I // 8)
    tl.store(mask_ptr + rr.to(tl.int64)[:, None] * NB + rb[None, :], packed.to(tl.uint8),
             mask=r_ok[:, None] & (rb < NB)[None, :])


@triton.jit
def _tail_gz(g_ptr, mask_ptr, rr, ri, ok, off, NB):
    """dReLU: the upstream gradient where the packed mask bit is set, else 0 (fp32)."""
    byte = tl.load(mask_ptr + rr.to(tl.int64)[:, None] * NB + (ri // 8)[None, :], mask=ok, other=0).to(tl.int32)
    bit = (byte >> (ri % 8)[None, :]) & 1
    return tl.where(ok & (bit != 0), tl.load(g_ptr + off, mask=ok, other=0.0).to(tl.float32), 0.0)


@triton.jit
def _tail_bwd_reduce_kernel(g_ptr, mask_ptr, y_ptr, r_ptr, mean_ptr, invstd_ptr, rmean_ptr, rinvstd_ptr,
                            p_g_ptr, p_gy_ptr, p_gr_ptr, R, I, C, NB,
                            RES_BN: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX64: tl.constexpr,
                            NCHW_ONCE: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    """Per-program partial sums of gz, gz * xhat(y) (and gz * xhat(residual)): channels_last programs reduce over
    rows into a (row tiles, C) buffer; NCHW programs reduce over columns into a (column tiles, R) buffer."""
    pid_r, pid_i, rr, ri = _tail_tile(R, I, BLOCK_R, BLOCK_I, INDEX64)
    ok = (rr < R)[:, None] & (ri < I)[None, :]
    off = _tail_offset(rr, ri, I)
    gz = _tail_gz(g_ptr, mask_ptr, rr, ri, ok, off, NB)
    mu = _tail_vec(mean_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE)
    xh = tl.load(y_ptr + off, mask=ok, other=0.0).to(tl.float32) - mu
    gy = gz * xh * _tail_vec(invstd_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE)
    if RES_BN:
        r_mu = _tail_vec(rmean_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE)
        xr = tl.load(r_ptr + off, mask=ok, other=0.0).to(tl.float32) - r_mu
        gr = gz * xr * _tail_vec(rinvstd_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE)
    if CHANNELS_LAST:
        p_off = pid_r.to(tl.int64) * I + ri
        p_ok = ri < I
        tl.store(p_g_ptr + p_off, tl.sum(gz, axis=0), mask=p_ok)
        tl.store(p_gy_ptr + p_off, tl.sum(gy, axis=0), mask=p_ok)
        if RES_BN:
            tl.store(p_gr_ptr + p_off, tl.sum(gr, axis=0), mask=p_ok)
    else:
        p_off = pid_i.to(tl.int64) * R + rr
        p_ok = rr < R
        tl.store(p_g_ptr + p_off, tl.sum(gz, axis=1), mask=p_ok)
        tl.store(p_gy_ptr + p_off, tl.sum(gy, axis=1), mask=p_ok)
        if RES_BN:
            tl.store(p_gr_ptr + p_off, tl.sum(gr, axis=1), mask=p_ok)


@triton.jit
def _tail_bwd_elementwise_kernel(g_ptr, mask_ptr, y_ptr, r_ptr, gy_out_ptr, gr_out_ptr,
                                 mean_ptr, invstd_ptr, weight_ptr, rmean_ptr, rinvstd_ptr, rweight_ptr,
                                 sum_g_ptr, sum_gy_ptr, sum_gr_ptr, R, I, C, NB, inv_n,
                                 WRITE_Y: tl.constexpr, WRITE_R: tl.constexpr, TRAINING: tl.constexpr,
                                 RES_TRAINING: tl.constexpr, RES_BN: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                                 INDEX64: tl.constexpr, NCHW_ONCE: tl.constexpr, BLOCK_R: tl.constexpr,
                                 BLOCK_I: tl.constexpr):
    _, _, rr, ri = _tail_tile(R, I, BLOCK_R, BLOCK_I, INDEX64)
    ok = (rr < R)[:, None] & (ri < I)[None, :]
    off = _tail_offset(rr, ri, I)
    gz = _tail_gz(g_ptr, mask_ptr, rr, ri, ok, off, NB)
    if TRAINING or RES_TRAINING:
        sg = _tail_vec(sum_g_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE) * inv_n
    if WRITE_Y:
        inv = _tail_vec(invstd_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE)
        k = _tail_vec(weight_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE) * inv
        if TRAINING:
            mu = _tail_vec(mean_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE)
            xh = tl.load(y_ptr + off, mask=ok, other=0.0).to(tl.float32) - mu
            sgy = _tail_vec(sum_gy_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE)
            dy = k * (gz - sg - xh * inv * sgy * inv_n)
        else:
            dy = k * gz
        tl.store(gy_out_ptr + off, dy.to(gy_out_ptr.dtype.element_ty), mask=ok)
    if WRITE_R:
        if RES_BN:
            rinv = _tail_vec(rinvstd_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE)
            kr = _tail_vec(rweight_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE) * rinv
            if RES_TRAINING:
                r_mu = _tail_vec(rmean_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE)
                xr = tl.load(r_ptr + off, mask=ok, other=0.0).to(tl.float32) - r_mu
                sgr = _tail_vec(sum_gr_ptr, rr, ri, C, R, I, ok, CHANNELS_LAST, NCHW_ONCE)
                dr = kr * (gz - sg - xr * rinv * sgr * inv_n)
            else:
                dr = kr * gz
        else:
            dr = gz
        tl.store(gr_out_ptr + off, dr.to(gr_out_ptr.dtype.element_ty), mask=ok)


if _INTERPRET:
    _TAIL = {"BLOCK_R": 64, "BLOCK_I": 64}
else:
    _TAIL = {"BLOCK_R": 32, "BLOCK_I": 64, "num_warps": 4}


def _tail_grid(rows: int, inner: int, cfg) -> tuple[tuple[int], int, int]:
    """((programs,), row tiles, column tiles) of the tail kernels' 1-D grid (_tail_tile)."""
    tiles_r, tiles_i = triton.cdiv(rows, cfg["BLOCK_R"]), triton.cdiv(inner, cfg["BLOCK_I"])
    return (tiles_r * tiles_i,), tiles_r, tiles_i


def _tail_geometry(y: Tensor):
    """(R, I, channels_last) of y's memory-order row view; mask bytes per row are ceil(I / 8)."""
    n, c, h, w = y.shape
    channels_last = not y.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last)
    return (n * h * w, c, True) if channels_last else (n * c, h * w, False)


def tail_forward(y: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor, residual: Tensor,
                 res_mean: Optional[Tensor], res_invstd: Optional[Tensor], res_weight: Optional[Tensor],
                 res_bias: Optional[Tensor], residual_bn: bool):
    """Triton launcher; contract in resfused/reference/conv_bn.py (tail_forward). Returns (out, mask)."""
    if y.dtype not in _DTYPES:
        raise TypeError(f"the triton conv_bn supports float32, float16 and bfloat16, got {y.dtype}")
    rows, inner, channels_last = _tail_geometry(y)
    nb = (inner + 7) // 8
    out = torch.empty_like(y)
    mask = torch.empty((rows, nb), dtype=torch.uint8, device=y.device)
    if y.numel() == 0:
        return out, mask
    scale = (weight * invstd).contiguous()
    rscale = (res_weight * res_invstd).contiguous() if residual_bn else scale
    cfg = _TAIL
    grid, _, _ = _tail_grid(rows, inner, cfg)
    with on_device(y):
        _tail_fwd_kernel[grid](y, residual, out, mask, mean, scale, bias,
                               res_mean if residual_bn else mean, rscale, res_bias if residual_bn else bias,
                               rows, inner, y.shape[1], nb, RES_BN=bool(residual_bn), CHANNELS_LAST=channels_last,
                               INDEX64=index64(y, residual), NCHW_ONCE=_nchw_once(inner), **cfg)
    return out, mask


def tail_backward(grad_out: Tensor, mask: Tensor, y: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor,
                  residual: Tensor, res_mean: Optional[Tensor], res_invstd: Optional[Tensor],
                  res_weight: Optional[Tensor], residual_bn: bool, training: bool, res_training: bool,
                  need_y_grad: bool, need_affine_grad: bool, need_residual_grad: bool, need_res_affine_grad: bool):
    """Triton launcher; contract in resfused/reference/conv_bn.py (tail_backward): a reduction kernel (per-program
    partials; the partials are summed per channel with torch, deterministic), then one elementwise kernel."""
    st = torch.float32
    dev = y.device
    c = y.shape[1]
    empty = lambda dtype: torch.empty((0,), dtype=dtype, device=dev)  # noqa: E731
    rows, inner, channels_last = _tail_geometry(y)
    nb = (inner + 7) // 8
    cfg = _TAIL
    grid, tiles_r, tiles_i = _tail_grid(rows, inner, cfg)
    wide = index64(y, residual, grad_out)
    res_bn = bool(residual_bn)
    need_sums = need_affine_grad or (need_y_grad and training) or (
        res_bn and (need_res_affine_grad or (need_residual_grad and res_training)))
    sum_g = sum_gy = sum_gr = mean  # placeholders, never read when not computed
    if need_sums and y.numel():
        parts = (tiles_r, inner) if channels_last else (tiles_i, rows)
        p_g = torch.empty(parts, dtype=st, device=dev)
        p_gy, p_gr = torch.empty_like(p_g), torch.empty_like(p_g) if res_bn else p_g
        with on_device(y):
            _tail_bwd_reduce_kernel[grid](grad_out, mask, y, residual if res_bn else y, mean, invstd,
                                          res_mean if res_bn else mean, res_invstd if res_bn else invstd,
                                          p_g, p_gy, p_gr, rows, inner, c, nb, RES_BN=res_bn,
                                          CHANNELS_LAST=channels_last, INDEX64=wide,
                                          NCHW_ONCE=_nchw_once(inner), **cfg)
        fold = (lambda p: p.sum(dim=0)) if channels_last else (lambda p: p.view(-1, y.shape[0], c).sum(dim=(0, 1)))
        sum_g, sum_gy = fold(p_g), fold(p_gy)
        sum_gr = fold(p_gr) if res_bn else sum_g
    elif need_sums:
        sum_g = sum_gy = sum_gr = torch.zeros((c,), dtype=st, device=dev)
    grad_w, grad_b = (sum_gy, sum_g) if need_affine_grad else (empty(st), empty(st))
    grad_rw, grad_rb = (sum_gr, sum_g.clone()) if res_bn and need_res_affine_grad else (empty(st), empty(st))
    write_y, write_r = bool(need_y_grad), bool(need_residual_grad)
    grad_y = torch.empty_like(y) if write_y else empty(y.dtype)
    grad_r = torch.empty_like(residual) if write_r else empty(y.dtype)
    if (write_y or write_r) and y.numel():
        n_per_channel = y.numel() // c
        with on_device(y):
            _tail_bwd_elementwise_kernel[grid](
                grad_out, mask, y, residual if res_bn else y, grad_y if write_y else y, grad_r if write_r else y,
                mean, invstd, weight, res_mean if res_bn else mean, res_invstd if res_bn else invstd,
                res_weight if res_bn else weight, sum_g, sum_gy, sum_gr, rows, inner, c, nb, 1.0 / n_per_channel,
                WRITE_Y=write_y, WRITE_R=write_r, TRAINING=bool(training),
                RES_TRAINING=bool(res_training) and res_bn, RES_BN=res_bn, CHANNELS_LAST=channels_last,
                INDEX64=wide, NCHW_ONCE=_nchw_once(inner), **cfg)
    return grad_y, grad_w, grad_b, grad_r, grad_rw, grad_rb
