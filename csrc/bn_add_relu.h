// Interface between the registration/argument layer (ops.cpp, which sees torch) and the kernels
// (bn_add_relu.cu, which sees only CUDA and c10's launch-check macro). Keeping ATen out of the .cu
// keeps nvcc's compile time down on small CI machines.
#pragma once

#include <cuda_runtime_api.h>

#include "bn_add_relu/types.h"

namespace resfused {

// Scheme requested by RESFUSED_CUDA_SCHEME (auto | two_pass | persistent); read on every call so
// tests can switch it. Throws (via TORCH_CHECK in ops.cpp) on other values: returns -1 then.
int requested_scheme_from_env();

Plan plan_forward_train(const Shape& s, Scheme requested);
Plan plan_backward(const Shape& s, Scheme requested, bool training, bool need_input_grad, bool need_residual_grad,
                   bool need_weight_grad);
// The planner's cost estimate of running plan on s (plan.h's estimate_cost on this device), microseconds.
double estimated_us(const Shape& s, const Plan& plan, bool backward);

void launch_forward_train(const Shape& s, const Plan& plan, const ForwardTrainArgs& a, cudaStream_t stream);
void launch_forward_eval(const Shape& s, const ForwardEvalArgs& a, cudaStream_t stream);
void launch_backward(const Shape& s, const Plan& plan, const BackwardArgs& a, cudaStream_t stream);

}  // namespace resfused
