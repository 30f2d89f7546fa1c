// Persistent kernels: one cooperative launch, grid-wide sync between the reduction and the elementwise phase.
// Part of the fused BatchNorm + add + ReLU kernels (csrc/bn_add_relu.cu has the overview: data model,
// passes over memory, schemes). Device code only: no ATen, compiled by nvcc for the GPU and by the
// host compiler for the CPU SIMT runtime (csrc/sim/, RESFUSED_SIM defined).
#pragma once

#include "channels_last.cuh"
#include "nchw.cuh"

namespace resfused {
namespace {
// ------------------------------------------------------------------------------------------------
// persistent kernels: cooperative launch, grid (num_tiles * splits), one grid-wide sync.
// Dynamic smem: [cache: cache_iters * threads groups (x2 in backward)] [reduction tree]
// ------------------------------------------------------------------------------------------------

// Merge all splits of the thread's 8 channels (cross-block data: read through L2 with __ldcg).
// Returns the merged state at ty == 0.
__device__ __forceinline__ void cl_merge_welford(const KParams& p, const ClThread& t, float* buf, Welford<kGroup>& s) {
  s.init();
  if (t.active) {
    for (int r = t.ty; r < p.splits; r += t.TY) {
      Welford<kGroup> o;
      o.n = __ldcg(p.pn + r);
      const int64_t base = static_cast<int64_t>(r) * p.C + kGroup * t.k;
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        o.mean[j] = j < t.nv ? __ldcg(p.pa + base + j) : 0.f;
        o.m2[j] = j < t.nv ? __ldcg(p.pb + base + j) : 0.f;
      }
      s.merge(o);
    }
  }
  block_tree_reduce(s, buf, t.tx, t.ty, t.TX, t.TY);
}

template <typename E>
__global__ void __launch_bounds__(kPersistentThreads, 1) cl_fwd_persistent_kernel(KParams p) {
  using Bits = typename E::Bits;
  const int tile = blockIdx.x % p.num_tiles;
  const int split = blockIdx.x / p.num_tiles;
  const ClThread t = cl_thread(p, tile, split);
  Group<Bits>* cache = reinterpret_cast<Group<Bits>*>(dynamic_smem());
  float* buf = reinterpret_cast<float*>(cache + static_cast<size_t>(p.cache_iters) * t.TX * t.TY);
  float* prm = buf + p.tree_floats;

  Welford<kGroup> s;
  cl_stats_phase<E>(p, t, cache, s);
  block_tree_reduce(s, buf, t.tx, t.ty, t.TX, t.TY);
  cl_write_welford_partial(p, t, tile, split, s);
  __threadfence();
  cg::this_grid().sync();

  cl_merge_welford(p, t, buf, s);
  if (t.ty == 0 && t.active) {  // ty == 0 holds the merged state: share the apply parameters
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const int c = kGroup * t.k + j;
      float m = 0.f, inv = 0.f;
      if (j < t.nv) finish_stats(p, c, s.mean[j], stats_shift<E>(p, c), s.m2[j], m, inv, split == 0);
      const bool ok = j < t.nv;
      t.set_prm(prm, 0, j, m);
      t.set_prm(prm, 1, j, ok ? (p.weight != nullptr ? p.weight[c] : 1.f) * inv : 0.f);
      t.set_prm(prm, 2, j, ok && p.bias != nullptr ? p.bias[c] : 0.f);
    }
  }
  __syncthreads();
  cl_apply_phase<E>(p, t, cache, true, prm);
}

template <typename E>
__global__ void __launch_bounds__(kPersistentThreads, 1) nchw_fwd_persistent_kernel(KParams p) {
  using Bits = typename E::Bits;
  const int c = blockIdx.x % p.C;
  const int split = blockIdx.x / p.C;
  const NcThread n = nc_thread(p, c, split);
  Group<Bits>* cache = reinterpret_cast<Group<Bits>*>(dynamic_smem());
  float* buf = reinterpret_cast<float*>(cache + static_cast<size_t>(p.cache_iters) * n.T);

  Welford<1> s;
  nc_stats_phase<E>(p, n, cache, s);
  block_tree_reduce(s, buf, 0, n.t, 1, n.T);
  if (n.t == 0) {
    p.pa[static_cast<int64_t>(split) * p.C + c] = s.mean[0];
    p.pb[static_cast<int64_t>(split) * p.C + c] = s.m2[0];
    if (c == 0) p.pn[split] = s.n;
  }
  __threadfence();
  cg::this_grid().sync();

  s.init();
  for (int r = n.t; r < p.splits; r += n.T) {
    Welford<1> o;
    o.n = __ldcg(p.pn + r);
    o.mean[0] = __ldcg(p.pa + static_cast<int64_t>(r) * p.C + c);
    o.m2[0] = __ldcg(p.pb + static_cast<int64_t>(r) * p.C + c);
    s.merge(o);
  }
  block_tree_reduce(s, buf, 0, n.t, 1, n.T);
  if (n.t == 0) {
    float m, inv;
    finish_stats(p, c, s.mean[0], stats_shift<E>(p, c), s.m2[0], m, inv, split == 0);
    buf[0] = m;
    buf[1] = inv;
  }
  __syncthreads();
  const float mean = buf[0];
  const float scale = (p.weight != nullptr ? p.weight[c] : 1.f) * buf[1];
  const float shift = p.bias != nullptr ? p.bias[c] : 0.f;
  nc_apply_phase<E>(p, n, cache, true, mean, scale, shift);
}

