// channels_last thread phases: statistics, apply, backward reduce, dx.
// Part of the fused BatchNorm + add + ReLU kernels (csrc/bn_add_relu.cu has the overview: data model,
// passes over memory, schemes). Device code only: no ATen, compiled by nvcc for the GPU and by the
// host compiler for the CPU SIMT runtime (csrc/sim/, RESFUSED_SIM defined).
#pragma once

#include "params.cuh"

namespace resfused {
namespace {
// ------------------------------------------------------------------------------------------------
// channels_last: blocks of (TX, TY) threads; a thread owns one 8-channel group k of a channel tile
// and walks rows row0 + ty + i*TY of its block's slice [row0, row1)
// ------------------------------------------------------------------------------------------------

struct ClThread {
  int tx, ty, TX, TY, k, nv, iters;
  bool active;
  int64_t row0;
  __device__ __forceinline__ int64_t offset(const KParams& p, int i) const {
    return (row0 + ty + static_cast<int64_t>(i) * TY) * p.inner + kGroup * k;
  }
  __device__ __forceinline__ int64_t mask_index(const KParams& p, int i) const {
    return (row0 + ty + static_cast<int64_t>(i) * TY) * p.gpr + k;
  }
  __device__ __forceinline__ int slot(int i) const { return (i * TY + ty) * TX + tx; }
  // per-channel parameters in shared memory, [fields][8][TX]: field f of channel 8k + j
  __device__ __forceinline__ float prm(const float* s, int f, int j) const { return s[(f * kGroup + j) * TX + tx]; }
  __device__ __forceinline__ void set_prm(float* s, int f, int j, float v) const { s[(f * kGroup + j) * TX + tx] = v; }
};

__device__ __forceinline__ ClThread cl_thread(const KParams& p, int tile, int split) {
  ClThread t;
  t.tx = threadIdx.x;
  t.ty = threadIdx.y;
  t.TX = blockDim.x;
  t.TY = blockDim.y;
  t.k = tile * t.TX + t.tx;
  t.active = t.k < p.gpr;
  t.nv = min(kGroup, p.inner - kGroup * t.k);
  t.row0 = static_cast<int64_t>(split) * p.per_block;
  const int64_t row1 = min(p.outer, t.row0 + p.per_block);
  const int64_t mine = row1 - t.row0 - t.ty;
  t.iters = mine > 0 ? static_cast<int>((mine + t.TY - 1) / t.TY) : 0;
  return t;
}

// Statistics of x - shift (stats_shift) over the thread's rows (optionally caching x); state not yet
// block-reduced.
template <typename E>
__device__ __forceinline__ void cl_stats_phase(const KParams& p, const ClThread& t, Group<typename E::Bits>* cache,
                                               Welford<kGroup>& s) {
  using Bits = typename E::Bits;
  constexpr int U = E::kBatch;
  s.init();
  if (!t.active) return;
  float shift[kGroup];
#pragma unroll
  for (int j = 0; j < kGroup; ++j) shift[j] = j < t.nv ? stats_shift<E>(p, kGroup * t.k + j) : 0.f;
  const Bits* x = static_cast<const Bits*>(p.x);
  for (int i0 = 0; i0 < t.iters; i0 += U) {
    Group<Bits> v[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (i0 + u < t.iters) load_group(v[u], x + t.offset(p, i0 + u), t.nv);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + u;
      if (i < t.iters) {
        if (i < p.cache_iters) cache[t.slot(i)] = v[u];
        float f[kGroup];
#pragma unroll
        for (int j = 0; j < kGroup; ++j) f[j] = E::to_float(v[u].v[j]) - shift[j];
        push_row(s, f);
      }
    }
  }
}

// ty == 0 threads write the block's partials (tile channels of split r; means of x - shift).
__device__ __forceinline__ void cl_write_welford_partial(const KParams& p, const ClThread& t, int tile, int split,
                                                         const Welford<kGroup>& s) {
  if (t.ty != 0 || !t.active) return;
  const int64_t base = static_cast<int64_t>(split) * p.C + kGroup * t.k;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    if (j < t.nv) {
      p.pa[base + j] = s.mean[j];
      p.pb[base + j] = s.m2[j];
    }
  }
  if (tile == 0 && t.tx == 0) p.pn[split] = s.n;
}

__device__ __forceinline__ void cl_write_sums_partial(const KParams& p, const ClThread& t, int split,
                                                      const Sums<kGroup>& s) {
  if (t.ty != 0 || !t.active) return;
  const int64_t base = static_cast<int64_t>(split) * p.C + kGroup * t.k;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    if (j < t.nv) {
      p.pa[base + j] = s.g[j];
      p.pb[base + j] = s.gx[j];
    }
  }
}

