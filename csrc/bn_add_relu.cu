// Fused BatchNorm + residual add + ReLU: the ATen-side glue of the CUDA kernels (the `cuda` backend):
// device queries, plan cache, dispatch by dtype. The code lives in csrc/bn_add_relu/:
//   elements.cuh reduce.cuh params.cuh   element types and groups, Welford/Chan and mask helpers, KParams
//   channels_last.cuh nchw.cuh           per-thread phases of both layouts
//   two_pass.cuh persistent.cuh          the kernels
//   plan.h plan.cpp                      the planner: plain C++ over a device's properties
//   launch.cuh                           the launch sequences over a launcher (the GPU's, or the CPU
//                                        SIMT runtime's in csrc/sim/, a test tool)
//   gpu_f32.cu gpu_f16.cu gpu_bf16.cu    the GPU launchers, one translation unit per element type
//
// Contract: resfused/reference/bn_add_relu.py. Layouts and the packed 1-bit ReLU mask:
// resfused/_layout.py. Argument checks and allocation live in ops.cpp; this file sees raw pointers.
//
// Data model. A dense (N, C, H, W) tensor is read as rows of `inner` contiguous elements:
//   nchw: N*C planes of H*W (every element of a plane is one channel),
//   cl:   N*H*W rows of C channels.
// Each row is cut into groups of 8 elements, one per mask byte (mask byte = row * ceil(inner/8) + k,
// exactly resfused._layout's packing; bits past the row end are zero). A group of 16-bit data is
// one 16-byte vector (fp32: two); a group that is short (row tail) or misaligned (C % 8 != 0,
// H*W % 8 != 0, or a tensor that starts off a 16-byte boundary) falls back to 8- or 4-byte or
// scalar accesses, decided per group and per tensor, so every shape and offset is handled.
//
// Passes over memory, in units of one read or write of an (N, C, H, W) tensor (mask = 1/16 of a
// 16-bit tensor; statistics and partials are O(C * splits), not counted):
//   forward_train, two-pass:  stats (read x) | finalize | apply (read x, read residual, write y,
//                             write mask)                                     = 4 + 1/16
//   forward_train, persistent: one cooperative launch; each block keeps its slice of x in shared
//                             memory between the statistics and the apply phase (grid-wide sync in
//                             between); what does not fit is re-read in reverse order, so the
//                             re-read starts with what was read last (likely still in L2)
//                                                                              = 3 + 1/16 (slice fits)
//   forward_eval:             read x, read residual, write y (+ mask)          = 3 (+ 1/16)
//   backward, two-pass:       reduce (read dy, read mask, read x, write g = dy*mask as the
//                             residual's gradient) | finalize | dx (read g back, read x, write dx)
//                                                                              = 6 + 1/16
//                             without the residual's gradient dx re-reads dy and the mask instead
//                                                                              = 5 + 2/16
//   backward, persistent:     reduce phase keeps x and g on chip, grid sync, dx phase
//                                                                              = 4 + 1/16 (3 + 1/16
//                             without the residual's gradient)
//   backward, eval (training=False): dx = w*invstd*g needs no reduction: one pass writes dx and g
//                             (and accumulates grad_weight/grad_bias when asked for)
// The floor is the persistent count: x (and dy) must be read once and y (dx, g) written once.
//
// Statistics: per-thread Welford (channels_last: per element, one reciprocal per row shared by the
// thread's 8 channels; nchw: per 8-element group, merged with Chan's formula), then a fixed-shape
// tree over the block's threads in shared memory, then per-block partials [splits][C] in global
// memory merged (Chan) in a fixed order. No atomics anywhere, so results are bit-reproducible for a
// given scheme, shape and device.
//
// Scheme choice (RESFUSED_CUDA_SCHEME = auto | two_pass | persistent, read on every call):
// persistent is used only when the occupancy query confirms that the whole grid is co-resident
// (cooperative launch; nchw also needs C <= co-resident blocks, one channel per block) and, for
// backward, only in training with the input's gradient asked for; otherwise two-pass. `persistent`
// forces it where feasible and falls back to two-pass where not; `two_pass` never uses it; `auto`
// currently equals `persistent` (to be tuned per shape from GPU benchmarks).
// RESFUSED_CUDA_PERSISTENT_CACHE_BYTES=n caps the persistent kernels' shared-memory cache per block
// (testing knob: small n exercises the re-read path on small shapes).
// torch.ops.resfused_cuda.bn_add_relu_plan(x, op) reports the plan a call would use.
//
// Launch shapes: two-pass reductions use 256-thread blocks, one full wave (occupancy x SMs) split
// over channel tiles x row splits; elementwise kernels use 256-thread blocks over 8-element groups;
// persistent kernels use 512-thread blocks (1 per SM at ~128 registers), grid = co-resident blocks.

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <utility>

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "bn_add_relu.h"
#include "bn_add_relu/gpu.h"
#include "bn_add_relu/plan.h"

namespace resfused {
namespace {

const DeviceProps& device_props(int device) {
  static std::mutex mu;
  static DeviceProps infos[64];
  static bool ready[64] = {};
  TORCH_CHECK(device >= 0 && device < 64, "resfused_cuda: device index ", device, " out of range");
  std::lock_guard<std::mutex> lock(mu);
  if (!ready[device]) {
    DeviceProps& d = infos[device];
    int coop = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_reserved, cudaDevAttrReservedSharedMemoryPerBlock, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.regs_per_sm, cudaDevAttrMaxRegistersPerMultiprocessor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.max_blocks_per_sm, cudaDevAttrMaxBlocksPerMultiprocessor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device));
    d.coop = coop != 0;
    ready[device] = true;
  }
  return infos[device];
}