template <typename E>
__global__ void __launch_bounds__(kPersistentThreads, 1) cl_bwd_persistent_kernel(KParams p) {
  using Bits = typename E::Bits;
  const int tile = blockIdx.x % p.num_tiles;
  const int split = blockIdx.x / p.num_tiles;
  const ClThread t = cl_thread(p, tile, split);
  const size_t cached = static_cast<size_t>(p.cache_iters) * t.TX * t.TY;
  Group<Bits>* cache_x = reinterpret_cast<Group<Bits>*>(dynamic_smem());
  Group<Bits>* cache_g = cache_x + cached;
  float* buf = reinterpret_cast<float*>(cache_g + cached);
  float* prm = buf + p.tree_floats;

  cl_store_reduce_params(p, t, prm);
  __syncthreads();
  Sums<kGroup> s;
  cl_bwd_reduce_phase<E>(p, t, cache_x, cache_g, prm, s);
  block_tree_reduce(s, buf, t.tx, t.ty, t.TX, t.TY);
  cl_write_sums_partial(p, t, split, s);
  __threadfence();
  cg::this_grid().sync();

  s.init();
  if (t.active) {
    for (int r = t.ty; r < p.splits; r += t.TY) {
      const int64_t base = static_cast<int64_t>(r) * p.C + kGroup * t.k;
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        s.g[j] += j < t.nv ? __ldcg(p.pa + base + j) : 0.f;
        s.gx[j] += j < t.nv ? __ldcg(p.pb + base + j) : 0.f;
      }
    }
  }
  block_tree_reduce(s, buf, t.tx, t.ty, t.TX, t.TY);
  // the reduce parameters are dead once every thread passed the tree: reuse prm for dx's
  if (t.ty == 0 && t.active) {
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const int c = min(kGroup * t.k + j, p.C - 1);  // padding lanes reuse a valid channel, never stored
      const float sg = s.g[j];
      const float sgx = s.gx[j] * p.scale_in[c];
      if (split == 0 && j < t.nv) {
        p.grad_bias[c] = sg;
        p.grad_weight[c] = sgx;
      }
      cl_store_dx_params(t, prm, dx_coef(p, c, sg, sgx), j);
    }
  }
  __syncthreads();
  cl_dx_phase<E>(p, t, cache_x, cache_g, true, prm);
}

template <typename E>
__global__ void __launch_bounds__(kPersistentThreads, 1) nchw_bwd_persistent_kernel(KParams p) {
  using Bits = typename E::Bits;
  const int c = blockIdx.x % p.C;
  const int split = blockIdx.x / p.C;
  const NcThread n = nc_thread(p, c, split);
  const size_t cached = static_cast<size_t>(p.cache_iters) * n.T;
  Group<Bits>* cache_x = reinterpret_cast<Group<Bits>*>(dynamic_smem());
  Group<Bits>* cache_g = cache_x + cached;
  float* buf = reinterpret_cast<float*>(cache_g + cached);

  Sums<1> s;
  nc_bwd_reduce_phase<E>(p, n, cache_x, cache_g, s);
  block_tree_reduce(s, buf, 0, n.t, 1, n.T);
  if (n.t == 0) {
    p.pa[static_cast<int64_t>(split) * p.C + c] = s.g[0];
    p.pb[static_cast<int64_t>(split) * p.C + c] = s.gx[0];
  }
  __threadfence();
  cg::this_grid().sync();

  s.init();
  for (int r = n.t; r < p.splits; r += n.T) {
    s.g[0] += __ldcg(p.pa + static_cast<int64_t>(r) * p.C + c);
    s.gx[0] += __ldcg(p.pb + static_cast<int64_t>(r) * p.C + c);
  }
  block_tree_reduce(s, buf, 0, n.t, 1, n.T);
  if (n.t == 0) {
    const float sg = s.g[0];
    const float sgx = s.gx[0] * p.scale_in[c];
    if (split == 0) {
      p.grad_bias[c] = sg;
      p.grad_weight[c] = sgx;
    }
    buf[0] = sg;
    buf[1] = sgx;
  }
  __syncthreads();
  const DxCoef d = dx_coef(p, c, buf[0], buf[1]);
  nc_dx_phase<E>(p, n, cache_x, cache_g, true, d);
}
}  // namespace
}  // namespace resfused
