"""Run every CUDA-backend kernel on small shapes, for compute-sanitizer (GPU machine only).

    compute-sanitizer --tool memcheck  --error-exitcode 86 python bench/sanitize_case.py [--group bn|conv|all]
    compute-sanitizer --tool racecheck --error-exitcode 86 python bench/sanitize_case.py --group bn
    (synccheck and initcheck work the same way); --list prints the cases and runs nothing (any machine)

Groups: bn, the BN + add + ReLU kernels of csrc/bn_add_relu.cu (below); conv, the conv ops of _C
(csrc/conv_bias_act.cu: conv + bias + residual / shortcut + ReLU; csrc/conv_bn.cpp: the fused conv_bn forward
with and without the BN + ReLU prologue and statistics, and its wgrad) on two small convs each, through the
public entry points, compared with the reference backend. Every case is small: a few seconds under memcheck.

bn group:
Covers the two-pass and the persistent scheme (RESFUSED_CUDA_SCHEME), the persistent kernels also with
no on-chip cache (RESFUSED_CUDA_PERSISTENT_CACHE_BYTES=0) so their re-read path runs; NCHW and
channels_last; fp16 and fp32; with and without the residual; a shape with C % 8 == 0 and one with
C % 8 != 0, H*W % 8 != 0 and tensors starting off a 16-byte boundary: training forward (with and
without ReLU), the backward variants (training with every gradient, dx only, residual + weight grads;
eval) and the eval forward. Kept to a few thousand launches so both sanitizer runs fit in about a minute.
Outputs are checked loosely against the reference backend, so a silently wrong kernel fails too.
Exit status 0: every case ran and matched.
"""

from __future__ import annotations

import os
import sys

import torch

import resfused  # noqa: F401
from resfused import _backend
from resfused.reference import bn_add_relu as ref

SETTINGS = [("two_pass", None), ("persistent", None), ("persistent", "0")]  # (scheme, cache cap in bytes)
SHAPES = [((2, 16, 6, 6), 0), ((3, 13, 5, 7), 1)]  # (shape, storage offset in elements)
# (training, need_input_grad, need_residual_grad, need_weight_grad)
BACKWARDS = [(True, True, True, True), (True, True, False, False), (True, False, True, True),
             (False, True, True, True)]


def _tensor(shape, dtype, layout, gen, misalign):
    n, c, h, w = shape
    flat = torch.randn(n * c * h * w + misalign, generator=gen).to(dtype).cuda()[misalign:]
    return flat.view(n, h, w, c).permute(0, 3, 1, 2) if layout == "cl" else flat.view(n, c, h, w)


def _close(name, got, want, dtype):
    tol = 3e-2 if dtype != torch.float32 else 1e-4
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if got.numel() and not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
        raise AssertionError(f"{name}: max error {(got.float() - want.float()).abs().max().item():.3e}")


def run_case(ops, shape, dtype, layout, residual, misalign, seed):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = _tensor(shape, dtype, layout, g, misalign)
    z = _tensor(shape, dtype, layout, g, misalign) if residual else None
    dy = _tensor(shape, dtype, layout, g, misalign)
    w = (torch.rand(c, generator=g) + 0.5).cuda()
    b = torch.randn(c, generator=g).cuda()
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    for relu in ((True, False) if not residual else (True,)):
        y, mask, mean, invstd = ops.bn_add_relu_forward_train(x, z, w, b, rm, rv, 0.1, 1e-5, relu)
        y_r, mask_r, mean_r, invstd_r = ref.forward_train(x, z, w, b, None, None, 0.1, 1e-5, relu)
        _close("y", y, y_r, dtype)
        for training, nx, nr, nw in BACKWARDS if relu else BACKWARDS[:1]:
            m, s = (mean, invstd) if training else (rm, torch.rsqrt(rv + 1e-5))
            outs = ops.bn_add_relu_backward(dy, x, mask, m, s, w, relu, training, nx, nr, nw)
            if (training, nx, nr, nw) == BACKWARDS[0]:
                outs_r = ref.backward(dy, x, mask, m, s, w, relu, training, nx, nr, nw)
                for name, got, want in zip(("dx", "dres", "dw", "db"), outs, outs_r):
                    _close(name, got, want, dtype if name in ("dx", "dres") else torch.float32)
    ye, _ = ops.bn_add_relu_forward_eval(x, z, w, b, rm, rv, 1e-5, True, True)
    ye_r, _ = ref.forward_eval(x, z, w, b, rm, rv, 1e-5, True, True)
    _close("y_eval", ye, ye_r, dtype)


CONV_CASES = [  # (N, C_in, H, W, C_out, k, stride, dtype)
    (2, 8, 6, 6, 16, 3, 1, torch.bfloat16), (2, 16, 5, 5, 8, 1, 2, torch.float16)]