// Allow a kernel the device's full opt-in dynamic shared memory and prefer the largest carveout
// (once per kernel and device: no stream work, safe before or during graph capture).
void allow_max_smem(const void* kernel, int device) {
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  std::lock_guard<std::mutex> lock(mu);
  if (!done.insert({kernel, device}).second) return;
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const int dyn = device_props(device).smem_optin - static_cast<int>(attr.sharedSizeBytes);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dyn));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                      static_cast<int>(cudaSharedmemCarveoutMaxShared)));
}

const void* kernel_address(const KernelRef& k) {
  switch (k.dtype) {
    case DType::kFloat:
      return gpu::kernel_f32(k);
    case DType::kHalf:
      return gpu::kernel_f16(k);
    default:
      return gpu::kernel_bf16(k);
  }
}

// The planner's device questions, answered by the CUDA runtime for one device.
class GpuTarget final : public PlanTarget {
 public:
  explicit GpuTarget(int device) : device_(device), props_(device_props(device)) {}
  const DeviceProps& props() const override { return props_; }
  int static_smem(const KernelRef& k) const override {
    const void* kernel = kernel_address(k);
    if (k.role == KernelRole::kPersistent) allow_max_smem(kernel, device_);
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    return static_cast<int>(attr.sharedSizeBytes);
  }
  int occupancy(const KernelRef& k, int threads, size_t dyn_smem) const override {
    int occ = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel_address(k), threads, dyn_smem));
    return occ;
  }

 private:
  int device_;
  const DeviceProps& props_;
};

// RESFUSED_CUDA_PERSISTENT_CACHE_BYTES caps the per-block shared-memory cache of the persistent kernels
// (a testing knob: small values exercise the re-read path on small shapes); -1 when unset.
int64_t persistent_cache_cap() {
  const char* v = std::getenv("RESFUSED_CUDA_PERSISTENT_CACHE_BYTES");
  if (v == nullptr || *v == '\0') return -1;
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && n >= 0,
              "resfused_cuda: RESFUSED_CUDA_PERSISTENT_CACHE_BYTES must be a non-negative integer, got '", v, "'");
  return n;
}

// Plans are pure functions of (shape, dtype, layout, device, scheme, cache cap, what is computed):
// computed once, then served from a cache, so steady-state calls (and CUDA graph capture after a
// warm-up) make no CUDA API calls besides the launches.
template <class Make>
Plan cached_plan(const Shape& s, Scheme requested, int kind, int64_t cache_cap, const Make& make) {
  using Key = std::tuple<int, int, int64_t, int64_t, int64_t, int, int, int64_t, int>;
  static std::mutex mu;
  static std::map<Key, Plan> cache;
  const Key key{static_cast<int>(s.dtype), static_cast<int>(s.layout), s.n, s.c, s.hw, s.device,
                static_cast<int>(resolve(requested)), cache_cap, kind};
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  const Plan plan = make();
  std::lock_guard<std::mutex> lock(mu);
  if (cache.size() > 4096) cache.clear();  // bound the memory of shape-polymorphic workloads
  cache.emplace(key, plan);
  return plan;
}

}  // namespace

int requested_scheme_from_env() {
  const char* v = std::getenv("RESFUSED_CUDA_SCHEME");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return static_cast<int>(Scheme::kAuto);
  if (std::strcmp(v, "two_pass") == 0) return static_cast<int>(Scheme::kTwoPass);
  if (std::strcmp(v, "persistent") == 0) return static_cast<int>(Scheme::kPersistent);
  return -1;
}

Plan plan_forward_train(const Shape& s, Scheme requested) {
  const int64_t cap = persistent_cache_cap();
  return cached_plan(s, requested, 0, cap, [&] { return make_forward_train_plan(s, requested, cap, GpuTarget(s.device)); });
}

Plan plan_backward(const Shape& s, Scheme requested, bool training, bool need_input_grad, bool need_residual_grad,
                   bool need_weight_grad) {
  (void)need_residual_grad;
  const bool train_dx = training && need_input_grad;
  const bool sums = need_weight_grad || train_dx;
  const int64_t cap = persistent_cache_cap();
  return cached_plan(s, requested, 1 + 2 * train_dx + sums, cap, [&] {
    return make_backward_plan(s, requested, training, need_input_grad, need_weight_grad, cap, GpuTarget(s.device));
  });
}

void launch_forward_train(const Shape& s, const Plan& plan, const ForwardTrainArgs& a, cudaStream_t stream) {
  switch (s.dtype) {
    case DType::kFloat:
      gpu::forward_train_f32(s, plan, a, stream);
      return;
    case DType::kHalf:
      gpu::forward_train_f16(s, plan, a, stream);
      return;
    case DType::kBFloat16:
      gpu::forward_train_bf16(s, plan, a, stream);
      return;
  }
}

void launch_forward_eval(const Shape& s, const ForwardEvalArgs& a, cudaStream_t stream) {
  switch (s.dtype) {
    case DType::kFloat:
      return gpu::forward_eval_f32(s, a, stream);
    case DType::kHalf:
      return gpu::forward_eval_f16(s, a, stream);
    case DType::kBFloat16:
      return gpu::forward_eval_bf16(s, a, stream);
  }
}

void launch_backward(const Shape& s, const Plan& plan, const BackwardArgs& a, cudaStream_t stream) {
  switch (s.dtype) {
    case DType::kFloat:
      gpu::backward_f32(s, plan, a, stream);
      return;
    case DType::kHalf:
      gpu::backward_f16(s, plan, a, stream);
      return;
    case DType::kBFloat16:
      gpu::backward_bf16(s, plan, a, stream);
      return;
  }
}

}  // namespace resfused