// Apply phase: y = relu((x - mean) * scale + shift + residual) over the thread's rows, x from the
// cache for i < cache_iters; reverse walks the rows last-to-first.
template <typename E>
__device__ __forceinline__ void cl_apply_phase(const KParams& p, const ClThread& t,
                                               const Group<typename E::Bits>* cache, bool reverse, const float* prm) {
  using Bits = typename E::Bits;
  constexpr int U = E::kBatch;
  if (!t.active) return;
  const Bits* x = static_cast<const Bits*>(p.x);
  const Bits* res = static_cast<const Bits*>(p.res);
  Bits* y = static_cast<Bits*>(p.y);
  const uint32_t valid = valid_bits(t.nv);
  for (int j0 = 0; j0 < t.iters; j0 += U) {
    Group<Bits> xv[U], rv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      if (j < t.iters) {
        const int i = reverse ? t.iters - 1 - j : j;
        const int64_t off = t.offset(p, i);
        if (i < p.cache_iters)
          xv[u] = cache[t.slot(i)];
        else
          load_group(xv[u], x + off, t.nv);
        if (p.has_res) load_group(rv[u], res + off, t.nv);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      if (j < t.iters) {
        const int i = reverse ? t.iters - 1 - j : j;
        Group<Bits> out;
        const uint32_t bits = apply_group<E>(p, xv[u], rv[u], [&](int e, float& m, float& sc, float& sh) {
          m = t.prm(prm, 0, e);
          sc = t.prm(prm, 1, e);
          sh = t.prm(prm, 2, e);
        }, out);
        store_group(y + t.offset(p, i), out, t.nv);
        if (p.mask_out != nullptr) p.mask_out[t.mask_index(p, i)] = static_cast<uint8_t>(bits & valid);
      }
    }
  }
}

// Threads of row 0 fill the block's shared apply parameters; the caller synchronizes.
__device__ __forceinline__ void cl_store_apply_params(const KParams& p, const ClThread& t, float* prm) {
  if (t.ty != 0 || !t.active) return;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    float mean = 0.f, scale = 0.f, shift = 0.f;
    if (j < t.nv) apply_params(p, kGroup * t.k + j, mean, scale, shift);
    t.set_prm(prm, 0, j, mean);
    t.set_prm(prm, 1, j, scale);
    t.set_prm(prm, 2, j, shift);
  }
}

__device__ __forceinline__ void cl_store_reduce_params(const KParams& p, const ClThread& t, float* prm) {
  if (t.ty != 0 || !t.active) return;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    const int c = kGroup * t.k + j;
    const bool ok = j < t.nv;
    t.set_prm(prm, 0, j, ok ? p.mean_in[c] : 0.f);
    t.set_prm(prm, 1, j, ok ? (p.weight != nullptr ? p.weight[c] : 1.f) * p.scale_in[c] : 0.f);
  }
}

__device__ __forceinline__ void cl_store_dx_params(const ClThread& t, float* prm, const DxCoef& d, int j) {
  t.set_prm(prm, 0, j, d.mean);
  t.set_prm(prm, 1, j, d.invstd);
  t.set_prm(prm, 2, j, d.k);
  t.set_prm(prm, 3, j, d.a);
  t.set_prm(prm, 4, j, d.b);
}

__device__ __forceinline__ DxCoef cl_dx_params(const ClThread& t, const float* prm, int j) {
  DxCoef d;
  d.mean = t.prm(prm, 0, j);
  d.invstd = t.prm(prm, 1, j);
  d.k = t.prm(prm, 2, j);
  d.a = t.prm(prm, 3, j);
  d.b = t.prm(prm, 4, j);
  return d;
}

