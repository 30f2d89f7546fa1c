// nchw thread phases: statistics, apply, backward reduce, dx.
// Part of the fused BatchNorm + add + ReLU kernels (csrc/bn_add_relu.cu has the overview: data model,
// passes over memory, schemes). Device code only: no ATen, compiled by nvcc for the GPU and by the
// host compiler for the CPU SIMT runtime (csrc/sim/, RESFUSED_SIM defined).
#pragma once

#include "params.cuh"

namespace resfused {
namespace {
// ------------------------------------------------------------------------------------------------
// nchw: 1-D blocks; a block owns one channel c and the slice [q0, q1) of its N * gpr groups
// (group q: plane n = q / gpr of the channel, positions 8*(q % gpr) ...)
// ------------------------------------------------------------------------------------------------

struct NcThread {
  int t, T, c, iters;
  int64_t q0;
  __device__ __forceinline__ int slot(int i) const { return i * T + t; }
};

__device__ __forceinline__ NcThread nc_thread(const KParams& p, int c, int split) {
  NcThread n;
  n.t = threadIdx.x;
  n.T = blockDim.x;
  n.c = c;
  n.q0 = static_cast<int64_t>(split) * p.per_block;
  const int64_t q1 = min(p.batch * p.gpr, n.q0 + p.per_block);
  const int64_t mine = q1 - n.q0 - n.t;
  n.iters = mine > 0 ? static_cast<int>((mine + n.T - 1) / n.T) : 0;
  return n;
}

// Location of the thread's i-th group: element offset, mask byte, valid count.
struct NcLoc {
  int64_t off, mask;
  int nv;
};

__device__ __forceinline__ NcLoc nc_loc(const KParams& p, const NcThread& n, int i) {
  const uint32_t q = static_cast<uint32_t>(n.q0 + n.t + static_cast<int64_t>(i) * n.T);
  const uint32_t b = p.gpr_div.div(q);
  const int k = static_cast<int>(q - b * static_cast<uint32_t>(p.gpr));
  const int64_t plane = static_cast<int64_t>(b) * p.C + n.c;
  NcLoc l;
  l.off = plane * p.inner + kGroup * k;
  l.mask = plane * p.gpr + k;
  l.nv = min(kGroup, p.inner - kGroup * k);
  return l;
}

// Location of flat group q of the whole tensor (two-pass elementwise kernels): mask byte = q.
__device__ __forceinline__ NcLoc nc_flat_loc(const KParams& p, int64_t q, int& c) {
  const uint32_t plane32 = p.gpr_div.div(static_cast<uint32_t>(q));
  const int k = static_cast<int>(static_cast<uint32_t>(q) - plane32 * static_cast<uint32_t>(p.gpr));
  c = static_cast<int>(plane32 - p.c_div.div(plane32) * static_cast<uint32_t>(p.C));
  const int64_t plane = plane32;
  NcLoc l;
  l.off = plane * p.inner + kGroup * k;
  l.mask = q;
  l.nv = min(kGroup, p.inner - kGroup * k);
  return l;
}

// Statistics of x - shift (stats_shift) over the thread's groups of channel n.c (optionally caching x); state not
// yet block-reduced.
template <typename E>
__device__ __forceinline__ void nc_stats_phase(const KParams& p, const NcThread& n, Group<typename E::Bits>* cache,
                                               Welford<1>& s) {
  using Bits = typename E::Bits;
  constexpr int U = E::kBatch;
  s.init();
  const float shift = stats_shift<E>(p, n.c);
  const Bits* x = static_cast<const Bits*>(p.x);
  for (int i0 = 0; i0 < n.iters; i0 += U) {
    Group<Bits> v[U];
    int nv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (i0 + u < n.iters) {
        const NcLoc l = nc_loc(p, n, i0 + u);
        nv[u] = l.nv;
        load_group(v[u], x + l.off, l.nv);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + u;
      if (i < n.iters) {
        if (i < p.cache_iters) cache[n.slot(i)] = v[u];
        float f[kGroup];
#pragma unroll
        for (int j = 0; j < kGroup; ++j) f[j] = j < nv[u] ? E::to_float(v[u].v[j]) - shift : 0.f;
        push_group(s, f, nv[u]);
      }
    }
  }
}

template <typename E>
__device__ __forceinline__ void nc_apply_phase(const KParams& p, const NcThread& n,
                                               const Group<typename E::Bits>* cache, bool reverse, float mean,
                                               float scale, float shift) {
  using Bits = typename E::Bits;
  constexpr int U = E::kBatch;
  const Bits* x = static_cast<const Bits*>(p.x);
  const Bits* res = static_cast<const Bits*>(p.res);
  Bits* y = static_cast<Bits*>(p.y);
  for (int j0 = 0; j0 < n.iters; j0 += U) {
    Group<Bits> xv[U], rv[U];
    NcLoc l[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      if (j < n.iters) {
        const int i = reverse ? n.iters - 1 - j : j;
        l[u] = nc_loc(p, n, i);
        if (i < p.cache_iters)
          xv[u] = cache[n.slot(i)];
        else
          load_group(xv[u], x + l[u].off, l[u].nv);
        if (p.has_res) load_group(rv[u], res + l[u].off, l[u].nv);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (j0 + u < n.iters) {
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
}

template <typename E>
__device__ __forceinline__ void nc_bwd_reduce_phase(const KParams& p, const NcThread& n,
                                                    Group<typename E::Bits>* cache_x,
                                                    Group<typename E::Bits>* cache_g, Sums<1>& s) {
  using Bits = typename E::Bits;
  constexpr int U = E::kBatch;
  s.init();
  const Bits* dy = static_cast<const Bits*>(p.dy);
  const Bits* x = static_cast<const Bits*>(p.x);
  Bits* dres = static_cast<Bits*>(p.dres);
  Bits* dx = static_cast<Bits*>(p.dx);
  const float mean = p.mean_in[n.c];
  const float kdx = (p.weight != nullptr ? p.weight[n.c] : 1.f) * p.scale_in[n.c];
  // a thread sums up to thousands of elements of one channel: pairwise within a group, compensated
  // (Kahan) across groups, so the sums stay as accurate as a tree reduction
  float comp_g = 0.f, comp_gx = 0.f;
  for (int i0 = 0; i0 < n.iters; i0 += U) {
    Group<Bits> gv[U], xv[U];
    uint32_t bits[U];
    NcLoc l[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (i0 + u < n.iters) {
        l[u] = nc_loc(p, n, i0 + u);
        load_group(gv[u], dy + l[u].off, l[u].nv);
        bits[u] = p.relu ? static_cast<uint32_t>(p.mask_in[l[u].mask]) : 0xffu;
        if (p.do_sums) load_group(xv[u], x + l[u].off, l[u].nv);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + u;
      if (i < n.iters) {
        const Group<Bits> g = masked(gv[u], bits[u]);
        if (p.write_dres) store_group(dres + l[u].off, g, l[u].nv);
        if (i < p.cache_iters) {
          cache_g[n.slot(i)] = g;
          cache_x[n.slot(i)] = xv[u];
        }
        if (p.write_dx) {
          Group<Bits> o;
#pragma unroll
          for (int e = 0; e < kGroup; ++e) o.v[e] = E::from_float(kdx * E::to_float(g.v[e]));
          store_group(dx + l[u].off, o, l[u].nv);
        }
        if (p.do_sums) {  // padding elements are +0 in g: they add nothing
          float gs[kGroup], gxs[kGroup];
#pragma unroll
          for (int e = 0; e < kGroup; ++e) {
            gs[e] = E::to_float(g.v[e]);
            gxs[e] = gs[e] * (E::to_float(xv[u].v[e]) - mean);
          }
          kahan_add(s.g[0], comp_g, pairwise_sum(gs));
          kahan_add(s.gx[0], comp_gx, pairwise_sum(gxs));
        }
      }
    }
  }
  s.g[0] -= comp_g;
  s.gx[0] -= comp_gx;
}

template <typename E>
__device__ __forceinline__ void nc_dx_phase(const KParams& p, const NcThread& n, const Group<typename E::Bits>* cache_x,
                                            const Group<typename E::Bits>* cache_g, bool reverse, const DxCoef& d) {
  using Bits = typename E::Bits;
  constexpr int U = E::kBatch;
  const Bits* gsrc = static_cast<const Bits*>(p.dres_is_g ? p.dres : p.dy);
  const Bits* x = static_cast<const Bits*>(p.x);
  Bits* dx = static_cast<Bits*>(p.dx);
  for (int j0 = 0; j0 < n.iters; j0 += U) {
    Group<Bits> gv[U], xv[U];
    NcLoc l[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      if (j < n.iters) {
        const int i = reverse ? n.iters - 1 - j : j;
        l[u] = nc_loc(p, n, i);
        if (i < p.cache_iters) {
          gv[u] = cache_g[n.slot(i)];
          xv[u] = cache_x[n.slot(i)];
        } else {
          load_group(gv[u], gsrc + l[u].off, l[u].nv);
          if (!p.dres_is_g && p.relu) gv[u] = masked(gv[u], static_cast<uint32_t>(p.mask_in[l[u].mask]));
          load_group(xv[u], x + l[u].off, l[u].nv);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (j0 + u < n.iters) {
        Group<Bits> o;
#pragma unroll
        for (int e = 0; e < kGroup; ++e)
          o.v[e] = E::from_float(dx_value(d, E::to_float(gv[u].v[e]), E::to_float(xv[u].v[e])));
        store_group(dx + l[u].off, o, l[u].nv);
      }
    }
  }
}
}  // namespace
}  // namespace resfused
