// The device-side spelling of CUDA for the CPU SIMT runtime (a test tool, never a backend that `auto`
// picks): the kernels of csrc/bn_add_relu/*.cuh compile against this header with the host C++ compiler
// when RESFUSED_SIM is defined. Each CUDA thread runs as a fiber (runtime.cpp); threadIdx/blockIdx read
// the running fiber's state; __syncthreads and grid.sync() are barriers of the scheduler; shared memory
// is private to each block. The half and bfloat16 conversions round to nearest even, as the hardware's.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)

namespace resfused_sim {

struct Index3 {
  unsigned x, y, z;
};

// What a CUDA thread sees of itself; lives at the base of its fiber's stack allocation.
struct ThreadState {
  Index3 thread_idx, block_idx, block_dim, grid_dim;
};

extern ThreadState* g_current;  // the running CUDA thread

void syncthreads(const char* file, int line);
void grid_sync(const char* file, int line);
void* dynamic_shared();
void* static_shared_bytes(size_t bytes, int site);
template <class T>
T* static_shared(size_t count, int site) {
  return static_cast<T*>(static_shared_bytes(count * sizeof(T), site));
}

}  // namespace resfused_sim

#define threadIdx (::resfused_sim::g_current->thread_idx)
#define blockIdx (::resfused_sim::g_current->block_idx)
#define blockDim (::resfused_sim::g_current->block_dim)
#define gridDim (::resfused_sim::g_current->grid_dim)
#define __syncthreads() ::resfused_sim::syncthreads(__FILE__, __LINE__)

inline void __threadfence() {}

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};

using std::max;
using std::min;

inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __int_as_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline uint32_t __umulhi(uint32_t a, uint32_t b) { return static_cast<uint32_t>((uint64_t{a} * b) >> 32); }
// The GPU's rsqrtf is an approximation (2 ulp); the correctly rounded value stands in for it.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
template <class T>
inline T __ldcg(const T* p) {
  return *p;
}

struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};

inline __half __ushort_as_half(uint16_t b) { return __half{b}; }
inline uint16_t __half_as_ushort(__half h) { return h.x; }
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.x & 0x8000u) << 16;
  const uint32_t e = (h.x >> 10) & 0x1fu, m = h.x & 0x3ffu;
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact in fp32
    const float v = static_cast<float>(m) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13));
  return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

inline __half __float2half_rn(float f) {
  uint32_t x = __float_as_uint(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return __half{0x7fff};  // NaN, as the hardware's canonical one
  if (x >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to infinity
  if (x < 0x38800000u) {  // below 2^-14: subnormal half, round(|f| * 2^24) to nearest even (exact scaling)
    const float a = __uint_as_float(x) * 16777216.0f;
    return __half{static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(a)))};
  }
  uint32_t h = ((((x >> 23) - 127u + 15u) << 10) | ((x & 0x7fffffu) >> 13));
  const uint32_t rem = x & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return __half{static_cast<uint16_t>(sign | h)};
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = __float_as_uint(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fff};
  return __nv_bfloat16{static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};
}

namespace cooperative_groups {
struct grid_group {
  void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
    ::resfused_sim::grid_sync(file, line);
  }
};
inline grid_group this_grid() { return grid_group{}; }
}  // namespace cooperative_groups