// Backward reduce phase over the thread's rows: g = dy * mask; optionally writes g (residual's
// gradient) and, in eval, dx = k * g; accumulates the sums; optionally caches x and g.
template <typename E>
__device__ __forceinline__ void cl_bwd_reduce_phase(const KParams& p, const ClThread& t,
                                                    Group<typename E::Bits>* cache_x,
                                                    Group<typename E::Bits>* cache_g, const float* prm,
                                                    Sums<kGroup>& s) {
  using Bits = typename E::Bits;
  constexpr int U = E::kBatch;
  s.init();
  if (!t.active) return;
  const Bits* dy = static_cast<const Bits*>(p.dy);
  const Bits* x = static_cast<const Bits*>(p.x);
  Bits* dres = static_cast<Bits*>(p.dres);
  Bits* dx = static_cast<Bits*>(p.dx);
  for (int i0 = 0; i0 < t.iters; i0 += U) {
    Group<Bits> gv[U], xv[U];
    uint32_t bits[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + u;
      if (i < t.iters) {
        const int64_t off = t.offset(p, i);
        load_group(gv[u], dy + off, t.nv);
        bits[u] = p.relu ? static_cast<uint32_t>(p.mask_in[t.mask_index(p, i)]) : 0xffu;
        if (p.do_sums) load_group(xv[u], x + off, t.nv);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + u;
      if (i < t.iters) {
        const int64_t off = t.offset(p, i);
        const Group<Bits> g = masked(gv[u], bits[u]);
        if (p.write_dres) store_group(dres + off, g, t.nv);
        if (i < p.cache_iters) {
          cache_g[t.slot(i)] = g;
          cache_x[t.slot(i)] = xv[u];
        }
        if (p.write_dx) {
          Group<Bits> o;
#pragma unroll
          for (int e = 0; e < kGroup; ++e) o.v[e] = E::from_float(t.prm(prm, 1, e) * E::to_float(g.v[e]));
          store_group(dx + off, o, t.nv);
        }
        if (p.do_sums) {
#pragma unroll
          for (int e = 0; e < kGroup; ++e) {
            const float gf = E::to_float(g.v[e]);
            s.g[e] += gf;
            s.gx[e] += gf * (E::to_float(xv[u].v[e]) - t.prm(prm, 0, e));
          }
        }
      }
    }
  }
}

// Training dx over the thread's rows: g and x from the caches for i < cache_iters, else g from the
// residual's gradient (when written) or dy and the mask, x from memory.
template <typename E>
__device__ __forceinline__ void cl_dx_phase(const KParams& p, const ClThread& t, const Group<typename E::Bits>* cache_x,
                                            const Group<typename E::Bits>* cache_g, bool reverse,
                                            const float* prm) {
  using Bits = typename E::Bits;
  constexpr int U = E::kBatch;
  if (!t.active) return;
  const Bits* gsrc = static_cast<const Bits*>(p.dres_is_g ? p.dres : p.dy);
  const Bits* x = static_cast<const Bits*>(p.x);
  Bits* dx = static_cast<Bits*>(p.dx);
  for (int j0 = 0; j0 < t.iters; j0 += U) {
    Group<Bits> gv[U], xv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      if (j < t.iters) {
        const int i = reverse ? t.iters - 1 - j : j;
        if (i < p.cache_iters) {
          gv[u] = cache_g[t.slot(i)];
          xv[u] = cache_x[t.slot(i)];
        } else {
          const int64_t off = t.offset(p, i);
          load_group(gv[u], gsrc + off, t.nv);
          if (!p.dres_is_g && p.relu)
            gv[u] = masked(gv[u], static_cast<uint32_t>(p.mask_in[t.mask_index(p, i)]));
          load_group(xv[u], x + off, t.nv);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      if (j < t.iters) {
        const int i = reverse ? t.iters - 1 - j : j;
        Group<Bits> o;
#pragma unroll
        for (int e = 0; e < kGroup; ++e)
          o.v[e] = E::from_float(dx_value(cl_dx_params(t, prm, e), E::to_float(gv[u].v[e]),
                                          E::to_float(xv[u].v[e])));
        store_group(dx + t.offset(p, i), o, t.nv);
      }
    }
  }
}
}  // namespace
}  // namespace resfused
