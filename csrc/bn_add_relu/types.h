// Shapes, plans and kernel arguments of the fused BatchNorm + add + ReLU op: the interface between the
// argument layer (ops.cpp, the CPU runtime's entry points), the planner (plan.h) and the launchers
// (launch.cuh). Plain C++: no CUDA, no ATen.
#pragma once

#include <cstddef>
#include <cstdint>

namespace resfused {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };
enum class Layout : int { kNCHW = 0, kChannelsLast = 1 };
// kAuto: persistent where the occupancy query confirms a co-resident grid, else two-pass.
enum class Scheme : int { kAuto = 0, kTwoPass = 1, kPersistent = 2 };

struct Shape {
  DType dtype;
  Layout layout;
  int64_t n, c, hw;  // (N, C, H*W)
  int device;
};

// What a call will do: chosen scheme and the float workspace it needs (partials, allocated by
// the caller through PyTorch's allocator).
struct Plan {
  Scheme scheme = Scheme::kTwoPass;  // kTwoPass or kPersistent, never kAuto
  int64_t workspace_floats = 0;
  // partition of the reductions: channel tiles x splits of the rows (cl) / groups (nchw), per_block
  // rows or groups per split
  int num_tiles = 0, splits = 0;
  int64_t per_block = 0;
  // persistent launch: grid blocks, per-block dynamic shared memory, per-thread cached groups,
  // per-thread groups in the largest block (iterations)
  int grid = 0, threads = 0;
  size_t smem = 0;
  int cache_iters = 0, iters = 0;
};

struct ForwardTrainArgs {
  const void* x;
  const void* residual;  // nullable
  const float* weight;   // nullable
  const float* bias;     // nullable
  float* running_mean;   // nullable
  float* running_var;    // nullable
  void* y;
  uint8_t* mask;  // nullptr when relu is false
  float* mean;
  float* invstd;
  float* workspace;
  double momentum, eps;
  bool relu;
};

struct ForwardEvalArgs {
  const void* x;
  const void* residual;  // nullable
  const float* weight;   // nullable
  const float* bias;     // nullable
  const float* running_mean;
  const float* running_var;
  void* y;
  uint8_t* mask;  // nullptr unless relu and save_mask
  double eps;
  bool relu;
};

struct BackwardArgs {
  const void* grad_out;
  const void* x;
  const uint8_t* mask;  // read only when relu
  const float* mean;
  const float* invstd;
  const float* weight;  // nullable
  void* grad_input;     // nullptr unless need_input_grad
  void* grad_residual;  // nullptr unless need_residual_grad
  float* grad_weight;   // (C,) always: the per-channel sum of g * xhat (scratch when not asked for)
  float* grad_bias;     // (C,) always: the per-channel sum of g
  float* workspace;
  bool relu, training, need_input_grad, need_residual_grad, need_weight_grad;
};

}  // namespace resfused
