// Kernel parameters (one struct for every kernel) and the per-channel helpers shared by the kernels.
// Part of the fused BatchNorm + add + ReLU kernels (csrc/bn_add_relu.cu has the overview: data model,
// passes over memory, schemes). Device code only: no ATen, compiled by nvcc for the GPU and by the
// host compiler for the CPU SIMT runtime (csrc/sim/, RESFUSED_SIM defined).
#pragma once

#include <cstdint>

#include "reduce.cuh"

namespace resfused {
namespace {
struct KParams {
  // elementwise tensors, in the dtype of the kernel's element type
  const void* x;
  const void* res;
  void* y;
  const void* dy;
  void* dx;
  void* dres;
  uint8_t* mask_out;
  const uint8_t* mask_in;
  // per-channel fp32 vectors
  const float* weight;
  const float* bias;
  const float* mean_in;   // apply: mean; backward: saved mean
  const float* scale_in;  // apply: invstd, or running_var when is_var; backward: saved invstd
  float* mean_out;
  float* invstd_out;
  float* running_mean;
  float* running_var;
  float* grad_weight;
  float* grad_bias;
  // partials [splits][C], [splits][C], [splits]
  float* pa;
  float* pb;
  float* pn;
  // geometry
  int64_t outer;      // rows: N*H*W (cl) or planes: N*C (nchw)
  int64_t batch;      // N (planes per channel, nchw)
  int64_t M;          // elements per channel
  int64_t per_block;  // rows (cl) or groups (nchw) of one block's slice
  int inner;          // C (cl) or H*W (nchw)
  int64_t chan_stride;  // elements from one channel's first element to the next's: 1 (cl) or H*W (nchw)
  int gpr;            // groups per row: ceil(inner / 8)
  int C;
  FastDiv gpr_div, c_div;  // nchw: divide by gpr and by C
  int num_tiles;  // channel tiles (cl) or C (nchw)
  int splits;     // blocks along the rows of one channel tile
  int cache_iters;
  int tree_floats;  // persistent kernels: floats of the reduction tree (per-channel parameters follow)
  // scalars
  float eps, momentum, keep, unbias, count;  // keep = 1 - momentum; unbias = M / max(M-1, 1); count = M
  bool relu, has_res, is_var, write_dres, write_dx, do_sums, dres_is_g;
};

// ---- per-channel helpers shared by the finalize kernels and the persistent merges

// Write mean/invstd and update the running stats of channel c from its merged (mean of x - shift, m2).
__device__ __forceinline__ void finish_stats(const KParams& p, int c, float mean, float shift, float m2,
                                             float& mean_o, float& invstd_o, bool write) {
  const float m = p.M > 0 ? mean + shift : quiet_nan();
  const float var = m2 / p.count;  // 0/0 = NaN for an empty batch, like the reference
  const float invstd = rsqrtf(var + p.eps);
  mean_o = m;
  invstd_o = invstd;
  if (!write) return;
  p.mean_out[c] = m;
  p.invstd_out[c] = invstd;
  if (p.running_mean != nullptr) p.running_mean[c] = p.running_mean[c] * p.keep + p.momentum * m;
  if (p.running_var != nullptr) p.running_var[c] = p.running_var[c] * p.keep + p.momentum * (var * p.unbias);
}

// The statistics' shift of channel c: its first element (sample 0, pixel 0; 0 for an empty batch). The Welford
// states accumulate x - shift, so their means stay within the spread of the data, where fp32 rounding is small;
// a mean kept near |mean| >> std is rounded at every update (inputs around 1e4 with unit spread ended 1.3 ulp of
// 1e4 off, stock within half of one; and partial means near 1e4 made the Chan merges' (mean_b - mean_a)^2 terms
// noise: tests/test_cuda_sim.py test_large_mean). Partials and merges stay shifted; finish_stats adds the shift
// back once. One load per channel and block (every block of a channel reads the same element).
template <typename E>
__device__ __forceinline__ float stats_shift(const KParams& p, int c) {
  if (p.M == 0) return 0.f;
  const typename E::Bits* x = static_cast<const typename E::Bits*>(p.x);
  return E::to_float(x[static_cast<int64_t>(c) * p.chan_stride]);
}

__device__ __forceinline__ void apply_params(const KParams& p, int c, float& mean, float& scale, float& shift) {
  mean = p.mean_in[c];
  const float inv = p.is_var ? rsqrtf(p.scale_in[c] + p.eps) : p.scale_in[c];
  const float w = p.weight != nullptr ? p.weight[c] : 1.f;
  scale = w * inv;
  shift = p.bias != nullptr ? p.bias[c] : 0.f;
}

// Backward per-channel coefficients from the channel sums: dx = k * ((g - a) - (x - mean) * invstd * b)
// (training), dx = k * g (eval).
struct DxCoef {
  float mean, invstd, k, a, b;
};

__device__ __forceinline__ DxCoef dx_coef(const KParams& p, int c, float sum_g, float sum_gxhat) {
  DxCoef d;
  d.mean = p.mean_in[c];
  d.invstd = p.scale_in[c];
  d.k = (p.weight != nullptr ? p.weight[c] : 1.f) * d.invstd;
  d.a = sum_g / p.count;
  d.b = sum_gxhat / p.count;
  return d;
}

__device__ __forceinline__ float dx_value(const DxCoef& d, float g, float x) {
  const float xhat = (x - d.mean) * d.invstd;
  return d.k * ((g - d.a) - xhat * d.b);
}

__device__ __forceinline__ float act(float x, float r, float mean, float scale, float shift, bool has_res) {
  const float v = (x - mean) * scale + shift;
  return has_res ? v + r : v;
}

// One group of the apply: out = relu?(act(x, r)) per element, with element e's (mean, scale, shift) from
// prm(e, mean, scale, shift). Returns the ReLU mask bits (bit e: element e kept; all zero without ReLU).
template <typename E, typename Prm>
__device__ __forceinline__ uint32_t apply_group(const KParams& p, const Group<typename E::Bits>& x,
                                                const Group<typename E::Bits>& r, Prm prm,
                                                Group<typename E::Bits>& out) {
  uint32_t bits = 0;
#pragma unroll
  for (int e = 0; e < kGroup; ++e) {
    float mean, scale, shift;
    prm(e, mean, scale, shift);
    float v = act(E::to_float(x.v[e]), p.has_res ? E::to_float(r.v[e]) : 0.f, mean, scale, shift, p.has_res);
    if (p.relu) {
      const bool pos = v > 0.f;
      bits |= static_cast<uint32_t>(pos) << e;
      v = pos ? v : 0.f;
    }
    out.v[e] = E::from_float(v);
  }
  return bits;
}
}  // namespace
}  // namespace resfused
