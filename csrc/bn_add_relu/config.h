// Launch constants of the fused BatchNorm + add + ReLU kernels, shared by the device code (*.cuh) and
// the host planner (plan.h). Plain C++: no CUDA, no ATen.
#pragma once

namespace resfused {
namespace {

constexpr int kGroup = 8;                // elements per group = bits per mask byte
constexpr int kThreads = 256;            // two-pass kernels
constexpr int kPersistentThreads = 512;  // persistent kernels
constexpr int kFinalizeTX = 32;          // finalize kernels: 32 channels x 16 split-walkers
constexpr int kFinalizeTY = 16;
constexpr int kApplyBatches = 2;         // two-pass elementwise kernels: batches of U groups per thread
constexpr int kMinStepsPerThread = 4;    // two-pass reductions: fewest groups per thread worth a split
// groups each thread loads from one tensor before their first use (elements.cuh's E::kBatch; the
// planner's cost model counts them as bytes in flight): fp32 2 x 32 bytes, 16-bit 4 x 16 bytes
constexpr int kBatchF32 = 2;
constexpr int kBatch16 = 4;

// Shared per-channel parameter fields of the channels_last kernels: apply (mean, scale, shift),
// backward reduce (mean, k = w * invstd), dx (mean, invstd, k, a, b).
constexpr int kApplyFields = 3;
constexpr int kReduceFields = 2;
constexpr int kDxFields = 5;
constexpr int kMaxTX = 32;

// Floats of one reduction state of nch channels: Welford (count, means, m2s) and backward sums (g, g*x).
constexpr int welford_floats(int nch) { return 1 + 2 * nch; }
constexpr int sums_floats(int nch) { return 2 * nch; }

}  // namespace
}  // namespace resfused
