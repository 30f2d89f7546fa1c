// The fused cuDNN conv_bn forward's batch statistics from its epilogue's fp32 per-channel sums (csrc/conv_bn.cpp);
// see csrc/conv_bn_stats.cu.
#pragma once

#include <ATen/ATen.h>

#include <utility>

namespace resfused {
namespace conv_bn_cudnn {

// (mean, biased variance), fp32 (K,), of y (N, K, P, Q) given sum and sqsum, y's fp32 per-channel sums of
// values and of squares.
std::pair<at::Tensor, at::Tensor> finalize_stats(const at::Tensor& y, const at::Tensor& sum, const at::Tensor& sqsum);

}  // namespace conv_bn_cudnn
}  // namespace resfused