def run_conv_case(n, c_in, h, w, c_out, k, stride, dtype, seed, device="cuda", backend="cuda") -> int:
    """conv_bias_act (relu; + residual; + projection shortcut) and conv_bn (forward with/without prologue and
    statistics, backward) on ``backend`` against the reference backend. Returns the number of op calls.
    (device="cpu", backend="reference": the CPU test of this function's own calls.)"""
    from resfused.ops.conv_bias_act import conv_bias_act
    from resfused.ops.conv_bn import BNParams, conv_bn

    g = torch.Generator().manual_seed(seed)
    cl = torch.channels_last

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device).contiguous(memory_format=cl)

    def v(lo, scale):
        return (lo + scale * torch.rand(c_in, generator=g)).to(device)

    x = t(n, c_in, h, w)
    wt = t(c_out, c_in, k, k, scale=(c_in * k * k) ** -0.5)
    b = torch.randn(c_out, generator=g).to(dtype).to(device)
    z = t(n, c_out, (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1)
    sc_x, sc_w = t(n, c_in, h, w), t(c_out, c_in, 1, 1, scale=c_in ** -0.5)
    calls = 0
    for kw in (dict(), dict(residual=z), dict(shortcut_x=sc_x, shortcut_weight=sc_w, shortcut_stride=stride)):
        args = dict(stride=stride, padding=k // 2, relu=True, **kw)
        residual = args.pop("residual", None)
        got = conv_bias_act(x, wt, b, residual, backend=backend, **args)
        want = conv_bias_act(x, wt, b, residual, backend="reference", **args)
        _close(f"conv_bias_act{sorted(kw)}", got, want, dtype)
        calls += 1
    prologue = BNParams(mean=v(-0.1, 0.2), invstd=v(0.5, 1.0), weight=v(0.5, 1.0), bias=v(-0.1, 0.2), training=False)
    for pro in (None, prologue):
        xs = x.detach().requires_grad_(True)
        ws = wt.detach().requires_grad_(True)
        outs = {}
        for which in (backend, "reference"):
            xs.grad = ws.grad = None
            y, mean, invstd = conv_bn(xs, ws, stride, k // 2, prologue=pro, stats=True, backend=which)
            y.float().square().sum().backward()
            outs[which] = (y.detach(), mean, invstd, xs.grad.clone(), ws.grad.clone())
        for name, got, want in zip(("y", "mean", "invstd", "dx", "dw"), outs[backend], outs["reference"]):
            _close(f"conv_bn[{'prologue' if pro else 'plain'}].{name}", got, want,
                   dtype if name in ("y", "dx", "dw") else torch.float32)
        calls += 2
    return calls


def list_cases() -> None:
    for scheme, cap in SETTINGS:
        for shape, misalign in SHAPES:
            print(f"bn   {scheme:10s} cache={cap or 'auto':4s} {shape} offset={misalign} nchw/cl fp16/fp32 +-residual")
    for case in CONV_CASES:
        print(f"conv N={case[0]} C_in={case[1]} {case[2]}x{case[3]} C_out={case[4]} k={case[5]} s={case[6]} {case[7]}")


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="bench/sanitize_case.py", description="small cases of every csrc kernel")
    p.add_argument("--group", choices=("bn", "conv", "all"), default="all")
    p.add_argument("--list", action="store_true", help="print the cases, run nothing (no GPU needed)")
    args = p.parse_args(argv)
    if args.list:
        list_cases()
        return 0
    if not torch.cuda.is_available():
        print("sanitize_case: needs a CUDA device", file=sys.stderr)
        return 2
    if _backend.cuda_ext() is None:
        print(f"sanitize_case: {_backend._cuda_ext_status()[1]}", file=sys.stderr)
        return 2
    ops = torch.ops.resfused_cuda
    n = 0
    if args.group in ("conv", "all"):
        for i, case in enumerate(CONV_CASES):
            n += run_conv_case(*case, seed=100 + i)
            print(f"conv {case}: ran and matched the reference")
    if args.group == "conv":
        torch.cuda.synchronize()
        print(f"sanitize_case: {n} conv op calls ran and matched the reference")
        return 0
    for scheme, cap in SETTINGS:
        os.environ["RESFUSED_CUDA_SCHEME"] = scheme
        if cap is None:
            os.environ.pop("RESFUSED_CUDA_PERSISTENT_CACHE_BYTES", None)
        else:
            os.environ["RESFUSED_CUDA_PERSISTENT_CACHE_BYTES"] = cap
        for shape, misalign in SHAPES:
            for layout in ("nchw", "cl"):
                for dtype in (torch.float16, torch.float32):
                    probe = _tensor(shape, dtype, layout, torch.Generator().manual_seed(0), 0)
                    plan = ops.bn_add_relu_plan(probe, "forward_train") + " | " + ops.bn_add_relu_plan(probe, "backward")
                    for residual in (True, False):
                        run_case(ops, shape, dtype, layout, residual, misalign, seed=n)
                        n += 1
                    print(f"{scheme:10s} cache={cap or 'auto':4s} {layout:4s} {str(dtype):13s} {shape}: {plan}")
    torch.cuda.synchronize()
    print(f"sanitize_case: {n} cases ran and matched the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
