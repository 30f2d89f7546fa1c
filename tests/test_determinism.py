"""The Triton kernels' results do not depend on the autotune config chosen: bitwise, in every process.

The order of every floating-point reduction is fixed by the shape, never by a tuned parameter:
  * conv + BN forward: statistics per _STATS_M-row tile whatever BLOCK_M is, summed by a fixed pairwise tree (not
    tl.sum, whose order follows num_warps and the layout); the GEMM's K chunk (BLOCK_K) is not tuned;
  * conv_bias_act: BLOCK_K not tuned (each output is one accumulator fed in K order);
  * BatchNorm + add + ReLU: the reducing kernels are not autotuned at all (their only tuned parameter would be
    num_warps); only the elementwise ones are.
CPU (interpreter): every tile config of the autotune lists runs the conv kernels and gives the same bits (y,
statistics, running statistics); the config lists and the kernels' wrapping are checked as the GPU import builds
them (a subprocess without TRITON_INTERPRET), and with RESFUSED_TRITON_AUTOTUNE=0 no kernel is autotuned.
GPU (cuda): every config in the autotune lists, in two processes, gives the same bits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from resfused.triton_kernels import conv_bias_act as cba
from resfused.triton_kernels import conv_bn as cb

from conftest import HAS_CUDA


def _configs():
    """Every autotuned tile config of the conv kernels, as launch kwargs (num_warps/num_stages only on a GPU)."""
    out = []
    for cfg in cba._gpu_configs():
        kw = dict(cfg.kwargs)
        if not cba._INTERPRET:
            kw.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        out.append(kw)
    return out


LAYOUTS = {"cl": torch.channels_last, "nchw": torch.contiguous_format}


def _conv_bn_inputs(dtype, device="cpu", layout="cl"):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 16, 11, 9, generator=gen) + 0.5).to(dtype).to(device)
    x = x.contiguous(memory_format=LAYOUTS[layout])
    w = (torch.randn(24, 16, 3, 3, generator=gen) / 12).to(dtype).to(device)
    pro = [torch.randn(16, generator=gen).to(device) * 0.1, torch.rand(16, generator=gen).to(device) + 0.5,
           torch.rand(16, generator=gen).to(device) + 0.5, torch.randn(16, generator=gen).to(device) * 0.1]
    return x, w, pro


def _conv_bn_run(monkeypatch, cfg, dtype, device="cpu", layout="cl"):
    monkeypatch.setattr(cb, "_kernel", cb._conv_bn_fwd_kernel)
    monkeypatch.setattr(cb, "_FIXED", cfg)
    x, w, pro = _conv_bn_inputs(dtype, device, layout)
    rm = torch.zeros(24, device=device)
    rv = torch.ones(24, device=device)
    y, mean, invstd = cb.forward(x, w, *pro, rm, rv, [1, 1], [1, 1], [1, 1], 1, True, True, 0.1, 1e-5)
    return [y, mean, invstd, rm, rv]


def _assert_bitwise(runs, names):
    first = runs[0]
    for cfg, run in runs[1:]:
        for name, a, b in zip(names, first[1], run):
            assert torch.equal(a, b), f"{name} differs between {first[0]} and {cfg}"


@pytest.mark.skipif(not cb._INTERPRET, reason="the GPU test below runs the configs on the device")
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_conv_bn_forward_same_bits_for_every_tile_config(monkeypatch, dtype, layout):
    """conv + BN forward (prologue, statistics, running stats) under every autotuned tile config, channels_last and
    NCHW input (the gather path, with its own tiles on a GPU; every tile here): the same y, mean, invstd,
    running_mean and running_var, bit for bit. (Fails with the statistics tile = BLOCK_M.)"""
    runs = [(cfg, _conv_bn_run(monkeypatch, cfg, dtype, layout=layout)) for cfg in _configs()]
    _assert_bitwise(runs, ["y", "mean", "invstd", "running_mean", "running_var"])


@pytest.mark.skipif(not cb._INTERPRET, reason="the GPU test below runs the configs on the device")
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_conv_bias_act_same_bits_for_every_tile_config(monkeypatch, layout):
    runs = [(cfg, _conv_bias_act_run(monkeypatch, cfg, layout=layout)) for cfg in _configs()]
    _assert_bitwise(runs, ["y"])


def _conv_bias_act_run(monkeypatch, cfg, device="cpu", layout="cl"):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 9, 9, generator=gen).to(device).contiguous(memory_format=LAYOUTS[layout])
    w = (torch.randn(24, 16, 3, 3, generator=gen) / 12).to(device)
    b = torch.randn(24, generator=gen).to(device)
    r = torch.randn(2, 24, 9, 9, generator=gen).to(device).contiguous(memory_format=LAYOUTS[layout])
    monkeypatch.setattr(cba, "_kernel", cba._conv_bias_act_kernel)
    monkeypatch.setattr(cba, "_FIXED", cfg)
    return [cba.conv_bias_act(x, w, b, r, None, None, [1, 1], [1, 1], [1, 1], 1, [1, 1], True)]


def test_statistics_tile_is_not_a_tuned_parameter():
    """Every tuned config's BLOCK_M is a multiple of the statistics tile, BLOCK_K is the same in all, BLOCK_M >= 64
    with num_warps a multiple of 4 (one MMA instruction family)."""
    stats_m = 64  # the GPU value (the interpreter's is 16, which divides it)
    assert cb._STATS_M in (16, 64)
    for cfg in cba._gpu_configs():
        assert cfg.kwargs["BLOCK_M"] % stats_m == 0 and cfg.kwargs["BLOCK_M"] >= 64
        assert cfg.kwargs["BLOCK_K"] == cba._GEMM_BLOCK_K
        assert cfg.num_warps % 4 == 0


def test_nchw_and_channels_last_tune_over_their_own_tiles():
    """NCHW input (the scalar gather path) tunes over the 8-warp tiles that do not spill there (cba._NCHW_TILES),
    channels_last over the others; every config is one of the two lists."""
    configs = cba._gpu_configs()
    tiles = [cba._tile(c) for c in configs]
    assert sorted(tiles) == sorted(cba._GPU_TILES + cba._NCHW_TILES) and len(set(tiles)) == len(tiles)
    nchw = [cba._tile(c) for c in cba._prune_configs(configs, {"sxc": 49})]
    cl = [cba._tile(c) for c in cba._prune_configs(configs, {"sxc": 1})]
    assert nchw == list(cba._NCHW_TILES) and all(t[2] == 8 and t[0] * t[1] <= 64 * 64 for t in nchw)
    assert cl == list(cba._GPU_TILES)


_WRAPPING_SCRIPT = r"""
import json
import triton
from resfused.triton_kernels import bn_add_relu as bn, conv_bias_act as cba, conv_bn as cb
def kind(k):
    if isinstance(k, triton.runtime.Autotuner):
        return sorted({(c.num_warps, tuple(sorted(c.kwargs.items()))) for c in k.configs}, key=str)
    return None
