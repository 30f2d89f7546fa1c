// The GPU launchers of one element type each (gpu_f32.cu, gpu_f16.cu, gpu_bf16.cu: separate translation
// units, so nvcc builds them in parallel), called by the glue in csrc/bn_add_relu.cu.
#pragma once

#include <cuda_runtime_api.h>

#include "plan.h"
#include "types.h"

namespace resfused {
namespace gpu {

#define RESFUSED_BN_GPU_DECLARE(suffix)                                                                   \
  bool forward_train_##suffix(const Shape& s, const Plan& plan, const ForwardTrainArgs& a, cudaStream_t st); \
  void forward_eval_##suffix(const Shape& s, const ForwardEvalArgs& a, cudaStream_t st);                   \
  bool backward_##suffix(const Shape& s, const Plan& plan, const BackwardArgs& a, cudaStream_t st);         \
  const void* kernel_##suffix(const KernelRef& k);

RESFUSED_BN_GPU_DECLARE(f32)
RESFUSED_BN_GPU_DECLARE(f16)
RESFUSED_BN_GPU_DECLARE(bf16)

#undef RESFUSED_BN_GPU_DECLARE

}  // namespace gpu
}  // namespace resfused
