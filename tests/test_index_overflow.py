"""Index arithmetic of the Triton kernels at shapes that cross 2^31 elements, on CPU.

No tensor that large is allocated: the launchers' decisions (64-bit indexing, grids, tile caps) are checked on meta
tensors and plain numbers, and the kernels' own @triton.jit index helpers run in the interpreter inside tiny probe
kernels, given the sizes of a huge tensor and writing the offsets they compute into a small int64 buffer, which is
compared with exact Python integers. The interpreter computes int32 as numpy does (wrapping), so an offset that
overflows 32 bits shows up as a wrong value, as it would on a GPU.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import triton
import triton.language as tl

from resfused.triton_kernels import bn_add_relu as bn
from resfused.triton_kernels import conv_bn as cb
from resfused.triton_kernels.bn_add_relu import _shift_offset, _tile_index
from resfused.triton_kernels.conv_bias_act import _gemm_tile, _pixel, index64
from resfused.triton_kernels.conv_bn import _partial_offset, _tail_offset, _tail_tile

pytestmark = pytest.mark.skipif(not bn._INTERPRET, reason="the probes run in Triton's interpreter")

BIG = 2**31


def test_index64_switches_at_2_31_elements():
    """64-bit indexing exactly for calls with a tensor of 2^31 elements or more (meta tensors: nothing allocated)."""
    below = torch.empty((1, 1, 1, BIG - 1), device="meta")
    at = torch.empty((1, 2**15, 2**8, 2**8), device="meta")  # one NCHW sample of 2^31 elements
    small = torch.empty((2, 3, 4, 5), device="meta")
    assert not index64(below, small, None)
    assert index64(small, at)
    assert not index64(None)


def test_tail_grid_is_one_dimensional_past_65535_column_tiles():
    """An NCHW plane of 5M pixels: 78k column tiles of 64, more than a grid's y axis holds (65535); the tail
    kernels' 1-D grid holds every (row tile, column tile) pair."""
    rows, inner = 2 * 3, 5_000_000
    grid, tiles_r, tiles_i = cb._tail_grid(rows, inner, {"BLOCK_R": 32, "BLOCK_I": 64})
    assert tiles_i > 65535 and len(grid) == 1 and grid[0] == tiles_r * tiles_i < BIG


@pytest.mark.parametrize("c,hw", [(2**20, 8), (2**26, 1), (3, 2**31 + 5)])
def test_bn_tiles_keep_int32_offsets_below_2_31(c, hw):
    """_Geometry's tiles for huge channels_last rows and NCHW planes: one tile's int32 offsets stay below 2^31."""
    for channels_last in (True, False):
        x = torch.empty((2, c, hw, 1), device="meta")
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        geo = bn._Geometry(x)
        if geo.channels_last:
            span = geo.BLOCK_R * (c + geo.BLOCK_C)
        else:
            span = (geo.BLOCK_C - 1) * hw + geo.BLOCK_R
        assert span < BIG, (channels_last, geo.BLOCK_R, geo.BLOCK_C)