names = {"bn." + n: kind(getattr(bn, n)) for n in dir(bn) if n.endswith("_kernel")}
names.update({"cb._kernel": kind(cb._kernel), "cba._kernel": kind(cba._kernel)})
names.update({"cb." + n: kind(getattr(cb, n)) for n in dir(cb) if n.endswith("_kernel")})
print(json.dumps({k: (v if v is None else [[w, [list(p) for p in kw]] for w, kw in v]) for k, v in names.items()}))
"""


def _wrapping(autotune: str):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["RESFUSED_TRITON_AUTOTUNE"] = autotune
    proc = subprocess.run([sys.executable, "-c", _WRAPPING_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


REDUCING_BN = ["bn._bn_stats_partial_kernel", "bn._bn_stats_finalize_kernel", "bn._bn_bwd_reduce_kernel",
               "bn._bn_bwd_finalize_kernel"]


def test_gpu_import_autotunes_no_reducing_bn_kernel():
    """As a GPU process builds them: the BN reducing kernels are plain kernels (one config), the elementwise ones
    tune num_warps only, the conv forward kernels tune tiles that keep the reduction order."""
    wrapping = _wrapping("1")
    for name in REDUCING_BN:
        assert wrapping[name] is None, f"{name} is autotuned: {wrapping[name]}"
    assert wrapping["bn._bn_apply_kernel"] is not None
    assert wrapping["cb._kernel"] is not None and wrapping["cba._kernel"] is not None


def test_autotune_off_fixes_every_kernel():
    """RESFUSED_TRITON_AUTOTUNE=0: no kernel of any Triton module is autotuned (bn_add_relu ignored it before)."""
    wrapping = _wrapping("0")
    tuned = [name for name, configs in wrapping.items() if configs is not None]
    assert not tuned, tuned


# ---------------------------------------------------------------------------------------------------
# GPU: every config in the autotune lists, in two processes
# ---------------------------------------------------------------------------------------------------

_GPU_SCRIPT = r"""
import hashlib, json, sys
import torch
sys.path.insert(0, sys.argv[1])
import test_determinism as td
from resfused.triton_kernels import bn_add_relu as bn, conv_bn as cb
from _pytest.monkeypatch import MonkeyPatch

def digest(ts):
    return [hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for t in ts]

out = {}
mp = MonkeyPatch()
for dtype in (torch.float32, torch.bfloat16):
    for cfg in td._configs():
        out[f"conv_bn {dtype} {sorted(cfg.items())}"] = digest(td._conv_bn_run(mp, cfg, dtype, "cuda"))
for cfg in td._configs():
    out[f"conv_bias_act {sorted(cfg.items())}"] = digest(td._conv_bias_act_run(mp, cfg, "cuda"))
mp.undo()
gen = torch.Generator().manual_seed(2)
for layout in (torch.channels_last, torch.contiguous_format):
    x = torch.randn(8, 64, 28, 28, generator=gen).cuda().contiguous(memory_format=layout)
    z = torch.randn(8, 64, 28, 28, generator=gen).cuda().contiguous(memory_format=layout)
    w, b = torch.rand(64).cuda() + 0.5, torch.randn(64).cuda()
    rm, rv = torch.zeros(64).cuda(), torch.ones(64).cuda()
    y, mask, mean, invstd = bn.forward_train(x, z, w, b, rm, rv, 0.1, 1e-5, True)
    grads = bn.backward(torch.randn_like(x), x, mask, mean, invstd, w, True, True, True, True, True)
    out[f"bn {layout}"] = digest([y, mask, mean, invstd, rm, rv, *grads])
print(json.dumps(out))
"""


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_every_autotune_config_same_bits_in_two_processes():
    """On a GPU, every config of the conv autotune lists (forced one at a time) and the BN kernels (their
    elementwise kernels autotuned by timing in each process), in two fresh processes: every output, statistic and
    running statistic hashes the same."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["RESFUSED_TRITON_AUTOTUNE"] = "1"
    here = os.path.dirname(os.path.abspath(__file__))
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _GPU_SCRIPT, here], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0] == runs[1]
    for group in ("conv_bn torch.float32", "conv_bn torch.bfloat16", "conv_bias_act"):
        digests = {json.dumps(v) for k, v in runs[0].items() if k.startswith(group)}
        assert len(digests) == 1, f"{group}: the configs disagree"
