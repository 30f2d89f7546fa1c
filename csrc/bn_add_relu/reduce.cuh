// Reduction states (Welford/Chan, backward sums), the fixed block tree, compensated sums, FastDiv.
// Part of the fused BatchNorm + add + ReLU kernels (csrc/bn_add_relu.cu has the overview: data model,
// passes over memory, schemes). Device code only: no ATen, compiled by nvcc for the GPU and by the
// host compiler for the CPU SIMT runtime (csrc/sim/, RESFUSED_SIM defined).
#pragma once

#include <cstdint>

#include "elements.cuh"

namespace resfused {
namespace {
// Welford/Chan state of NCH channels sharing one count.
template <int NCH>
struct Welford {
  static constexpr int kFloats = welford_floats(NCH);
  float n, mean[NCH], m2[NCH];

  __device__ __forceinline__ void init() {
    n = 0.f;
#pragma unroll
    for (int j = 0; j < NCH; ++j) mean[j] = m2[j] = 0.f;
  }
  // Chan et al.: exact for n == 0 on this side too (mean and m2 start at 0, f becomes 1).
  __device__ __forceinline__ void merge(const Welford& o) {
    if (o.n == 0.f) return;
    const float nn = n + o.n;
    const float f = o.n / nn;
    const float w = n * f;
#pragma unroll
    for (int j = 0; j < NCH; ++j) {
      const float d = o.mean[j] - mean[j];
      mean[j] += d * f;
      m2[j] += o.m2[j] + d * d * w;
    }
    n = nn;
  }
  __device__ __forceinline__ void store(float* buf, int stride, int slot) const {
    buf[slot] = n;
#pragma unroll
    for (int j = 0; j < NCH; ++j) {
      buf[(1 + j) * stride + slot] = mean[j];
      buf[(1 + NCH + j) * stride + slot] = m2[j];
    }
  }
  __device__ __forceinline__ void load(const float* buf, int stride, int slot) {
    n = buf[slot];
#pragma unroll
    for (int j = 0; j < NCH; ++j) {
      mean[j] = buf[(1 + j) * stride + slot];
      m2[j] = buf[(1 + NCH + j) * stride + slot];
    }
  }
};

// Backward sums of NCH channels: sum of g and sum of g * (x - mean).
template <int NCH>
struct Sums {
  static constexpr int kFloats = sums_floats(NCH);
  float g[NCH], gx[NCH];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int j = 0; j < NCH; ++j) g[j] = gx[j] = 0.f;
  }
  __device__ __forceinline__ void merge(const Sums& o) {
#pragma unroll
    for (int j = 0; j < NCH; ++j) {
      g[j] += o.g[j];
      gx[j] += o.gx[j];
    }
  }
  __device__ __forceinline__ void store(float* buf, int stride, int slot) const {
#pragma unroll
    for (int j = 0; j < NCH; ++j) {
      buf[j * stride + slot] = g[j];
      buf[(NCH + j) * stride + slot] = gx[j];
    }
  }
  __device__ __forceinline__ void load(const float* buf, int stride, int slot) {
#pragma unroll
    for (int j = 0; j < NCH; ++j) {
      g[j] = buf[j * stride + slot];
      gx[j] = buf[(NCH + j) * stride + slot];
    }
  }
};

// Merge the states of threads (tx, 0..TY-1) into thread (tx, 0) along a fixed tree (TY a power of
// two). buf holds S::kFloats * TX * TY/2 floats. Every thread of the block must call it.
template <class S>
__device__ __forceinline__ void block_tree_reduce(S& s, float* buf, int tx, int ty, int TX, int TY) {
  const int stride = TX * (TY >> 1);
  for (int h = TY >> 1; h > 0; h >>= 1) {
    if (ty >= h && ty < 2 * h) s.store(buf, stride, (ty - h) * TX + tx);
    __syncthreads();
    if (ty < h) {
      S o;
      o.load(buf, stride, ty * TX + tx);
      s.merge(o);
    }
    __syncthreads();
  }
}

// Sum of 8 values along a fixed tree.
__device__ __forceinline__ float pairwise_sum(const float (&v)[kGroup]) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// Kahan step: sum + comp tracks the exact sum to about twice the working precision. Needs IEEE
// evaluation order (nvcc does not reassociate without --use_fast_math; FMA contraction is harmless).
__device__ __forceinline__ void kahan_add(float& sum, float& comp, float v) {
  const float y = v - comp;
  const float t = sum + y;
  comp = (t - sum) - y;
  sum = t;
}

// Welford step of one channels_last row: 8 channels share the count.
__device__ __forceinline__ void push_row(Welford<kGroup>& s, const float (&v)[kGroup]) {
  s.n += 1.f;
  const float inv = 1.f / s.n;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    const float d = v[j] - s.mean[j];
    s.mean[j] += d * inv;
    s.m2[j] += d * (v[j] - s.mean[j]);
  }
}

// Chan step of one nchw group: n (1..8) values of one channel (invalid ones are 0).
__device__ __forceinline__ void push_group(Welford<1>& s, const float (&v)[kGroup], int n) {
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) sum += v[j];
  Welford<1> o;
  o.n = static_cast<float>(n);
  o.mean[0] = sum / o.n;
  float m2 = 0.f;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    const float d = v[j] - o.mean[0];
    m2 += j < n ? d * d : 0.f;
  }
  o.m2[0] = m2;
  s.merge(o);
}

// n / d for n, d < 2^31 with a multiply-high and a shift (Granlund-Montgomery, as ATen's IntDivider):
// the nchw kernels turn a group index into (plane, position) per 8 elements, where a hardware integer
// division would cost more instructions than the memory time of the group.
struct FastDiv {
  uint32_t d = 1, m = 0, s = 0;
  FastDiv() = default;
  explicit FastDiv(uint32_t divisor) : d(divisor) {
    for (s = 0; s < 32; ++s)
      if ((1u << s) >= d) break;
    const uint64_t one = 1;
    m = static_cast<uint32_t>(((one << 32) * ((one << s) - d)) / d + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, m) + n) >> s; }
};
}  // namespace
}  // namespace resfused
