// Batch statistics of the fused cuDNN conv_bn forward (csrc/conv_bn.cpp), from the fp32 per-channel sum and sum of
// squares that cuDNN's genstats epilogue produces.
//
//   mean = sum / n,  var_u = max(sqsum / n - mean^2, 0)      (uncentred: cancels when |mean| >> std)
//
// var_u loses about log2(1 + mean^2 / var) bits: the rounding of sqsum alone is eps * (var + mean^2), a relative
// error of eps * (1 + r^2) in var for r = |mean| / std (0.06 at r = 1e3 in fp32, before the sums' own error).
// So a channel whose uncentred estimate has r > kRecentreRatio (4: at most 17 eps of the sums' relative error
// is left, under the BN tolerance) is recentred from y itself, in the same op:
//
//   d = y - mean   (mean: the uncentred estimate, good to ~eps * |mean|),
//   mean' = mean + sum(d) / n,  var' = max(sum(d^2) / n - (sum(d) / n)^2, 0)
//
// with fp32 partial sums per (row block, channel), one row block's 8 row lanes merged in a fixed order and the
// blocks' partials summed by at::sum: deterministic, no atomics, no host synchronisation (the choice of channels is
// made on the device), so the op stays capturable in a CUDA graph.
//
// Bytes: channels not recentred cost nothing beyond a few (K,) vector ops: a row block whose 32 channels all pass
// returns after reading their 32 flags. A recentred channel group costs one more read of y for those channels
// (an NHWC row of 32 channels is 64 contiguous bytes in 16-bit dtypes), so at most one extra read of y in all, the
// price of stock BatchNorm's separate statistics pass, paid only where the fused sums would be wrong; plus the
// partials, 2 * G * K fp32 written and read (G <= kMaxRowBlocks row blocks; 2 MiB at most for K = 2048). Fixed
// cost per call, recentred or not: about ten (K,)-sized ATen ops and one launch of G x ceil(K / 32) blocks.
// (Not chosen: shifted sums would need a pointwise op between the conv and genstats in the cuDNN graph, a pattern
// the runtime-fusion engines are not documented to take; a compensated merge needs per-tile partials, which
// genstats does not expose.)
//
// The CPU kernel of the op (resfused_cuda_conv_bn::conv_bn_finalize_stats) computes the same formulas with ATen
// ops (centred sums over all channels, then the same selection), so the math is testable without a GPU.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "conv_bn_stats.h"

