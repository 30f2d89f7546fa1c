// Body of gpu_f32.cu / gpu_f16.cu / gpu_bf16.cu: the launch sequences of launch.cuh over the CUDA
// runtime for one element type (RESFUSED_BN_ELEMENT, RESFUSED_BN_SUFFIX).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#define RESFUSED_CHECK(cond, msg) TORCH_CHECK(cond, msg)

#include "gpu.h"
#include "launch.cuh"
#include "launch_refusal.h"

namespace resfused {
namespace {

struct GpuLauncher {
  cudaStream_t stream;

  void launch(Kernel k, Dims grid, Dims block, size_t smem, const KParams& p) {
    KParams copy = p;
    void* args[] = {&copy};
    C10_CUDA_CHECK(cudaLaunchKernel(reinterpret_cast<const void*>(k), dim3(grid.x, grid.y, grid.z),
                                    dim3(block.x, block.y, block.z), args, smem, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  bool launch_cooperative(Kernel k, Dims grid, Dims block, size_t smem, const KParams& p) {
    KParams copy = p;
    void* args[] = {&copy};
    const cudaError_t err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(k), dim3(grid.x, grid.y, grid.z),
                                                        dim3(block.x, block.y, block.z), args, smem, stream);
    if (cooperative_launch_refused(err)) {  // nothing ran: the caller falls back to two-pass and remembers
      (void)cudaGetLastError();
      if (err != cudaErrorCooperativeLaunchTooLarge) {
        TORCH_WARN_ONCE("resfused_cuda: a cooperative BN launch was refused (", cudaGetErrorString(err),
                        "); this shape runs two-pass from now on");
      }
      return false;
    }
    C10_CUDA_CHECK(err);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
};

}  // namespace

namespace gpu {

#define RESFUSED_BN_GPU_DEFINE(E, suffix)                                                                    \
  bool forward_train_##suffix(const Shape& s, const Plan& plan, const ForwardTrainArgs& a, cudaStream_t st) { \
    GpuLauncher l{st};                                                                                      \
    return forward_train_impl<E>(l, s, plan, a);                                                            \
  }                                                                                                         \
  void forward_eval_##suffix(const Shape& s, const ForwardEvalArgs& a, cudaStream_t st) {                   \
    GpuLauncher l{st};                                                                                      \
    forward_eval_impl<E>(l, s, a);                                                                          \
  }                                                                                                         \
  bool backward_##suffix(const Shape& s, const Plan& plan, const BackwardArgs& a, cudaStream_t st) {         \
    GpuLauncher l{st};                                                                                      \
    return backward_impl<E>(l, s, plan, a);                                                                 \
  }                                                                                                         \
  const void* kernel_##suffix(const KernelRef& k) { return reinterpret_cast<const void*>(planned_kernel<E>(k)); }

#define RESFUSED_BN_GPU_DEFINE_EXPANDED(E, suffix) RESFUSED_BN_GPU_DEFINE(E, suffix)
RESFUSED_BN_GPU_DEFINE_EXPANDED(RESFUSED_BN_ELEMENT, RESFUSED_BN_SUFFIX)

}  // namespace gpu
}  // namespace resfused
