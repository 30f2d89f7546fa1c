// Two-pass kernels: statistics / backward reductions, finalize, apply, dx.
// Part of the fused BatchNorm + add + ReLU kernels (csrc/bn_add_relu.cu has the overview: data model,
// passes over memory, schemes). Device code only: no ATen, compiled by nvcc for the GPU and by the
// host compiler for the CPU SIMT runtime (csrc/sim/, RESFUSED_SIM defined).
#pragma once

#include "channels_last.cuh"
#include "nchw.cuh"

namespace resfused {
namespace {
// ------------------------------------------------------------------------------------------------
// two-pass kernels
// ------------------------------------------------------------------------------------------------
// grid (num_tiles, splits), block (TX, TY); dynamic smem: the Welford<8> tree
template <typename E>
__global__ void __launch_bounds__(kThreads) cl_stats_kernel(KParams p) {
  float* buf = reinterpret_cast<float*>(dynamic_smem());
  const ClThread t = cl_thread(p, blockIdx.x, blockIdx.y);
  Welford<kGroup> s;
  cl_stats_phase<E>(p, t, nullptr, s);
  block_tree_reduce(s, buf, t.tx, t.ty, t.TX, t.TY);
  cl_write_welford_partial(p, t, blockIdx.x, blockIdx.y, s);
}

// grid (C * splits), block (kThreads); dynamic smem: the Welford<1> tree
template <typename E>
__global__ void __launch_bounds__(kThreads) nchw_stats_kernel(KParams p) {
  float* buf = reinterpret_cast<float*>(dynamic_smem());
  const int c = blockIdx.x % p.C;
  const int split = blockIdx.x / p.C;
  const NcThread n = nc_thread(p, c, split);
  Welford<1> s;
  nc_stats_phase<E>(p, n, nullptr, s);
  block_tree_reduce(s, buf, 0, n.t, 1, n.T);
  if (n.t == 0) {
    p.pa[static_cast<int64_t>(split) * p.C + c] = s.mean[0];
    p.pb[static_cast<int64_t>(split) * p.C + c] = s.m2[0];
    if (c == 0) p.pn[split] = s.n;
  }
}

// grid ceil(C / 32), block (32, 16): merge the splits of each channel, write mean/invstd, update
// the running stats.
template <typename E>
__global__ void __launch_bounds__(kFinalizeTX* kFinalizeTY) finalize_stats_kernel(KParams p) {
  RESFUSED_SHARED(float, buf, Welford<1>::kFloats * kFinalizeTX * (kFinalizeTY / 2));
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.x * kFinalizeTX + tx;
  Welford<1> s;
  s.init();
  if (c < p.C) {
    for (int r = ty; r < p.splits; r += kFinalizeTY) {
      Welford<1> o;
      o.n = p.pn[r];
      o.mean[0] = p.pa[static_cast<int64_t>(r) * p.C + c];
      o.m2[0] = p.pb[static_cast<int64_t>(r) * p.C + c];
      s.merge(o);
    }
  }
  block_tree_reduce(s, buf, tx, ty, kFinalizeTX, kFinalizeTY);
  if (ty == 0 && c < p.C) {
    float m, inv;
    finish_stats(p, c, s.mean[0], stats_shift<E>(p, c), s.m2[0], m, inv, true);
  }
}

// grid ceil(C / 32), block (32, 16): grad_bias = sum g, grad_weight = invstd * sum g (x - mean).
__global__ void __launch_bounds__(kFinalizeTX* kFinalizeTY) finalize_sums_kernel(KParams p) {
  RESFUSED_SHARED(float, buf, Sums<1>::kFloats * kFinalizeTX * (kFinalizeTY / 2));
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.x * kFinalizeTX + tx;
  Sums<1> s;
  s.init();
  if (c < p.C) {
    for (int r = ty; r < p.splits; r += kFinalizeTY) {
      s.g[0] += p.pa[static_cast<int64_t>(r) * p.C + c];
      s.gx[0] += p.pb[static_cast<int64_t>(r) * p.C + c];
    }
  }
  block_tree_reduce(s, buf, tx, ty, kFinalizeTX, kFinalizeTY);
  if (ty == 0 && c < p.C) {
    p.grad_bias[c] = s.g[0];
    p.grad_weight[c] = p.M > 0 ? s.gx[0] * p.scale_in[c] : 0.f;  // empty batch: 0, not 0 * NaN
  }
}

// grid (num_tiles, splits), block (TX, TY): y, mask from x, residual and per-channel statistics
// (batch mean/invstd, or running mean/var when is_var).
template <typename E>
__global__ void __launch_bounds__(kThreads) cl_apply_kernel(KParams p) {
  RESFUSED_SHARED(float, prm, kApplyFields * kGroup * kMaxTX);
  const ClThread t = cl_thread(p, blockIdx.x, blockIdx.y);
  cl_store_apply_params(p, t, prm);
  __syncthreads();
  cl_apply_phase<E>(p, t, nullptr, false, prm);
}

// grid ceil(groups / (kThreads * U)), block kThreads: flat over all groups of all planes.
template <typename E>
__global__ void __launch_bounds__(kThreads) nchw_apply_kernel(KParams p) {
  using Bits = typename E::Bits;
  constexpr int U = E::kBatch;
  const Bits* x = static_cast<const Bits*>(p.x);
  const Bits* res = static_cast<const Bits*>(p.res);
  Bits* y = static_cast<Bits*>(p.y);
  const int64_t total = p.outer * p.gpr;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * (kThreads * U) + threadIdx.x;
  Group<Bits> xv[U], rv[U];
  NcLoc l[U];
  int ch[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t q = base + static_cast<int64_t>(u) * kThreads;
    if (q < total) {
      l[u] = nc_flat_loc(p, q, ch[u]);
      load_group(xv[u], x + l[u].off, l[u].nv);
      if (p.has_res) load_group(rv[u], res + l[u].off, l[u].nv);
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t q = base + static_cast<int64_t>(u) * kThreads;
    if (q < total) {
      float mean, scale, shift;
      apply_params(p, ch[u], mean, scale, shift);
      Group<Bits> out;
      const uint32_t bits = apply_group<E>(p, xv[u], rv[u], [&](int, float& m, float& sc, float& sh) {
        m = mean;
        sc = scale;
        sh = shift;
      }, out);
      store_group(y + l[u].off, out, l[u].nv);
      if (p.mask_out != nullptr) p.mask_out[l[u].mask] = static_cast<uint8_t>(bits & valid_bits(l[u].nv));
    }
  }
}

// grid (num_tiles, splits), block (TX, TY): g = dy * mask (written as the residual's gradient when
// asked), eval dx = k * g, and per-block partial sums when do_sums.
template <typename E>
__global__ void __launch_bounds__(kThreads) cl_bwd_reduce_kernel(KParams p) {
  RESFUSED_SHARED(float, prm, kReduceFields * kGroup * kMaxTX);
  float* buf = reinterpret_cast<float*>(dynamic_smem());
  const ClThread t = cl_thread(p, blockIdx.x, blockIdx.y);
  cl_store_reduce_params(p, t, prm);
  __syncthreads();
  Sums<kGroup> s;
  cl_bwd_reduce_phase<E>(p, t, nullptr, nullptr, prm, s);
  if (!p.do_sums) return;  // uniform over the grid
  block_tree_reduce(s, buf, t.tx, t.ty, t.TX, t.TY);
  cl_write_sums_partial(p, t, blockIdx.y, s);
}

template <typename E>
__global__ void __launch_bounds__(kThreads) nchw_bwd_reduce_kernel(KParams p) {
  float* buf = reinterpret_cast<float*>(dynamic_smem());
  const int c = blockIdx.x % p.C;
  const int split = blockIdx.x / p.C;
  const NcThread n = nc_thread(p, c, split);
  Sums<1> s;
  nc_bwd_reduce_phase<E>(p, n, nullptr, nullptr, s);
  if (!p.do_sums) return;
  block_tree_reduce(s, buf, 0, n.t, 1, n.T);
  if (n.t == 0) {
    p.pa[static_cast<int64_t>(split) * p.C + c] = s.g[0];
    p.pb[static_cast<int64_t>(split) * p.C + c] = s.gx[0];
  }
}

// grid (num_tiles, splits), block (TX, TY): training dx from g (or dy and mask), x and the sums in
// grad_bias/grad_weight.
template <typename E>
__global__ void __launch_bounds__(kThreads) cl_dx_kernel(KParams p) {
  RESFUSED_SHARED(float, prm, kDxFields * kGroup * kMaxTX);
  const ClThread t = cl_thread(p, blockIdx.x, blockIdx.y);
  if (t.ty == 0 && t.active) {
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const int c = min(kGroup * t.k + j, p.C - 1);  // padding lanes reuse a valid channel, never stored
      cl_store_dx_params(t, prm, dx_coef(p, c, p.grad_bias[c], p.grad_weight[c]), j);
    }
  }
  __syncthreads();
  cl_dx_phase<E>(p, t, nullptr, nullptr, false, prm);
}

template <typename E>
__global__ void __launch_bounds__(kThreads) nchw_dx_kernel(KParams p) {
  using Bits = typename E::Bits;
  constexpr int U = E::kBatch;
  const Bits* gsrc = static_cast<const Bits*>(p.dres_is_g ? p.dres : p.dy);
  const Bits* x = static_cast<const Bits*>(p.x);
  Bits* dx = static_cast<Bits*>(p.dx);
  const int64_t total = p.outer * p.gpr;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * (kThreads * U) + threadIdx.x;
  Group<Bits> gv[U], xv[U];
  NcLoc l[U];
  int ch[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t q = base + static_cast<int64_t>(u) * kThreads;
    if (q < total) {
      l[u] = nc_flat_loc(p, q, ch[u]);
      load_group(gv[u], gsrc + l[u].off, l[u].nv);
      if (!p.dres_is_g && p.relu) gv[u] = masked(gv[u], static_cast<uint32_t>(p.mask_in[l[u].mask]));
      load_group(xv[u], x + l[u].off, l[u].nv);
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t q = base + static_cast<int64_t>(u) * kThreads;
    if (q < total) {
      const DxCoef d = dx_coef(p, ch[u], p.grad_bias[ch[u]], p.grad_weight[ch[u]]);
      Group<Bits> o;
#pragma unroll
      for (int e = 0; e < kGroup; ++e)
        o.v[e] = E::from_float(dx_value(d, E::to_float(gv[u].v[e]), E::to_float(xv[u].v[e])));
      store_group(dx + l[u].off, o, l[u].nv);
    }
  }
}
}  // namespace
}  // namespace resfused