@triton.jit
def _tile_index_probe(out_ptr, ok_ptr, t, c0, C, HW, R, S_TILES, CHANNELS_LAST: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    c = c0 + tl.arange(0, BLOCK_C)
    base, offs, rows_ok = _tile_index(t, c0, c, C, HW, R, S_TILES, CHANNELS_LAST, BLOCK_R)
    i = tl.arange(0, BLOCK_R)[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    tl.store(out_ptr + i, base + offs)
    tl.store(ok_ptr + tl.arange(0, BLOCK_R), rows_ok.to(tl.int32))


def _run_tile_index(t, c0, c, hw, r, s_tiles, channels_last, block_r, block_c):
    out = torch.empty(block_r * block_c, dtype=torch.int64)
    ok = torch.empty(block_r, dtype=torch.int32)
    _tile_index_probe[(1,)](out, ok, t, c0, c, hw, r, s_tiles, CHANNELS_LAST=channels_last, BLOCK_R=block_r,
                            BLOCK_C=block_c)
    return out.view(block_r, block_c).tolist(), ok.tolist()


def test_bn_tile_index_nchw_sample_past_2_31():
    """NCHW, one sample of 2^16 channels x 2^16 + 40 pixels (2^32 + elements): the last channels of sample 1 and
    the plane's last, partial spatial tile."""
    c, hw, block_r, block_c = 2**16, 2**16 + 40, 64, 2
    s_tiles = triton.cdiv(hw, block_r)
    n, s = 1, s_tiles - 1
    t, c0 = n * s_tiles + s, c - block_c
    offs, ok = _run_tile_index(t, c0, c, hw, 2 * hw, s_tiles, False, block_r, block_c)
    for i in range(block_r):
        for j in range(block_c):
            assert offs[i][j] == (n * c + c0 + j) * hw + s * block_r + i
    assert ok == [1 if s * block_r + i < hw else 0 for i in range(block_r)]


def test_bn_tile_index_channels_last_rows_past_2_31():
    """channels_last, 2^16 channels, a row tile whose first element lies past 2^33."""
    c, block_r, block_c = 2**16, 4, 8
    rows = 2**17 + 3
    t, c0 = rows // block_r, c - block_c  # the last, partial row tile
    offs, ok = _run_tile_index(t, c0, c, 1, rows, 1, True, block_r, block_c)
    for i in range(block_r):
        for j in range(block_c):
            assert offs[i][j] == (t * block_r + i) * c + c0 + j
    assert ok == [1 if t * block_r + i < rows else 0 for i in range(block_r)]


@triton.jit
def _gemm_tile_probe(out_ptr, M, N_G, SP_H, SP_W, SXN, SXH, SXW, INDEX64: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    grp, rm, rn, m_ok, n_ok, img64, ph, pw = _gemm_tile(M, N_G, SP_H, SP_W, BLOCK_M, BLOCK_N, INDEX64)
    off = img64 * SXN + ph * SXH + pw * SXW  # the per-pixel offset the conv kernels form
    r = tl.arange(0, BLOCK_M)
    tl.store(out_ptr + r, rm)
    tl.store(out_ptr + BLOCK_M + r, off)
    tl.store(out_ptr + 2 * BLOCK_M + r, m_ok.to(tl.int64))


@contextlib.contextmanager
def _as_program(pid_x: int):
    """Run a one-program launch as program (pid_x, 0, 0) of a huge grid: the interpreter loops over every program
    of a grid, and launching 2^27 of them is not an option on CPU."""
    from triton.runtime.interpreter import interpreter_builder

    real = interpreter_builder.set_grid_idx

    def shifted(x, y, z):
        real(x, y, z)
        interpreter_builder.grid_idx = (x + pid_x, y, z)

    interpreter_builder.set_grid_idx = shifted
    try:
        yield
    finally:
        interpreter_builder.set_grid_idx = real


def _run_gemm_tile(pid_m, m, h, w, strides, index_64, block_m=16):
    out = torch.empty(3 * block_m, dtype=torch.int64)
    with _as_program(pid_m):
        _gemm_tile_probe[(1, 1)](out, m, 8, h, w, *strides, INDEX64=index_64, BLOCK_M=block_m, BLOCK_N=8)
    return out.view(3, block_m).tolist()


def test_gemm_tile_pixel_offsets_past_2_31_per_image():
    """An NCHW output image of 46341 x 46341 pixels (2^31 + elements in one channel plane): the pixel index and
    the in-image offset ph * W + pw need 64 bits; INDEX64 gives the exact values, 32-bit arithmetic does not."""
    h = w = 46341
    m = 2 * h * w
    sxn, sxh, sxw = 3 * h * w, w, 1
    block_m = 16
    pid_m = (h * w + h * w // 2) // block_m  # inside image 1, past 2^31 rows in all
    rows = [pid_m * block_m + i for i in range(block_m)]
    want = [(r // (h * w)) * sxn + ((r % (h * w)) // w) * sxh + (r % w) * sxw for r in rows]
    rm, off, ok = _run_gemm_tile(pid_m, m, h, w, (sxn, sxh, sxw), True, block_m)
    assert rm == rows and off == want and ok == [1] * block_m
    _, off32, _ = _run_gemm_tile(pid_m, m, h, w, (sxn, sxh, sxw), False, block_m)
    assert off32 != want  # why INDEX64 exists: the probe can tell


@triton.jit
def _tail_tile_probe(out_ptr, R, I, INDEX64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    pid_r, pid_i, rr, ri = _tail_tile(R, I, BLOCK_R, BLOCK_I, INDEX64)
    tl.store(out_ptr + tl.arange(0, BLOCK_R), rr)
    tl.store(out_ptr + BLOCK_R + tl.arange(0, BLOCK_I), ri)


def test_tail_tile_rows_past_2_31():
    """The tail kernels' 1-D grid decoded back into (row tile, column tile), rows past 2^31 in int64."""
    block_r, block_i = 4, 8
    rows, inner = BIG + 64, 16
    tiles_i = inner // block_i
    pid = (BIG // block_r + 3) * tiles_i + 1  # a row tile past row 2^31, the second column tile
    out = torch.empty(block_r + block_i, dtype=torch.int64)
    with _as_program(pid):
        _tail_tile_probe[(1,)](out, rows, inner, INDEX64=True, BLOCK_R=block_r, BLOCK_I=block_i)
    pid_r, pid_i = divmod(pid, tiles_i)
    assert out[:block_r].tolist() == [pid_r * block_r + i for i in range(block_r)]
    assert out[block_r:].tolist() == [pid_i * block_i + j for j in range(block_i)]


@triton.jit
def _shift_offset_probe(out_ptr, c0, HW, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr):
    tl.store(out_ptr + tl.arange(0, BLOCK_C), _shift_offset(c0 + tl.arange(0, BLOCK_C), HW, CHANNELS_LAST))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_bn_shift_offset_past_2_31(channels_last):
    """The moments' per-channel shift (each channel's first value in sample 0): in NCHW, channel c of a sample of
    2^12 channels x 2^20 pixels lies at c * 2^20, past 2^31 for the last channels."""
    c0, hw, block_c = 2**12 - 8, 2**20, 8
    out = torch.empty(block_c, dtype=torch.int64)
    _shift_offset_probe[(1,)](out, c0, hw, CHANNELS_LAST=channels_last, BLOCK_C=block_c)
    want = [(c0 + j) * (1 if channels_last else hw) for j in range(block_c)]
    assert out.tolist() == want
    assert channels_last or want[-1] >= BIG


@triton.jit
def _partial_offset_probe(out_ptr, t, C, BLOCK_C: tl.constexpr):
    tl.store(out_ptr + tl.arange(0, BLOCK_C), _partial_offset(t, C, C - BLOCK_C + tl.arange(0, BLOCK_C)))


def test_conv_bn_partials_offset_past_2_31():
    """conv_bn's statistics partials, a (T, C) buffer merged row by row (_chan_merge): row 2^20 + 5 of 2^12
    channels starts past 2^32."""
    t, c, block_c = 2**20 + 5, 2**12, 4
    out = torch.empty(block_c, dtype=torch.int64)
    _partial_offset_probe[(1,)](out, t, c, BLOCK_C=block_c)
    assert out.tolist() == [t * c + c - block_c + j for j in range(block_c)]


@triton.jit
def _pixel_probe(out_ptr, r0, SP_H, SP_W, BLOCK: tl.constexpr):
    img, ph, pw = _pixel(r0 + tl.arange(0, BLOCK).to(tl.int64), SP_H, SP_W, True)
    r = tl.arange(0, BLOCK)
    tl.store(out_ptr + r, img)
    tl.store(out_ptr + BLOCK + r, ph.to(tl.int64))
    tl.store(out_ptr + 2 * BLOCK + r, pw.to(tl.int64))


def test_pixel_decode_past_2_31_per_plane():
    """The conv kernels' pixel decode (the forward tiles and conv_bn's wgrad loop share it): rows of image 1 of
    46341 x 46341-pixel planes (2^31 + pixels each), across a row boundary."""
    h = w = 46341
    block = 16
    r0 = h * w + 3 * w - block // 2  # image 1, the end of row 2 and the start of row 3
    out = torch.empty(3 * block, dtype=torch.int64)
    _pixel_probe[(1,)](out, r0, h, w, BLOCK=block)
    rows = [r0 + i for i in range(block)]
    assert out.view(3, block).tolist() == [[r // (h * w) for r in rows], [(r % (h * w)) // w for r in rows],
                                           [r % w for r in rows]]


@triton.jit
def _tail_offset_probe(out_ptr, r0, I, BLOCK: tl.constexpr):
    rr = r0 + tl.arange(0, BLOCK)
    ri = I - BLOCK + tl.arange(0, BLOCK)
    off = _tail_offset(rr, ri, I)
    tl.store(out_ptr + tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :], off)


@pytest.mark.parametrize("shape,channels_last", [((2, 2**10, 2**11, 2**11 + 3), False),
                                                 ((2, 2**11 + 3, 2**10, 2**11), True)],
                         ids=["nchw", "channels_last"])
def test_tail_offsets_past_2_31(shape, channels_last):
    """The tail kernels' and conv_bn backward's grad_x kernel's flat offsets (_tail_offset) in the (R, I) row view
    of a dense (N, C, H, W) tensor of 2^33 + elements, at rows deep inside sample 1 (int32 rows: the offset is
    row * I + column in int64)."""
    n_, c_, h_, w_ = shape
    rows, inner = (n_ * h_ * w_, c_) if channels_last else (n_ * c_, h_ * w_)
    block = 16
    r0 = rows // 2 + rows // 4 + 5
    assert r0 + block < BIG  # rows fit int32; their offsets do not
    out = torch.empty(block * block, dtype=torch.int64)
    _tail_offset_probe[(1,)](out, r0, inner, BLOCK=block)
    want = [(r0 + i) * inner + inner - block + j for i in range(block) for j in range(block)]
    assert out.tolist() == want
    assert min(want) >= BIG


_BN_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import resfused.triton_kernels.bn_add_relu as k

kernels = [k._bn_stats_partial_kernel, k._bn_stats_finalize_kernel, k._bn_apply_kernel, k._bn_bwd_reduce_kernel,
           k._bn_bwd_finalize_kernel, k._bn_bwd_elementwise_kernel]
for layout in (True, False):
    for fn in kernels:
        if isinstance(fn, triton.runtime.Autotuner):
            fn = fn.fn
        names = fn.arg_names
        constexpr = {n for n, p in zip(names, fn.params) if p.is_constexpr}
        consts = {n: (layout if n == "CHANNELS_LAST" else 1 if n in ("HAS_SAMPLE_SCALE",) else True)
                  for n in constexpr if not n.startswith("BLOCK")}
        consts.update(BLOCK_R=32 if layout else 256, BLOCK_C=64 if layout else 8)
        if "BLOCK_P" in constexpr:
            consts.update(BLOCK_P=32, BLOCK_C=64)
        consts = {n: v for n, v in consts.items() if n in constexpr}
        def kind(n):
            if n in constexpr:
                return "constexpr"
            if n.endswith("_ptr"):
                return "*u8" if n == "mask_ptr" else ("*bf16" if n in ("x_ptr", "z_ptr", "y_ptr", "dy_ptr", "g_ptr", "dx_ptr") else "*fp32")
            return "fp32" if n.startswith(("eps", "mom")) else "i32"
        src = ASTSource(fn=fn, signature={n: kind(n) for n in names},
                        constexprs={(names.index(n),): v for n, v in consts.items()})
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
        print(fn.__name__, "ok")
"""


def test_bn_kernels_compile_for_gpu():
    """The BN + add + ReLU kernels (their tile-relative offsets changed) lower to PTX for sm_90, both layouts (in a
    subprocess without TRITON_INTERPRET)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _BN_COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0 and ("ptxas" in proc.stderr and "not found" in proc.stderr.lower()):
        pytest.skip(f"no ptxas for Triton's NVIDIA backend: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(" ok") == 12
