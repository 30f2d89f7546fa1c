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
// Statistics: per-thread Welford of x - shift, shift = the channel's first element, so fp32 means stay
// within the data's spread even at |mean| >> std (channels_last: per element, one reciprocal per row shared
// by the thread's 8 channels; nchw: per 8-element group, merged with Chan's formula), then a fixed-shape
// tree over the block's threads in shared memory, then per-block partials [splits][C] in global
// memory merged (Chan) in a fixed order, the shift added back to the mean once (finish_stats). No atomics
// anywhere, so results are bit-reproducible for a given scheme, shape and device.
//
// Scheme choice (RESFUSED_CUDA_SCHEME = auto | two_pass | persistent, read on every call):
// persistent is used only when the occupancy query confirms that the whole grid is co-resident
// (cooperative launch; nchw also needs C <= co-resident blocks, one channel per block) and, for
// backward, only in training with the input's gradient asked for; otherwise two-pass. `persistent`
// forces it where feasible and falls back to two-pass where not; `two_pass` never uses it; `auto`
// runs whichever of the two feasible plans the planner's cost model (plan.h: bytes, occupancy, bytes in
// flight, launches) estimates faster.
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
#include <mutex>
#include <set>
#include <utility>

#include <c10/core/Allocator.h>
#include <c10/cuda/CUDACachingAllocator.h>
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
    int l2 = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
    d.l2_bytes = l2;
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

PlanCache& plans() {
  static PlanCache* cache = new PlanCache();  // never destroyed: plans may be asked for at exit
  return *cache;
}

bool dispatch_forward_train(const Shape& s, const Plan& plan, const ForwardTrainArgs& a, cudaStream_t stream) {
  switch (s.dtype) {
    case DType::kFloat:
      return gpu::forward_train_f32(s, plan, a, stream);
    case DType::kHalf:
      return gpu::forward_train_f16(s, plan, a, stream);
    default:
      return gpu::forward_train_bf16(s, plan, a, stream);
  }
}

bool dispatch_backward(const Shape& s, const Plan& plan, const BackwardArgs& a, cudaStream_t stream) {
  switch (s.dtype) {
    case DType::kFloat:
      return gpu::backward_f32(s, plan, a, stream);
    case DType::kHalf:
      return gpu::backward_f16(s, plan, a, stream);
    default:
      return gpu::backward_bf16(s, plan, a, stream);
  }
}

// A two-pass plan's workspace when it needs more than the caller allocated for the refused plan (through
// PyTorch's caching allocator, on the current stream: freed when the caller's launches are queued).
c10::DataPtr fallback_workspace(const Plan& refused, const Plan& two_pass, float*& workspace) {
  if (two_pass.workspace_floats <= refused.workspace_floats) return c10::DataPtr();
  c10::DataPtr p = c10::cuda::CUDACachingAllocator::get()->allocate(
      static_cast<size_t>(two_pass.workspace_floats) * sizeof(float));
  workspace = static_cast<float*>(p.get());
  return p;
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
  return plans().get(PlanCache::key(s, requested, cap, 0),
                     [&] { return make_forward_train_plan(s, requested, cap, GpuTarget(s.device)); });
}

Plan plan_backward(const Shape& s, Scheme requested, bool training, bool need_input_grad, bool need_residual_grad,
                   bool need_weight_grad) {
  (void)need_residual_grad;
  const int64_t cap = persistent_cache_cap();
  return plans().get(PlanCache::key(s, requested, cap, backward_kind(training, need_input_grad, need_weight_grad)),
                     [&] {
                       return make_backward_plan(s, requested, training, need_input_grad, need_weight_grad, cap,
                                                 GpuTarget(s.device));
                     });
}

double estimated_us(const Shape& s, const Plan& plan, bool backward) {
  return estimate_cost(s, plan, backward, GpuTarget(s.device)).us;
}

// A refused cooperative launch (cudaErrorCooperativeLaunchTooLarge: fewer blocks co-resident than the
// occupancy query promised, e.g. SMs held by another context or an MPS limit; or another refusal of
// bn_add_relu/launch_refusal.h) wrote nothing: the call runs two-pass, and the shape's cached plan becomes the
// two-pass one, so later calls do not try again.
void launch_forward_train(const Shape& s, const Plan& plan, const ForwardTrainArgs& a, cudaStream_t stream) {
  if (dispatch_forward_train(s, plan, a, stream)) return;
  const Plan two =
      refuse_persistent(plans(), s, false, true, true, true, persistent_cache_cap(), GpuTarget(s.device));
  ForwardTrainArgs b = a;
  const c10::DataPtr ws = fallback_workspace(plan, two, b.workspace);
  TORCH_CHECK(dispatch_forward_train(s, two, b, stream), "resfused_cuda: two-pass forward refused");
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
  if (dispatch_backward(s, plan, a, stream)) return;
  const Plan two = refuse_persistent(plans(), s, true, a.training, a.need_input_grad, a.need_weight_grad,
                                     persistent_cache_cap(), GpuTarget(s.device));
  BackwardArgs b = a;
  const c10::DataPtr ws = fallback_workspace(plan, two, b.workspace);
  TORCH_CHECK(dispatch_backward(s, two, b, stream), "resfused_cuda: two-pass backward refused");
}

}  // namespace resfused
