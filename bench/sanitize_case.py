"""Run every CUDA-backend kernel on small shapes, for compute-sanitizer (GPU machine only).

    compute-sanitizer --tool memcheck  --error-exitcode 86 python bench/sanitize_case.py
    compute-sanitizer --tool racecheck --error-exitcode 86 python bench/sanitize_case.py
    (synccheck and initcheck work the same way)

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


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_case: needs a CUDA device", file=sys.stderr)
        return 2
    if _backend.cuda_ext() is None:
        print(f"sanitize_case: {_backend._cuda_ext_status()[1]}", file=sys.stderr)
        return 2
    ops = torch.ops.resfused_cuda
    n = 0
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
