// What the device code needs from CUDA, from the toolkit (nvcc) or from the CPU SIMT runtime
// (RESFUSED_SIM: csrc/sim/cuda_sim.h, a test tool). Two spellings differ between the two:
//   RESFUSED_SHARED(T, name, count)  a block-scope static shared array (the runtime gives each block its own)
//   dynamic_smem()                   the 16-byte aligned dynamic shared memory of the block
#pragma once

#ifdef RESFUSED_SIM
#include "../sim/cuda_sim.h"
#define RESFUSED_SHARED(T, name, count) T* const name = ::resfused_sim::static_shared<T>((count), __LINE__)
#else
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define RESFUSED_SHARED(T, name, count) __shared__ T name[(count)]
#endif

namespace cg = cooperative_groups;

namespace resfused {
namespace {

#ifdef RESFUSED_SIM
inline float4* dynamic_smem() { return static_cast<float4*>(::resfused_sim::dynamic_shared()); }
#else
__device__ __forceinline__ float4* dynamic_smem() {
  extern __shared__ float4 resfused_dyn_smem[];
  return resfused_dyn_smem;
}
#endif

}  // namespace
}  // namespace resfused