namespace resfused {
namespace conv_bn_cudnn {
namespace {

constexpr float kRecentreRatio = 4.0f;
constexpr int kChannels = 32;       // channel lanes of a block (threadIdx.x)
constexpr int kRowLanes = 8;        // row lanes of a block (threadIdx.y)
constexpr int64_t kMaxRowBlocks = 256;
constexpr int64_t kMinRowsPerBlock = 1024;

// Row blocks for `rows` values per channel: a function of the shape only (the reduction order with it).
int64_t row_blocks(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxRowBlocks, (rows + kMinRowsPerBlock - 1) / kMinRowsPerBlock));
}

// part (G, 2, K): for row block g and a flagged channel k, sum(d) and sum(d^2) over the block's rows, d = y - mean.
// Entries of channels not flagged are not written (the caller selects the uncentred estimate for them).
template <typename T>
__global__ void centred_partials_kernel(const T* __restrict__ y, const float* __restrict__ mean,
                                        const bool* __restrict__ flag, float* __restrict__ part, int64_t rows,
                                        int64_t k_total, int64_t hw, int64_t w, int64_t sn, int64_t sk, int64_t sh,
                                        int64_t sw, int64_t rows_per_block) {
  __shared__ float s1[kRowLanes][kChannels + 1];
  __shared__ float s2[kRowLanes][kChannels + 1];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * kChannels + tx;
  const bool mine = k < k_total && flag[k];
  if (!__syncthreads_or(mine)) return;
  float a1 = 0.f, a2 = 0.f;
  if (mine) {
    const float m = mean[k];
    const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
    const int64_t r1 = r0 + rows_per_block < rows ? r0 + rows_per_block : rows;
    for (int64_t r = r0 + ty; r < r1; r += kRowLanes) {
      const int64_t n = r / hw;
      const int64_t p = r - n * hw;
      const int64_t h = p / w;
      const float d = static_cast<float>(y[n * sn + k * sk + h * sh + (p - h * w) * sw]) - m;
      a1 += d;
      a2 += d * d;
    }
  }
  s1[ty][tx] = a1;
  s2[ty][tx] = a2;
  __syncthreads();
  if (ty == 0 && mine) {
    float b1 = 0.f, b2 = 0.f;
    for (int i = 0; i < kRowLanes; ++i) {  // fixed order
      b1 += s1[i][tx];
      b2 += s2[i][tx];
    }
    const int64_t g = blockIdx.x;
    part[(g * 2) * k_total + k] = b1;
    part[(g * 2 + 1) * k_total + k] = b2;
  }
}

// (sum(d), sum(d^2)) per channel, (2, K) fp32, for the flagged channels (others: unspecified).
at::Tensor centred_sums(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& flag) {
  const int64_t k_total = y.size(1);
  if (!y.is_cuda()) {
    at::Tensor d = y.to(at::kFloat) - mean.view({1, -1, 1, 1});
    return at::stack({d.sum(at::IntArrayRef{0, 2, 3}), (d * d).sum(at::IntArrayRef{0, 2, 3})});
  }
  const int64_t hw = y.size(2) * y.size(3);
  const int64_t rows = y.size(0) * hw;
  const int64_t blocks = row_blocks(rows);
  const int64_t rows_per_block = (rows + blocks - 1) / blocks;
  at::Tensor part = at::empty({blocks, 2, k_total}, mean.options());
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>((k_total + kChannels - 1) / kChannels));
  TORCH_CHECK(grid.y <= 65535, "conv_bn (cuda): too many channels for the statistics kernel: ", k_total);
  const dim3 block(kChannels, kRowLanes);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "conv_bn_centred_partials", [&] {
    centred_partials_kernel<scalar_t><<<grid, block, 0, stream>>>(
        y.data_ptr<scalar_t>(), mean.data_ptr<float>(), flag.data_ptr<bool>(), part.data_ptr<float>(), rows,
        k_total, hw, y.size(3), y.stride(0), y.stride(1), y.stride(2), y.stride(3), rows_per_block);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return part.sum(0);
}

std::tuple<at::Tensor, at::Tensor> finalize_stats_op(const at::Tensor& y, const at::Tensor& sum,
                                                     const at::Tensor& sqsum) {
  auto [mean, var] = finalize_stats(y, sum, sqsum);
  return {mean, var};
}

}  // namespace

std::pair<at::Tensor, at::Tensor> finalize_stats(const at::Tensor& y, const at::Tensor& sum, const at::Tensor& sqsum) {
  TORCH_CHECK(y.dim() == 4, "conv_bn (cuda): y must be 4-D (N, K, P, Q), got ", y.dim(), "-D");
  const int64_t k_total = y.size(1);
  auto check = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == k_total && t.is_contiguous(),
                "conv_bn (cuda): ", name, " must be a contiguous float32 tensor of shape (", k_total, ",), got ",
                t.scalar_type(), " ", t.sizes());
    TORCH_CHECK(t.device() == y.device(), "conv_bn (cuda): ", name, " is on ", t.device(), " but y is on ",
                y.device());
  };
  check(sum, "sum");
  check(sqsum, "sqsum");
  const c10::OptionalDeviceGuard guard(y.device());
  const double n = static_cast<double>(y.numel() / std::max<int64_t>(k_total, 1));
  at::Tensor mean = sum / n;
  at::Tensor var = (sqsum / n - mean * mean).clamp_min_(0);
  if (y.numel() == 0) return {mean, var};
  const at::Tensor flag = (mean * mean).gt(var * (kRecentreRatio * kRecentreRatio)).contiguous();
  const at::Tensor sums = centred_sums(y, mean, flag);
  const at::Tensor dmean = sums[0] / n;
  const at::Tensor var_c = (sums[1] / n - dmean * dmean).clamp_min_(0);
  return {at::where(flag, mean + dmean, mean), at::where(flag, var_c, var)};
}

}  // namespace conv_bn_cudnn
}  // namespace resfused

// conv_bn_finalize_stats(y, sum, sqsum) -> (mean, var): finalize_stats as an op (CPU: the same math over ATen ops,
// for tests without a GPU).
TORCH_LIBRARY_FRAGMENT(resfused_cuda_conv_bn, m) {
  m.def("conv_bn_finalize_stats(Tensor y, Tensor sum, Tensor sqsum) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(resfused_cuda_conv_bn, CUDA, m) {
  m.impl("conv_bn_finalize_stats", &resfused::conv_bn_cudnn::finalize_stats_op);
}

TORCH_LIBRARY_IMPL(resfused_cuda_conv_bn, CPU, m) {
  m.impl("conv_bn_finalize_stats", &resfused::conv_bn_cudnn::finalize_stats_op);
}
