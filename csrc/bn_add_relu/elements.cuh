// Element types (storage bits <-> fp32), 8-element groups, vector loads and stores, mask helpers.
// Part of the fused BatchNorm + add + ReLU kernels (csrc/bn_add_relu.cu has the overview: data model,
// passes over memory, schemes). Device code only: no ATen, compiled by nvcc for the GPU and by the
// host compiler for the CPU SIMT runtime (csrc/sim/, RESFUSED_SIM defined).
#pragma once

#include <cstdint>

#include "config.h"
#include "cuda_compat.cuh"

namespace resfused {
namespace {
struct F32 {
  using Bits = uint32_t;
  static constexpr int kBatch = kBatchF32;  // groups in flight per thread (config.h)
  static __device__ __forceinline__ float to_float(Bits b) { return __uint_as_float(b); }
  static __device__ __forceinline__ Bits from_float(float v) { return __float_as_uint(v); }
};

struct F16 {
  using Bits = uint16_t;
  static constexpr int kBatch = kBatch16;
  static __device__ __forceinline__ float to_float(Bits b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ Bits from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

struct BF16 {
  using Bits = uint16_t;
  static constexpr int kBatch = kBatch16;
  static __device__ __forceinline__ float to_float(Bits b) { return __uint_as_float(static_cast<uint32_t>(b) << 16); }
  static __device__ __forceinline__ Bits from_float(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

template <typename Bits>
struct alignas(16) Group {
  Bits v[kGroup];
};

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fffffff); }

// Load the n (1..8) valid elements of a group at p; elements past n read as +0.
template <typename Bits>
__device__ __forceinline__ void load_group(Group<Bits>& g, const Bits* p, int n) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (n == kGroup && (a & 15u) == 0) {
#pragma unroll
    for (int i = 0; i < int(sizeof(Group<Bits>) / 16); ++i)
      reinterpret_cast<uint4*>(g.v)[i] = reinterpret_cast<const uint4*>(p)[i];
  } else if (n == kGroup && (a & 7u) == 0) {
#pragma unroll
    for (int i = 0; i < int(sizeof(Group<Bits>) / 8); ++i)
      reinterpret_cast<uint2*>(g.v)[i] = reinterpret_cast<const uint2*>(p)[i];
  } else if (n == kGroup && (a & 3u) == 0) {
#pragma unroll
    for (int i = 0; i < int(sizeof(Group<Bits>) / 4); ++i)
      reinterpret_cast<uint32_t*>(g.v)[i] = reinterpret_cast<const uint32_t*>(p)[i];
  } else {
#pragma unroll
    for (int j = 0; j < kGroup; ++j) g.v[j] = j < n ? p[j] : Bits(0);
  }
}

// Store the n (1..8) valid elements of a group at p.
template <typename Bits>
__device__ __forceinline__ void store_group(Bits* p, const Group<Bits>& g, int n) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (n == kGroup && (a & 15u) == 0) {
#pragma unroll
    for (int i = 0; i < int(sizeof(Group<Bits>) / 16); ++i)
      reinterpret_cast<uint4*>(p)[i] = reinterpret_cast<const uint4*>(g.v)[i];
  } else if (n == kGroup && (a & 7u) == 0) {
#pragma unroll
    for (int i = 0; i < int(sizeof(Group<Bits>) / 8); ++i)
      reinterpret_cast<uint2*>(p)[i] = reinterpret_cast<const uint2*>(g.v)[i];
  } else if (n == kGroup && (a & 3u) == 0) {
#pragma unroll
    for (int i = 0; i < int(sizeof(Group<Bits>) / 4); ++i)
      reinterpret_cast<uint32_t*>(p)[i] = reinterpret_cast<const uint32_t*>(g.v)[i];
  } else {
#pragma unroll
    for (int j = 0; j < kGroup; ++j)
      if (j < n) p[j] = g.v[j];
  }
}

// g = dy where the mask bit is set, else +0 (exactly the reference's torch.where(mask, dy, 0)).
template <typename Bits>
__device__ __forceinline__ Group<Bits> masked(const Group<Bits>& dy, uint32_t bits) {
  Group<Bits> g;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) g.v[j] = ((bits >> j) & 1u) ? dy.v[j] : Bits(0);
  return g;
}

__device__ __forceinline__ uint32_t valid_bits(int n) { return (1u << n) - 1u; }
}  // namespace
}  // namespace resfused
