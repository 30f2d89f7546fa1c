// Fused BatchNorm + residual add + ReLU: CUDA kernels and launchers (the `cuda` backend).
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

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <utility>

#include <c10/cuda/CUDAException.h>

#include "bn_add_relu.h"

namespace cg = cooperative_groups;

namespace resfused {
namespace {

constexpr int kGroup = 8;                // elements per group = bits per mask byte
constexpr int kThreads = 256;            // two-pass kernels
constexpr int kPersistentThreads = 512;  // persistent kernels
constexpr int kFinalizeTX = 32;          // finalize kernels: 32 channels x 16 split-walkers
constexpr int kFinalizeTY = 16;
constexpr int kApplyBatches = 2;         // two-pass elementwise kernels: batches of U groups per thread
constexpr int kMinStepsPerThread = 4;    // two-pass reductions: fewest groups per thread worth a split

// ------------------------------------------------------------------------------------------------
// element types: storage bits <-> fp32 (intrinsics only: torch builds with __CUDA_NO_HALF_CONVERSIONS__)
// ------------------------------------------------------------------------------------------------

struct F32 {
  using Bits = uint32_t;
  static constexpr int kBatch = 2;  // groups in flight per thread: 2 x 32 bytes
  static __device__ __forceinline__ float to_float(Bits b) { return __uint_as_float(b); }
  static __device__ __forceinline__ Bits from_float(float v) { return __float_as_uint(v); }
};

struct F16 {
  using Bits = uint16_t;
  static constexpr int kBatch = 4;  // 4 x 16 bytes
  static __device__ __forceinline__ float to_float(Bits b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ Bits from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

struct BF16 {
  using Bits = uint16_t;
  static constexpr int kBatch = 4;
  static __device__ __forceinline__ float to_float(Bits b) { return __uint_as_float(static_cast<uint32_t>(b) << 16); }
  static __device__ __forceinline__ Bits from_float(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

template <typename Bits>
struct alignas(16) Group {
  Bits v[kGroup];
};

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fffffff); }

// Load the n (1..8) valid elements of a group at p; elements past n read as +0.
template <typename Bits>
__device__ __forceinline__ void load_group(Group<Bits>& g, const Bits* p, int n) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (n == kGroup && (a & 15u) == 0) {
#pragma unroll
    for (int i = 0; i < int(sizeof(Group<Bits>) / 16); ++i)
      reinterpret_cast<uint4*>(g.v)[i] = reinterpret_cast<const uint4*>(p)[i];
  } else if (n == kGroup && (a & 7u) == 0) {
#pragma unroll
    for (int i = 0; i < int(sizeof(Group<Bits>) / 8); ++i)
      reinterpret_cast<uint2*>(g.v)[i] = reinterpret_cast<const uint2*>(p)[i];
  } else if (n == kGroup && (a & 3u) == 0) {
#pragma unroll
    for (int i = 0; i < int(sizeof(Group<Bits>) / 4); ++i)
      reinterpret_cast<uint32_t*>(g.v)[i] = reinterpret_cast<const uint32_t*>(p)[i];
  } else {
#pragma unroll
    for (int j = 0; j < kGroup; ++j) g.v[j] = j < n ? p[j] : Bits(0);
  }
}

// Store the n (1..8) valid elements of a group at p.
template <typename Bits>
__device__ __forceinline__ void store_group(Bits* p, const Group<Bits>& g, int n) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (n == kGroup && (a & 15u) == 0) {
#pragma unroll
    for (int i = 0; i < int(sizeof(Group<Bits>) / 16); ++i)
      reinterpret_cast<uint4*>(p)[i] = reinterpret_cast<const uint4*>(g.v)[i];
  } else if (n == kGroup && (a & 7u) == 0) {
#pragma unroll
    for (int i = 0; i < int(sizeof(Group<Bits>) / 8); ++i)
      reinterpret_cast<uint2*>(p)[i] = reinterpret_cast<const uint2*>(g.v)[i];
  } else if (n == kGroup && (a & 3u) == 0) {
#pragma unroll
    for (int i = 0; i < int(sizeof(Group<Bits>) / 4); ++i)
      reinterpret_cast<uint32_t*>(p)[i] = reinterpret_cast<const uint32_t*>(g.v)[i];
  } else {
#pragma unroll
    for (int j = 0; j < kGroup; ++j)
      if (j < n) p[j] = g.v[j];
  }
}

// g = dy where the mask bit is set, else +0 (exactly the reference's torch.where(mask, dy, 0)).
template <typename Bits>
__device__ __forceinline__ Group<Bits> masked(const Group<Bits>& dy, uint32_t bits) {
  Group<Bits> g;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) g.v[j] = ((bits >> j) & 1u) ? dy.v[j] : Bits(0);
  return g;
}

__device__ __forceinline__ uint32_t valid_bits(int n) { return (1u << n) - 1u; }

// ------------------------------------------------------------------------------------------------
// reduction states and the block tree
// ------------------------------------------------------------------------------------------------

// Welford/Chan state of NCH channels sharing one count.
template <int NCH>
struct Welford {
  static constexpr int kFloats = 1 + 2 * NCH;
  float n, mean[NCH], m2[NCH];

  __device__ __forceinline__ void init() {
    n = 0.f;
#pragma unroll
    for (int j = 0; j < NCH; ++j) mean[j] = m2[j] = 0.f;
  }
  // Chan et al.: exact for n == 0 on this side too (mean and m2 start at 0, f becomes 1).
  __device__ __forceinline__ void merge(const Welford& o) {
    if (o.n == 0.f) return;
    const float nn = n + o.n;
    const float f = o.n / nn;
    const float w = n * f;
#pragma unroll
    for (int j = 0; j < NCH; ++j) {
      const float d = o.mean[j] - mean[j];
      mean[j] += d * f;
      m2[j] += o.m2[j] + d * d * w;
    }
    n = nn;
  }
  __device__ __forceinline__ void store(float* buf, int stride, int slot) const {
    buf[slot] = n;
#pragma unroll
    for (int j = 0; j < NCH; ++j) {
      buf[(1 + j) * stride + slot] = mean[j];
      buf[(1 + NCH + j) * stride + slot] = m2[j];
    }
  }
  __device__ __forceinline__ void load(const float* buf, int stride, int slot) {
    n = buf[slot];
#pragma unroll
    for (int j = 0; j < NCH; ++j) {
      mean[j] = buf[(1 + j) * stride + slot];
      m2[j] = buf[(1 + NCH + j) * stride + slot];
    }
  }
};

// Backward sums of NCH channels: sum of g and sum of g * (x - mean).
template <int NCH>
struct Sums {
  static constexpr int kFloats = 2 * NCH;
  float g[NCH], gx[NCH];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int j = 0; j < NCH; ++j) g[j] = gx[j] = 0.f;
  }
  __device__ __forceinline__ void merge(const Sums& o) {
#pragma unroll
    for (int j = 0; j < NCH; ++j) {
      g[j] += o.g[j];
      gx[j] += o.gx[j];
    }
  }
  __device__ __forceinline__ void store(float* buf, int stride, int slot) const {
#pragma unroll
    for (int j = 0; j < NCH; ++j) {
      buf[j * stride + slot] = g[j];
      buf[(NCH + j) * stride + slot] = gx[j];
    }
  }
  __device__ __forceinline__ void load(const float* buf, int stride, int slot) {
#pragma unroll
    for (int j = 0; j < NCH; ++j) {
      g[j] = buf[j * stride + slot];
      gx[j] = buf[(NCH + j) * stride + slot];
    }
  }
};

// Merge the states of threads (tx, 0..TY-1) into thread (tx, 0) along a fixed tree (TY a power of
// two). buf holds S::kFloats * TX * TY/2 floats. Every thread of the block must call it.
template <class S>
__device__ __forceinline__ void block_tree_reduce(S& s, float* buf, int tx, int ty, int TX, int TY) {
  const int stride = TX * (TY >> 1);
  for (int h = TY >> 1; h > 0; h >>= 1) {
    if (ty >= h && ty < 2 * h) s.store(buf, stride, (ty - h) * TX + tx);
    __syncthreads();
    if (ty < h) {
      S o;
      o.load(buf, stride, ty * TX + tx);
      s.merge(o);
    }
    __syncthreads();
  }
}

// Sum of 8 values along a fixed tree.
__device__ __forceinline__ float pairwise_sum(const float (&v)[kGroup]) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// Kahan step: sum + comp tracks the exact sum to about twice the working precision. Needs IEEE
// evaluation order (nvcc does not reassociate without --use_fast_math; FMA contraction is harmless).
__device__ __forceinline__ void kahan_add(float& sum, float& comp, float v) {
  const float y = v - comp;
  const float t = sum + y;
  comp = (t - sum) - y;
  sum = t;
}

// Welford step of one channels_last row: 8 channels share the count.
__device__ __forceinline__ void push_row(Welford<kGroup>& s, const float (&v)[kGroup]) {
  s.n += 1.f;
  const float inv = 1.f / s.n;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    const float d = v[j] - s.mean[j];
    s.mean[j] += d * inv;
    s.m2[j] += d * (v[j] - s.mean[j]);
  }
}

// Chan step of one nchw group: n (1..8) values of one channel (invalid ones are 0).
__device__ __forceinline__ void push_group(Welford<1>& s, const float (&v)[kGroup], int n) {
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) sum += v[j];
  Welford<1> o;
  o.n = static_cast<float>(n);
  o.mean[0] = sum / o.n;
  float m2 = 0.f;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    const float d = v[j] - o.mean[0];
    m2 += j < n ? d * d : 0.f;
  }
  o.m2[0] = m2;
  s.merge(o);
}

// n / d for n, d < 2^31 with a multiply-high and a shift (Granlund-Montgomery, as ATen's IntDivider):
// the nchw kernels turn a group index into (plane, position) per 8 elements, where a hardware integer
// division would cost more instructions than the memory time of the group.
struct FastDiv {
  uint32_t d = 1, m = 0, s = 0;
  FastDiv() = default;
  explicit FastDiv(uint32_t divisor) : d(divisor) {
    for (s = 0; s < 32; ++s)
      if ((1u << s) >= d) break;
    const uint64_t one = 1;
    m = static_cast<uint32_t>(((one << 32) * ((one << s) - d)) / d + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, m) + n) >> s; }
};

// ------------------------------------------------------------------------------------------------
// kernel parameters (one struct for every kernel; passed by value)
// ------------------------------------------------------------------------------------------------

struct KParams {
  // elementwise tensors, in the dtype of the kernel's element type
  const void* x;
  const void* res;
  void* y;
  const void* dy;
  void* dx;
  void* dres;
  uint8_t* mask_out;
  const uint8_t* mask_in;
  // per-channel fp32 vectors
  const float* weight;
  const float* bias;
  const float* mean_in;   // apply: mean; backward: saved mean
  const float* scale_in;  // apply: invstd, or running_var when is_var; backward: saved invstd
  float* mean_out;
  float* invstd_out;
  float* running_mean;
  float* running_var;
  float* grad_weight;
  float* grad_bias;
  // partials [splits][C], [splits][C], [splits]
  float* pa;
  float* pb;
  float* pn;
  // geometry
  int64_t outer;      // rows: N*H*W (cl) or planes: N*C (nchw)
  int64_t batch;      // N (planes per channel, nchw)
  int64_t M;          // elements per channel
  int64_t per_block;  // rows (cl) or groups (nchw) of one block's slice
  int inner;          // C (cl) or H*W (nchw)
  int gpr;            // groups per row: ceil(inner / 8)
  int C;
  FastDiv gpr_div, c_div;  // nchw: divide by gpr and by C
  int num_tiles;  // channel tiles (cl) or C (nchw)
  int splits;     // blocks along the rows of one channel tile
  int cache_iters;
  int tree_floats;  // persistent kernels: floats of the reduction tree (per-channel parameters follow)
  // scalars
  float eps, momentum, keep, unbias, count;  // keep = 1 - momentum; unbias = M / max(M-1, 1); count = M
  bool relu, has_res, is_var, write_dres, write_dx, do_sums, dres_is_g;
};

// ---- per-channel helpers shared by the finalize kernels and the persistent merges

// Write mean/invstd and update the running stats of channel c from its merged (mean, m2).
__device__ __forceinline__ void finish_stats(const KParams& p, int c, float mean, float m2, float& mean_o,
                                             float& invstd_o, bool write) {
  const float m = p.M > 0 ? mean : quiet_nan();
  const float var = m2 / p.count;  // 0/0 = NaN for an empty batch, like the reference
  const float invstd = rsqrtf(var + p.eps);
  mean_o = m;
  invstd_o = invstd;
  if (!write) return;
  p.mean_out[c] = m;
  p.invstd_out[c] = invstd;
  if (p.running_mean != nullptr) p.running_mean[c] = p.running_mean[c] * p.keep + p.momentum * m;
  if (p.running_var != nullptr) p.running_var[c] = p.running_var[c] * p.keep + p.momentum * (var * p.unbias);
}

__device__ __forceinline__ void apply_params(const KParams& p, int c, float& mean, float& scale, float& shift) {
  mean = p.mean_in[c];
  const float inv = p.is_var ? rsqrtf(p.scale_in[c] + p.eps) : p.scale_in[c];
  const float w = p.weight != nullptr ? p.weight[c] : 1.f;
  scale = w * inv;
  shift = p.bias != nullptr ? p.bias[c] : 0.f;
}

// Backward per-channel coefficients from the channel sums: dx = k * ((g - a) - (x - mean) * invstd * b)
// (training), dx = k * g (eval).
struct DxCoef {
  float mean, invstd, k, a, b;
};

__device__ __forceinline__ DxCoef dx_coef(const KParams& p, int c, float sum_g, float sum_gxhat) {
  DxCoef d;
  d.mean = p.mean_in[c];
  d.invstd = p.scale_in[c];
  d.k = (p.weight != nullptr ? p.weight[c] : 1.f) * d.invstd;
  d.a = sum_g / p.count;
  d.b = sum_gxhat / p.count;
  return d;
}

__device__ __forceinline__ float dx_value(const DxCoef& d, float g, float x) {
  const float xhat = (x - d.mean) * d.invstd;
  return d.k * ((g - d.a) - xhat * d.b);
}

__device__ __forceinline__ float act(float x, float r, float mean, float scale, float shift, bool has_res) {
  const float v = (x - mean) * scale + shift;
  return has_res ? v + r : v;
}

// One group of the apply: out = relu?(act(x, r)) per element, with element e's (mean, scale, shift) from
// prm(e, mean, scale, shift). Returns the ReLU mask bits (bit e: element e kept; all zero without ReLU).
template <typename E, typename Prm>
__device__ __forceinline__ uint32_t apply_group(const KParams& p, const Group<typename E::Bits>& x,
                                                const Group<typename E::Bits>& r, Prm prm,
                                                Group<typename E::Bits>& out) {
  uint32_t bits = 0;
#pragma unroll
  for (int e = 0; e < kGroup; ++e) {
    float mean, scale, shift;
    prm(e, mean, scale, shift);
    float v = act(E::to_float(x.v[e]), p.has_res ? E::to_float(r.v[e]) : 0.f, mean, scale, shift, p.has_res);
    if (p.relu) {
      const bool pos = v > 0.f;
      bits |= static_cast<uint32_t>(pos) << e;
      v = pos ? v : 0.f;
    }
    out.v[e] = E::from_float(v);
  }
  return bits;
}

// ------------------------------------------------------------------------------------------------
// channels_last: blocks of (TX, TY) threads; a thread owns one 8-channel group k of a channel tile
// and walks rows row0 + ty + i*TY of its block's slice [row0, row1)
// ------------------------------------------------------------------------------------------------

struct ClThread {
  int tx, ty, TX, TY, k, nv, iters;
  bool active;
  int64_t row0;
  __device__ __forceinline__ int64_t offset(const KParams& p, int i) const {
    return (row0 + ty + static_cast<int64_t>(i) * TY) * p.inner + kGroup * k;
  }
  __device__ __forceinline__ int64_t mask_index(const KParams& p, int i) const {
    return (row0 + ty + static_cast<int64_t>(i) * TY) * p.gpr + k;
  }
  __device__ __forceinline__ int slot(int i) const { return (i * TY + ty) * TX + tx; }
  // per-channel parameters in shared memory, [fields][8][TX]: field f of channel 8k + j
  __device__ __forceinline__ float prm(const float* s, int f, int j) const { return s[(f * kGroup + j) * TX + tx]; }
  __device__ __forceinline__ void set_prm(float* s, int f, int j, float v) const { s[(f * kGroup + j) * TX + tx] = v; }
};

// Shared per-channel parameter fields of the channels_last kernels: apply (mean, scale, shift),
// backward reduce (mean, k = w * invstd), dx (mean, invstd, k, a, b).
constexpr int kApplyFields = 3;
constexpr int kReduceFields = 2;
constexpr int kDxFields = 5;
constexpr int kMaxTX = 32;

__device__ __forceinline__ ClThread cl_thread(const KParams& p, int tile, int split) {
  ClThread t;
  t.tx = threadIdx.x;
  t.ty = threadIdx.y;
  t.TX = blockDim.x;
  t.TY = blockDim.y;
  t.k = tile * t.TX + t.tx;
  t.active = t.k < p.gpr;
  t.nv = min(kGroup, p.inner - kGroup * t.k);
  t.row0 = static_cast<int64_t>(split) * p.per_block;
  const int64_t row1 = min(p.outer, t.row0 + p.per_block);
  const int64_t mine = row1 - t.row0 - t.ty;
  t.iters = mine > 0 ? static_cast<int>((mine + t.TY - 1) / t.TY) : 0;
  return t;
}

// Statistics of the thread's rows (optionally caching x); state not yet block-reduced.
template <typename E>
__device__ __forceinline__ void cl_stats_phase(const KParams& p, const ClThread& t, Group<typename E::Bits>* cache,
                                               Welford<kGroup>& s) {
  using Bits = typename E::Bits;
  constexpr int U = E::kBatch;
  s.init();
  if (!t.active) return;
  const Bits* x = static_cast<const Bits*>(p.x);
  for (int i0 = 0; i0 < t.iters; i0 += U) {
    Group<Bits> v[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (i0 + u < t.iters) load_group(v[u], x + t.offset(p, i0 + u), t.nv);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + u;
      if (i < t.iters) {
        if (i < p.cache_iters) cache[t.slot(i)] = v[u];
        float f[kGroup];
#pragma unroll
        for (int j = 0; j < kGroup; ++j) f[j] = E::to_float(v[u].v[j]);
        push_row(s, f);
      }
    }
  }
}

// ty == 0 threads write the block's partials (tile channels of split r).
__device__ __forceinline__ void cl_write_welford_partial(const KParams& p, const ClThread& t, int tile, int split,
                                                         const Welford<kGroup>& s) {
  if (t.ty != 0 || !t.active) return;
  const int64_t base = static_cast<int64_t>(split) * p.C + kGroup * t.k;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    if (j < t.nv) {
      p.pa[base + j] = s.mean[j];
      p.pb[base + j] = s.m2[j];
    }
  }
  if (tile == 0 && t.tx == 0) p.pn[split] = s.n;
}

__device__ __forceinline__ void cl_write_sums_partial(const KParams& p, const ClThread& t, int split,
                                                      const Sums<kGroup>& s) {
  if (t.ty != 0 || !t.active) return;
  const int64_t base = static_cast<int64_t>(split) * p.C + kGroup * t.k;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    if (j < t.nv) {
      p.pa[base + j] = s.g[j];
      p.pb[base + j] = s.gx[j];
    }
  }
}

// Apply phase: y = relu((x - mean) * scale + shift + residual) over the thread's rows, x from the
// cache for i < cache_iters; reverse walks the rows last-to-first.
template <typename E>
__device__ __forceinline__ void cl_apply_phase(const KParams& p, const ClThread& t,
                                               const Group<typename E::Bits>* cache, bool reverse, const float* prm) {
  using Bits = typename E::Bits;
  constexpr int U = E::kBatch;
  if (!t.active) return;
  const Bits* x = static_cast<const Bits*>(p.x);
  const Bits* res = static_cast<const Bits*>(p.res);
  Bits* y = static_cast<Bits*>(p.y);
  const uint32_t valid = valid_bits(t.nv);
  for (int j0 = 0; j0 < t.iters; j0 += U) {
    Group<Bits> xv[U], rv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      if (j < t.iters) {
        const int i = reverse ? t.iters - 1 - j : j;
        const int64_t off = t.offset(p, i);
        if (i < p.cache_iters)
          xv[u] = cache[t.slot(i)];
        else
          load_group(xv[u], x + off, t.nv);
        if (p.has_res) load_group(rv[u], res + off, t.nv);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      if (j < t.iters) {
        const int i = reverse ? t.iters - 1 - j : j;
        Group<Bits> out;
        const uint32_t bits = apply_group<E>(p, xv[u], rv[u], [&](int e, float& m, float& sc, float& sh) {
          m = t.prm(prm, 0, e);
          sc = t.prm(prm, 1, e);
          sh = t.prm(prm, 2, e);
        }, out);
        store_group(y + t.offset(p, i), out, t.nv);
        if (p.mask_out != nullptr) p.mask_out[t.mask_index(p, i)] = static_cast<uint8_t>(bits & valid);
      }
    }
  }
}

// Threads of row 0 fill the block's shared apply parameters; the caller synchronizes.
__device__ __forceinline__ void cl_store_apply_params(const KParams& p, const ClThread& t, float* prm) {
  if (t.ty != 0 || !t.active) return;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    float mean = 0.f, scale = 0.f, shift = 0.f;
    if (j < t.nv) apply_params(p, kGroup * t.k + j, mean, scale, shift);
    t.set_prm(prm, 0, j, mean);
    t.set_prm(prm, 1, j, scale);
    t.set_prm(prm, 2, j, shift);
  }
}

__device__ __forceinline__ void cl_store_reduce_params(const KParams& p, const ClThread& t, float* prm) {
  if (t.ty != 0 || !t.active) return;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    const int c = kGroup * t.k + j;
    const bool ok = j < t.nv;
    t.set_prm(prm, 0, j, ok ? p.mean_in[c] : 0.f);
    t.set_prm(prm, 1, j, ok ? (p.weight != nullptr ? p.weight[c] : 1.f) * p.scale_in[c] : 0.f);
  }
}

__device__ __forceinline__ void cl_store_dx_params(const ClThread& t, float* prm, const DxCoef& d, int j) {
  t.set_prm(prm, 0, j, d.mean);
  t.set_prm(prm, 1, j, d.invstd);
  t.set_prm(prm, 2, j, d.k);
  t.set_prm(prm, 3, j, d.a);
  t.set_prm(prm, 4, j, d.b);
}

__device__ __forceinline__ DxCoef cl_dx_params(const ClThread& t, const float* prm, int j) {
  DxCoef d;
  d.mean = t.prm(prm, 0, j);
  d.invstd = t.prm(prm, 1, j);
  d.k = t.prm(prm, 2, j);
  d.a = t.prm(prm, 3, j);
  d.b = t.prm(prm, 4, j);
  return d;
}

// Backward reduce phase over the thread's rows: g = dy * mask; optionally writes g (residual's
// gradient) and, in eval, dx = k * g; accumulates the sums; optionally caches x and g.
template <typename E>
__device__ __forceinline__ void cl_bwd_reduce_phase(const KParams& p, const ClThread& t,
                                                    Group<typename E::Bits>* cache_x,
                                                    Group<typename E::Bits>* cache_g, const float* prm,
                                                    Sums<kGroup>& s) {
  using Bits = typename E::Bits;
  constexpr int U = E::kBatch;
  s.init();
  if (!t.active) return;
  const Bits* dy = static_cast<const Bits*>(p.dy);
  const Bits* x = static_cast<const Bits*>(p.x);
  Bits* dres = static_cast<Bits*>(p.dres);
  Bits* dx = static_cast<Bits*>(p.dx);
  for (int i0 = 0; i0 < t.iters; i0 += U) {
    Group<Bits> gv[U], xv[U];
    uint32_t bits[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + u;
      if (i < t.iters) {
        const int64_t off = t.offset(p, i);
        load_group(gv[u], dy + off, t.nv);
        bits[u] = p.relu ? static_cast<uint32_t>(p.mask_in[t.mask_index(p, i)]) : 0xffu;
        if (p.do_sums) load_group(xv[u], x + off, t.nv);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + u;
      if (i < t.iters) {
        const int64_t off = t.offset(p, i);
        const Group<Bits> g = masked(gv[u], bits[u]);
        if (p.write_dres) store_group(dres + off, g, t.nv);
        if (i < p.cache_iters) {
          cache_g[t.slot(i)] = g;
          cache_x[t.slot(i)] = xv[u];
        }
        if (p.write_dx) {
          Group<Bits> o;
#pragma unroll
          for (int e = 0; e < kGroup; ++e) o.v[e] = E::from_float(t.prm(prm, 1, e) * E::to_float(g.v[e]));
          store_group(dx + off, o, t.nv);
        }
        if (p.do_sums) {
#pragma unroll
          for (int e = 0; e < kGroup; ++e) {
            const float gf = E::to_float(g.v[e]);
            s.g[e] += gf;
            s.gx[e] += gf * (E::to_float(xv[u].v[e]) - t.prm(prm, 0, e));
          }
        }
      }
    }
  }
}

// Training dx over the thread's rows: g and x from the caches for i < cache_iters, else g from the
// residual's gradient (when written) or dy and the mask, x from memory.
template <typename E>
__device__ __forceinline__ void cl_dx_phase(const KParams& p, const ClThread& t, const Group<typename E::Bits>* cache_x,
                                            const Group<typename E::Bits>* cache_g, bool reverse,
                                            const float* prm) {
  using Bits = typename E::Bits;
  constexpr int U = E::kBatch;
  if (!t.active) return;
  const Bits* gsrc = static_cast<const Bits*>(p.dres_is_g ? p.dres : p.dy);
  const Bits* x = static_cast<const Bits*>(p.x);
  Bits* dx = static_cast<Bits*>(p.dx);
  for (int j0 = 0; j0 < t.iters; j0 += U) {
    Group<Bits> gv[U], xv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      if (j < t.iters) {
        const int i = reverse ? t.iters - 1 - j : j;
        if (i < p.cache_iters) {
          gv[u] = cache_g[t.slot(i)];
          xv[u] = cache_x[t.slot(i)];
        } else {
          const int64_t off = t.offset(p, i);
          load_group(gv[u], gsrc + off, t.nv);
          if (!p.dres_is_g && p.relu)
            gv[u] = masked(gv[u], static_cast<uint32_t>(p.mask_in[t.mask_index(p, i)]));
          load_group(xv[u], x + off, t.nv);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      if (j < t.iters) {
        const int i = reverse ? t.iters - 1 - j : j;
        Group<Bits> o;
#pragma unroll
        for (int e = 0; e < kGroup; ++e)
          o.v[e] = E::from_float(dx_value(cl_dx_params(t, prm, e), E::to_float(gv[u].v[e]),
                                          E::to_float(xv[u].v[e])));
        store_group(dx + t.offset(p, i), o, t.nv);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// nchw: 1-D blocks; a block owns one channel c and the slice [q0, q1) of its N * gpr groups
// (group q: plane n = q / gpr of the channel, positions 8*(q % gpr) ...)
// ------------------------------------------------------------------------------------------------

struct NcThread {
  int t, T, c, iters;
  int64_t q0;
  __device__ __forceinline__ int slot(int i) const { return i * T + t; }
};

__device__ __forceinline__ NcThread nc_thread(const KParams& p, int c, int split) {
  NcThread n;
  n.t = threadIdx.x;
  n.T = blockDim.x;
  n.c = c;
  n.q0 = static_cast<int64_t>(split) * p.per_block;
  const int64_t q1 = min(p.batch * p.gpr, n.q0 + p.per_block);
  const int64_t mine = q1 - n.q0 - n.t;
  n.iters = mine > 0 ? static_cast<int>((mine + n.T - 1) / n.T) : 0;
  return n;
}

// Location of the thread's i-th group: element offset, mask byte, valid count.
struct NcLoc {
  int64_t off, mask;
  int nv;
};

__device__ __forceinline__ NcLoc nc_loc(const KParams& p, const NcThread& n, int i) {
  const uint32_t q = static_cast<uint32_t>(n.q0 + n.t + static_cast<int64_t>(i) * n.T);
  const uint32_t b = p.gpr_div.div(q);
  const int k = static_cast<int>(q - b * static_cast<uint32_t>(p.gpr));
  const int64_t plane = static_cast<int64_t>(b) * p.C + n.c;
  NcLoc l;
  l.off = plane * p.inner + kGroup * k;
  l.mask = plane * p.gpr + k;
  l.nv = min(kGroup, p.inner - kGroup * k);
  return l;
}

// Location of flat group q of the whole tensor (two-pass elementwise kernels): mask byte = q.
__device__ __forceinline__ NcLoc nc_flat_loc(const KParams& p, int64_t q, int& c) {
  const uint32_t plane32 = p.gpr_div.div(static_cast<uint32_t>(q));
  const int k = static_cast<int>(static_cast<uint32_t>(q) - plane32 * static_cast<uint32_t>(p.gpr));
  c = static_cast<int>(plane32 - p.c_div.div(plane32) * static_cast<uint32_t>(p.C));
  const int64_t plane = plane32;
  NcLoc l;
  l.off = plane * p.inner + kGroup * k;
  l.mask = q;
  l.nv = min(kGroup, p.inner - kGroup * k);
  return l;
}

template <typename E>
__device__ __forceinline__ void nc_stats_phase(const KParams& p, const NcThread& n, Group<typename E::Bits>* cache,
                                               Welford<1>& s) {
  using Bits = typename E::Bits;
  constexpr int U = E::kBatch;
  s.init();
  const Bits* x = static_cast<const Bits*>(p.x);
  for (int i0 = 0; i0 < n.iters; i0 += U) {
    Group<Bits> v[U];
    int nv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (i0 + u < n.iters) {
        const NcLoc l = nc_loc(p, n, i0 + u);
        nv[u] = l.nv;
        load_group(v[u], x + l.off, l.nv);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + u;
      if (i < n.iters) {
        if (i < p.cache_iters) cache[n.slot(i)] = v[u];
        float f[kGroup];
#pragma unroll
        for (int j = 0; j < kGroup; ++j) f[j] = E::to_float(v[u].v[j]);
        push_group(s, f, nv[u]);
      }
    }
  }
}

template <typename E>
__device__ __forceinline__ void nc_apply_phase(const KParams& p, const NcThread& n,
                                               const Group<typename E::Bits>* cache, bool reverse, float mean,
                                               float scale, float shift) {
  using Bits = typename E::Bits;
  constexpr int U = E::kBatch;
  const Bits* x = static_cast<const Bits*>(p.x);
  const Bits* res = static_cast<const Bits*>(p.res);
  Bits* y = static_cast<Bits*>(p.y);
  for (int j0 = 0; j0 < n.iters; j0 += U) {
    Group<Bits> xv[U], rv[U];
    NcLoc l[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      if (j < n.iters) {
        const int i = reverse ? n.iters - 1 - j : j;
        l[u] = nc_loc(p, n, i);
        if (i < p.cache_iters)
          xv[u] = cache[n.slot(i)];
        else
          load_group(xv[u], x + l[u].off, l[u].nv);
        if (p.has_res) load_group(rv[u], res + l[u].off, l[u].nv);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (j0 + u < n.iters) {
        Group<Bits> out;
        const uint32_t bits = apply_group<E>(p, xv[u], rv[u], [&](int, float& m, float& sc, float& sh) {
          m = mean;
          sc = scale;
          sh = shift;
        }, out);
        store_group(y + l[u].off, out, l[u].nv);
        if (p.mask_out != nullptr) p.mask_out[l[u].mask] = static_cast<uint8_t>(bits & valid_bits(l[u].nv));
      }
    }
  }
}

template <typename E>
__device__ __forceinline__ void nc_bwd_reduce_phase(const KParams& p, const NcThread& n,
                                                    Group<typename E::Bits>* cache_x,
                                                    Group<typename E::Bits>* cache_g, Sums<1>& s) {
  using Bits = typename E::Bits;
  constexpr int U = E::kBatch;
  s.init();
  const Bits* dy = static_cast<const Bits*>(p.dy);
  const Bits* x = static_cast<const Bits*>(p.x);
  Bits* dres = static_cast<Bits*>(p.dres);
  Bits* dx = static_cast<Bits*>(p.dx);
  const float mean = p.mean_in[n.c];
  const float kdx = (p.weight != nullptr ? p.weight[n.c] : 1.f) * p.scale_in[n.c];
  // a thread sums up to thousands of elements of one channel: pairwise within a group, compensated
  // (Kahan) across groups, so the sums stay as accurate as a tree reduction
  float comp_g = 0.f, comp_gx = 0.f;
  for (int i0 = 0; i0 < n.iters; i0 += U) {
    Group<Bits> gv[U], xv[U];
    uint32_t bits[U];
    NcLoc l[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (i0 + u < n.iters) {
        l[u] = nc_loc(p, n, i0 + u);
        load_group(gv[u], dy + l[u].off, l[u].nv);
        bits[u] = p.relu ? static_cast<uint32_t>(p.mask_in[l[u].mask]) : 0xffu;
        if (p.do_sums) load_group(xv[u], x + l[u].off, l[u].nv);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + u;
      if (i < n.iters) {
        const Group<Bits> g = masked(gv[u], bits[u]);
        if (p.write_dres) store_group(dres + l[u].off, g, l[u].nv);
        if (i < p.cache_iters) {
          cache_g[n.slot(i)] = g;
          cache_x[n.slot(i)] = xv[u];
        }
        if (p.write_dx) {
          Group<Bits> o;
#pragma unroll
          for (int e = 0; e < kGroup; ++e) o.v[e] = E::from_float(kdx * E::to_float(g.v[e]));
          store_group(dx + l[u].off, o, l[u].nv);
        }
        if (p.do_sums) {  // padding elements are +0 in g: they add nothing
          float gs[kGroup], gxs[kGroup];
#pragma unroll
          for (int e = 0; e < kGroup; ++e) {
            gs[e] = E::to_float(g.v[e]);
            gxs[e] = gs[e] * (E::to_float(xv[u].v[e]) - mean);
          }
          kahan_add(s.g[0], comp_g, pairwise_sum(gs));
          kahan_add(s.gx[0], comp_gx, pairwise_sum(gxs));
        }
      }
    }
  }
  s.g[0] -= comp_g;
  s.gx[0] -= comp_gx;
}

template <typename E>
__device__ __forceinline__ void nc_dx_phase(const KParams& p, const NcThread& n, const Group<typename E::Bits>* cache_x,
                                            const Group<typename E::Bits>* cache_g, bool reverse, const DxCoef& d) {
  using Bits = typename E::Bits;
  constexpr int U = E::kBatch;
  const Bits* gsrc = static_cast<const Bits*>(p.dres_is_g ? p.dres : p.dy);
  const Bits* x = static_cast<const Bits*>(p.x);
  Bits* dx = static_cast<Bits*>(p.dx);
  for (int j0 = 0; j0 < n.iters; j0 += U) {
    Group<Bits> gv[U], xv[U];
    NcLoc l[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      if (j < n.iters) {
        const int i = reverse ? n.iters - 1 - j : j;
        l[u] = nc_loc(p, n, i);
        if (i < p.cache_iters) {
          gv[u] = cache_g[n.slot(i)];
          xv[u] = cache_x[n.slot(i)];
        } else {
          load_group(gv[u], gsrc + l[u].off, l[u].nv);
          if (!p.dres_is_g && p.relu) gv[u] = masked(gv[u], static_cast<uint32_t>(p.mask_in[l[u].mask]));
          load_group(xv[u], x + l[u].off, l[u].nv);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (j0 + u < n.iters) {
        Group<Bits> o;
#pragma unroll
        for (int e = 0; e < kGroup; ++e)
          o.v[e] = E::from_float(dx_value(d, E::to_float(gv[u].v[e]), E::to_float(xv[u].v[e])));
        store_group(dx + l[u].off, o, l[u].nv);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// two-pass kernels
// ------------------------------------------------------------------------------------------------

// 16-byte aligned dynamic shared memory
__device__ __forceinline__ float4* dynamic_smem() {
  extern __shared__ float4 resfused_dyn_smem[];
  return resfused_dyn_smem;
}

// grid (num_tiles, splits), block (TX, TY); dynamic smem: the Welford<8> tree
template <typename E>
__global__ void __launch_bounds__(kThreads) cl_stats_kernel(KParams p) {
  float* buf = reinterpret_cast<float*>(dynamic_smem());
  const ClThread t = cl_thread(p, blockIdx.x, blockIdx.y);
  Welford<kGroup> s;
  cl_stats_phase<E>(p, t, nullptr, s);
  block_tree_reduce(s, buf, t.tx, t.ty, t.TX, t.TY);
  cl_write_welford_partial(p, t, blockIdx.x, blockIdx.y, s);
}

// grid (C * splits), block (kThreads); dynamic smem: the Welford<1> tree
template <typename E>
__global__ void __launch_bounds__(kThreads) nchw_stats_kernel(KParams p) {
  float* buf = reinterpret_cast<float*>(dynamic_smem());
  const int c = blockIdx.x % p.C;
  const int split = blockIdx.x / p.C;
  const NcThread n = nc_thread(p, c, split);
  Welford<1> s;
  nc_stats_phase<E>(p, n, nullptr, s);
  block_tree_reduce(s, buf, 0, n.t, 1, n.T);
  if (n.t == 0) {
    p.pa[static_cast<int64_t>(split) * p.C + c] = s.mean[0];
    p.pb[static_cast<int64_t>(split) * p.C + c] = s.m2[0];
    if (c == 0) p.pn[split] = s.n;
  }
}

// grid ceil(C / 32), block (32, 16): merge the splits of each channel, write mean/invstd, update
// the running stats.
__global__ void __launch_bounds__(kFinalizeTX* kFinalizeTY) finalize_stats_kernel(KParams p) {
  __shared__ float buf[Welford<1>::kFloats * kFinalizeTX * (kFinalizeTY / 2)];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.x * kFinalizeTX + tx;
  Welford<1> s;
  s.init();
  if (c < p.C) {
    for (int r = ty; r < p.splits; r += kFinalizeTY) {
      Welford<1> o;
      o.n = p.pn[r];
      o.mean[0] = p.pa[static_cast<int64_t>(r) * p.C + c];
      o.m2[0] = p.pb[static_cast<int64_t>(r) * p.C + c];
      s.merge(o);
    }
  }
  block_tree_reduce(s, buf, tx, ty, kFinalizeTX, kFinalizeTY);
  if (ty == 0 && c < p.C) {
    float m, inv;
    finish_stats(p, c, s.mean[0], s.m2[0], m, inv, true);
  }
}

// grid ceil(C / 32), block (32, 16): grad_bias = sum g, grad_weight = invstd * sum g (x - mean).
__global__ void __launch_bounds__(kFinalizeTX* kFinalizeTY) finalize_sums_kernel(KParams p) {
  __shared__ float buf[Sums<1>::kFloats * kFinalizeTX * (kFinalizeTY / 2)];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.x * kFinalizeTX + tx;
  Sums<1> s;
  s.init();
  if (c < p.C) {
    for (int r = ty; r < p.splits; r += kFinalizeTY) {
      s.g[0] += p.pa[static_cast<int64_t>(r) * p.C + c];
      s.gx[0] += p.pb[static_cast<int64_t>(r) * p.C + c];
    }
  }
  block_tree_reduce(s, buf, tx, ty, kFinalizeTX, kFinalizeTY);
  if (ty == 0 && c < p.C) {
    p.grad_bias[c] = s.g[0];
    p.grad_weight[c] = p.M > 0 ? s.gx[0] * p.scale_in[c] : 0.f;  // empty batch: 0, not 0 * NaN
  }
}

// grid (num_tiles, splits), block (TX, TY): y, mask from x, residual and per-channel statistics
// (batch mean/invstd, or running mean/var when is_var).
template <typename E>
__global__ void __launch_bounds__(kThreads) cl_apply_kernel(KParams p) {
  __shared__ float prm[kApplyFields * kGroup * kMaxTX];
  const ClThread t = cl_thread(p, blockIdx.x, blockIdx.y);
  cl_store_apply_params(p, t, prm);
  __syncthreads();
  cl_apply_phase<E>(p, t, nullptr, false, prm);
}

// grid ceil(groups / (kThreads * U)), block kThreads: flat over all groups of all planes.
template <typename E>
__global__ void __launch_bounds__(kThreads) nchw_apply_kernel(KParams p) {
  using Bits = typename E::Bits;
  constexpr int U = E::kBatch;
  const Bits* x = static_cast<const Bits*>(p.x);
  const Bits* res = static_cast<const Bits*>(p.res);
  Bits* y = static_cast<Bits*>(p.y);
  const int64_t total = p.outer * p.gpr;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * (kThreads * U) + threadIdx.x;
  Group<Bits> xv[U], rv[U];
  NcLoc l[U];
  int ch[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t q = base + static_cast<int64_t>(u) * kThreads;
    if (q < total) {
      l[u] = nc_flat_loc(p, q, ch[u]);
      load_group(xv[u], x + l[u].off, l[u].nv);
      if (p.has_res) load_group(rv[u], res + l[u].off, l[u].nv);
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t q = base + static_cast<int64_t>(u) * kThreads;
    if (q < total) {
      float mean, scale, shift;
      apply_params(p, ch[u], mean, scale, shift);
      Group<Bits> out;
      const uint32_t bits = apply_group<E>(p, xv[u], rv[u], [&](int, float& m, float& sc, float& sh) {
        m = mean;
        sc = scale;
        sh = shift;
      }, out);
      store_group(y + l[u].off, out, l[u].nv);
      if (p.mask_out != nullptr) p.mask_out[l[u].mask] = static_cast<uint8_t>(bits & valid_bits(l[u].nv));
    }
  }
}

// grid (num_tiles, splits), block (TX, TY): g = dy * mask (written as the residual's gradient when
// asked), eval dx = k * g, and per-block partial sums when do_sums.
template <typename E>
__global__ void __launch_bounds__(kThreads) cl_bwd_reduce_kernel(KParams p) {
  __shared__ float prm[kReduceFields * kGroup * kMaxTX];
  float* buf = reinterpret_cast<float*>(dynamic_smem());
  const ClThread t = cl_thread(p, blockIdx.x, blockIdx.y);
  cl_store_reduce_params(p, t, prm);
  __syncthreads();
  Sums<kGroup> s;
  cl_bwd_reduce_phase<E>(p, t, nullptr, nullptr, prm, s);
  if (!p.do_sums) return;  // uniform over the grid
  block_tree_reduce(s, buf, t.tx, t.ty, t.TX, t.TY);
  cl_write_sums_partial(p, t, blockIdx.y, s);
}

template <typename E>
__global__ void __launch_bounds__(kThreads) nchw_bwd_reduce_kernel(KParams p) {
  float* buf = reinterpret_cast<float*>(dynamic_smem());
  const int c = blockIdx.x % p.C;
  const int split = blockIdx.x / p.C;
  const NcThread n = nc_thread(p, c, split);
  Sums<1> s;
  nc_bwd_reduce_phase<E>(p, n, nullptr, nullptr, s);
  if (!p.do_sums) return;
  block_tree_reduce(s, buf, 0, n.t, 1, n.T);
  if (n.t == 0) {
    p.pa[static_cast<int64_t>(split) * p.C + c] = s.g[0];
    p.pb[static_cast<int64_t>(split) * p.C + c] = s.gx[0];
  }
}

// grid (num_tiles, splits), block (TX, TY): training dx from g (or dy and mask), x and the sums in
// grad_bias/grad_weight.
template <typename E>
__global__ void __launch_bounds__(kThreads) cl_dx_kernel(KParams p) {
  __shared__ float prm[kDxFields * kGroup * kMaxTX];
  const ClThread t = cl_thread(p, blockIdx.x, blockIdx.y);
  if (t.ty == 0 && t.active) {
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const int c = min(kGroup * t.k + j, p.C - 1);  // padding lanes reuse a valid channel, never stored
      cl_store_dx_params(t, prm, dx_coef(p, c, p.grad_bias[c], p.grad_weight[c]), j);
    }
  }
  __syncthreads();
  cl_dx_phase<E>(p, t, nullptr, nullptr, false, prm);
}

template <typename E>
__global__ void __launch_bounds__(kThreads) nchw_dx_kernel(KParams p) {
  using Bits = typename E::Bits;
  constexpr int U = E::kBatch;
  const Bits* gsrc = static_cast<const Bits*>(p.dres_is_g ? p.dres : p.dy);
  const Bits* x = static_cast<const Bits*>(p.x);
  Bits* dx = static_cast<Bits*>(p.dx);
  const int64_t total = p.outer * p.gpr;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * (kThreads * U) + threadIdx.x;
  Group<Bits> gv[U], xv[U];
  NcLoc l[U];
  int ch[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t q = base + static_cast<int64_t>(u) * kThreads;
    if (q < total) {
      l[u] = nc_flat_loc(p, q, ch[u]);
      load_group(gv[u], gsrc + l[u].off, l[u].nv);
      if (!p.dres_is_g && p.relu) gv[u] = masked(gv[u], static_cast<uint32_t>(p.mask_in[l[u].mask]));
      load_group(xv[u], x + l[u].off, l[u].nv);
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t q = base + static_cast<int64_t>(u) * kThreads;
    if (q < total) {
      const DxCoef d = dx_coef(p, ch[u], p.grad_bias[ch[u]], p.grad_weight[ch[u]]);
      Group<Bits> o;
#pragma unroll
      for (int e = 0; e < kGroup; ++e)
        o.v[e] = E::from_float(dx_value(d, E::to_float(gv[u].v[e]), E::to_float(xv[u].v[e])));
      store_group(dx + l[u].off, o, l[u].nv);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// persistent kernels: cooperative launch, grid (num_tiles * splits), one grid-wide sync.
// Dynamic smem: [cache: cache_iters * threads groups (x2 in backward)] [reduction tree]
// ------------------------------------------------------------------------------------------------

// Merge all splits of the thread's 8 channels (cross-block data: read through L2 with __ldcg).
// Returns the merged state at ty == 0.
__device__ __forceinline__ void cl_merge_welford(const KParams& p, const ClThread& t, float* buf, Welford<kGroup>& s) {
  s.init();
  if (t.active) {
    for (int r = t.ty; r < p.splits; r += t.TY) {
      Welford<kGroup> o;
      o.n = __ldcg(p.pn + r);
      const int64_t base = static_cast<int64_t>(r) * p.C + kGroup * t.k;
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        o.mean[j] = j < t.nv ? __ldcg(p.pa + base + j) : 0.f;
        o.m2[j] = j < t.nv ? __ldcg(p.pb + base + j) : 0.f;
      }
      s.merge(o);
    }
  }
  block_tree_reduce(s, buf, t.tx, t.ty, t.TX, t.TY);
}

template <typename E>
__global__ void __launch_bounds__(kPersistentThreads, 1) cl_fwd_persistent_kernel(KParams p) {
  using Bits = typename E::Bits;
  const int tile = blockIdx.x % p.num_tiles;
  const int split = blockIdx.x / p.num_tiles;
  const ClThread t = cl_thread(p, tile, split);
  Group<Bits>* cache = reinterpret_cast<Group<Bits>*>(dynamic_smem());
  float* buf = reinterpret_cast<float*>(cache + static_cast<size_t>(p.cache_iters) * t.TX * t.TY);
  float* prm = buf + p.tree_floats;

  Welford<kGroup> s;
  cl_stats_phase<E>(p, t, cache, s);
  block_tree_reduce(s, buf, t.tx, t.ty, t.TX, t.TY);
  cl_write_welford_partial(p, t, tile, split, s);
  __threadfence();
  cg::this_grid().sync();

  cl_merge_welford(p, t, buf, s);
  if (t.ty == 0 && t.active) {  // ty == 0 holds the merged state: share the apply parameters
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const int c = kGroup * t.k + j;
      float m = 0.f, inv = 0.f;
      if (j < t.nv) finish_stats(p, c, s.mean[j], s.m2[j], m, inv, split == 0);
      const bool ok = j < t.nv;
      t.set_prm(prm, 0, j, m);
      t.set_prm(prm, 1, j, ok ? (p.weight != nullptr ? p.weight[c] : 1.f) * inv : 0.f);
      t.set_prm(prm, 2, j, ok && p.bias != nullptr ? p.bias[c] : 0.f);
    }
  }
  __syncthreads();
  cl_apply_phase<E>(p, t, cache, true, prm);
}

template <typename E>
__global__ void __launch_bounds__(kPersistentThreads, 1) nchw_fwd_persistent_kernel(KParams p) {
  using Bits = typename E::Bits;
  const int c = blockIdx.x % p.C;
  const int split = blockIdx.x / p.C;
  const NcThread n = nc_thread(p, c, split);
  Group<Bits>* cache = reinterpret_cast<Group<Bits>*>(dynamic_smem());
  float* buf = reinterpret_cast<float*>(cache + static_cast<size_t>(p.cache_iters) * n.T);

  Welford<1> s;
  nc_stats_phase<E>(p, n, cache, s);
  block_tree_reduce(s, buf, 0, n.t, 1, n.T);
  if (n.t == 0) {
    p.pa[static_cast<int64_t>(split) * p.C + c] = s.mean[0];
    p.pb[static_cast<int64_t>(split) * p.C + c] = s.m2[0];
    if (c == 0) p.pn[split] = s.n;
  }
  __threadfence();
  cg::this_grid().sync();

  s.init();
  for (int r = n.t; r < p.splits; r += n.T) {
    Welford<1> o;
    o.n = __ldcg(p.pn + r);
    o.mean[0] = __ldcg(p.pa + static_cast<int64_t>(r) * p.C + c);
    o.m2[0] = __ldcg(p.pb + static_cast<int64_t>(r) * p.C + c);
    s.merge(o);
  }
  block_tree_reduce(s, buf, 0, n.t, 1, n.T);
  if (n.t == 0) {
    float m, inv;
    finish_stats(p, c, s.mean[0], s.m2[0], m, inv, split == 0);
    buf[0] = m;
    buf[1] = inv;
  }
  __syncthreads();
  const float mean = buf[0];
  const float scale = (p.weight != nullptr ? p.weight[c] : 1.f) * buf[1];
  const float shift = p.bias != nullptr ? p.bias[c] : 0.f;
  nc_apply_phase<E>(p, n, cache, true, mean, scale, shift);
}

template <typename E>
__global__ void __launch_bounds__(kPersistentThreads, 1) cl_bwd_persistent_kernel(KParams p) {
  using Bits = typename E::Bits;
  const int tile = blockIdx.x % p.num_tiles;
  const int split = blockIdx.x / p.num_tiles;
  const ClThread t = cl_thread(p, tile, split);
  const size_t cached = static_cast<size_t>(p.cache_iters) * t.TX * t.TY;
  Group<Bits>* cache_x = reinterpret_cast<Group<Bits>*>(dynamic_smem());
  Group<Bits>* cache_g = cache_x + cached;
  float* buf = reinterpret_cast<float*>(cache_g + cached);
  float* prm = buf + p.tree_floats;

  cl_store_reduce_params(p, t, prm);
  __syncthreads();
  Sums<kGroup> s;
  cl_bwd_reduce_phase<E>(p, t, cache_x, cache_g, prm, s);
  block_tree_reduce(s, buf, t.tx, t.ty, t.TX, t.TY);
  cl_write_sums_partial(p, t, split, s);
  __threadfence();
  cg::this_grid().sync();

  s.init();
  if (t.active) {
    for (int r = t.ty; r < p.splits; r += t.TY) {
      const int64_t base = static_cast<int64_t>(r) * p.C + kGroup * t.k;
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        s.g[j] += j < t.nv ? __ldcg(p.pa + base + j) : 0.f;
        s.gx[j] += j < t.nv ? __ldcg(p.pb + base + j) : 0.f;
      }
    }
  }
  block_tree_reduce(s, buf, t.tx, t.ty, t.TX, t.TY);
  // the reduce parameters are dead once every thread passed the tree: reuse prm for dx's
  if (t.ty == 0 && t.active) {
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const int c = min(kGroup * t.k + j, p.C - 1);  // padding lanes reuse a valid channel, never stored
      const float sg = s.g[j];
      const float sgx = s.gx[j] * p.scale_in[c];
      if (split == 0 && j < t.nv) {
        p.grad_bias[c] = sg;
        p.grad_weight[c] = sgx;
      }
      cl_store_dx_params(t, prm, dx_coef(p, c, sg, sgx), j);
    }
  }
  __syncthreads();
  cl_dx_phase<E>(p, t, cache_x, cache_g, true, prm);
}

template <typename E>
__global__ void __launch_bounds__(kPersistentThreads, 1) nchw_bwd_persistent_kernel(KParams p) {
  using Bits = typename E::Bits;
  const int c = blockIdx.x % p.C;
  const int split = blockIdx.x / p.C;
  const NcThread n = nc_thread(p, c, split);
  const size_t cached = static_cast<size_t>(p.cache_iters) * n.T;
  Group<Bits>* cache_x = reinterpret_cast<Group<Bits>*>(dynamic_smem());
  Group<Bits>* cache_g = cache_x + cached;
  float* buf = reinterpret_cast<float*>(cache_g + cached);

  Sums<1> s;
  nc_bwd_reduce_phase<E>(p, n, cache_x, cache_g, s);
  block_tree_reduce(s, buf, 0, n.t, 1, n.T);
  if (n.t == 0) {
    p.pa[static_cast<int64_t>(split) * p.C + c] = s.g[0];
    p.pb[static_cast<int64_t>(split) * p.C + c] = s.gx[0];
  }
  __threadfence();
  cg::this_grid().sync();

  s.init();
  for (int r = n.t; r < p.splits; r += n.T) {
    s.g[0] += __ldcg(p.pa + static_cast<int64_t>(r) * p.C + c);
    s.gx[0] += __ldcg(p.pb + static_cast<int64_t>(r) * p.C + c);
  }
  block_tree_reduce(s, buf, 0, n.t, 1, n.T);
  if (n.t == 0) {
    const float sg = s.g[0];
    const float sgx = s.gx[0] * p.scale_in[c];
    if (split == 0) {
      p.grad_bias[c] = sg;
      p.grad_weight[c] = sgx;
    }
    buf[0] = sg;
    buf[1] = sgx;
  }
  __syncthreads();
  const DxCoef d = dx_coef(p, c, buf[0], buf[1]);
  nc_dx_phase<E>(p, n, cache_x, cache_g, true, d);
}

// ------------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------------

struct DeviceInfo {
  int sms = 0, smem_per_sm = 0, smem_optin = 0, smem_reserved = 0, coop = 0;
};

const DeviceInfo& device_info(int device) {
  static std::mutex mu;
  static DeviceInfo infos[64];
  static bool ready[64] = {};
  TORCH_CHECK(device >= 0 && device < 64, "resfused_cuda: device index ", device, " out of range");
  std::lock_guard<std::mutex> lock(mu);
  if (!ready[device]) {
    DeviceInfo& d = infos[device];
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_reserved, cudaDevAttrReservedSharedMemoryPerBlock, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.coop, cudaDevAttrCooperativeLaunch, device));
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
  const int dyn = device_info(device).smem_optin - static_cast<int>(attr.sharedSizeBytes);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dyn));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                      static_cast<int>(cudaSharedmemCarveoutMaxShared)));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int pow2_at_least(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// channels_last block shape: TX threads across 8-channel groups (a power of two <= 32), TY rows.
int cl_tx(int gpr) { return std::min(32, pow2_at_least(std::max(gpr, 1))); }

int esize(DType t) { return t == DType::kFloat ? 4 : 2; }

struct Geo {
  bool cl;
  int64_t outer, M;
  int inner, gpr, C;
  int64_t batch;
};

Geo geometry(const Shape& s) {
  Geo g;
  g.cl = s.layout == Layout::kChannelsLast;
  g.C = static_cast<int>(s.c);
  g.batch = s.n;
  g.M = s.n * s.hw;
  g.outer = g.cl ? s.n * s.hw : s.n * s.c;
  g.inner = static_cast<int>(g.cl ? s.c : s.hw);
  g.gpr = static_cast<int>(ceil_div(g.inner, kGroup));
  return g;
}

// Elements of work along the split axis and threads sharing it: cl rows / TY, nchw groups / threads.
int64_t split_work(const Geo& g) { return g.cl ? g.outer : g.batch * g.gpr; }

template <typename E>
struct Kernels {
  static const void* fwd_persistent(bool cl) {
    return cl ? reinterpret_cast<const void*>(&cl_fwd_persistent_kernel<E>)
              : reinterpret_cast<const void*>(&nchw_fwd_persistent_kernel<E>);
  }
  static const void* bwd_persistent(bool cl) {
    return cl ? reinterpret_cast<const void*>(&cl_bwd_persistent_kernel<E>)
              : reinterpret_cast<const void*>(&nchw_bwd_persistent_kernel<E>);
  }
  static const void* reduce(bool cl, bool backward) {
    if (backward)
      return cl ? reinterpret_cast<const void*>(&cl_bwd_reduce_kernel<E>)
                : reinterpret_cast<const void*>(&nchw_bwd_reduce_kernel<E>);
    return cl ? reinterpret_cast<const void*>(&cl_stats_kernel<E>)
              : reinterpret_cast<const void*>(&nchw_stats_kernel<E>);
  }
};

const void* persistent_kernel(DType t, bool cl, bool backward) {
  switch (t) {
    case DType::kFloat:
      return backward ? Kernels<F32>::bwd_persistent(cl) : Kernels<F32>::fwd_persistent(cl);
    case DType::kHalf:
      return backward ? Kernels<F16>::bwd_persistent(cl) : Kernels<F16>::fwd_persistent(cl);
    default:
      return backward ? Kernels<BF16>::bwd_persistent(cl) : Kernels<BF16>::fwd_persistent(cl);
  }
}

const void* reduce_kernel(DType t, bool cl, bool backward) {
  switch (t) {
    case DType::kFloat:
      return Kernels<F32>::reduce(cl, backward);
    case DType::kHalf:
      return Kernels<F16>::reduce(cl, backward);
    default:
      return Kernels<BF16>::reduce(cl, backward);
  }
}

// Reduction-tree floats of a block: Welford (forward) or Sums (backward), 8 channels (cl) or 1.
int64_t tree_floats(const Geo& g, int tx, int ty, bool backward) {
  const int per = g.cl ? (backward ? Sums<kGroup>::kFloats : Welford<kGroup>::kFloats)
                       : (backward ? Sums<1>::kFloats : Welford<1>::kFloats);
  // persistent kernels also broadcast 2 x 8 x TX floats through the same buffer
  return std::max<int64_t>(static_cast<int64_t>(per) * tx * std::max(ty / 2, 1), 2 * kGroup * tx);
}

// Shared per-channel parameter floats of a persistent channels_last block (nchw keeps them in registers).
int64_t prm_floats(const Geo& g, int tx, bool backward) {
  return g.cl ? static_cast<int64_t>(backward ? kDxFields : kApplyFields) * kGroup * tx : 0;
}

// Two-pass partition of the reduction: enough blocks for one full wave.
void plan_two_pass(const Shape& s, bool backward, Plan& plan) {
  const Geo g = geometry(s);
  plan.scheme = Scheme::kTwoPass;
  const int64_t work = split_work(g);
  if (g.C == 0 || work == 0) {
    plan.num_tiles = 0;
    plan.splits = 0;
    plan.workspace_floats = 0;
    return;
  }
  const DeviceInfo& info = device_info(s.device);
  int tx = 1, ty = kThreads;
  if (g.cl) {
    tx = cl_tx(g.gpr);
    ty = kThreads / tx;
  }
  const int num_tiles = g.cl ? static_cast<int>(ceil_div(g.gpr, tx)) : g.C;
  const size_t smem = static_cast<size_t>(tree_floats(g, tx, ty, backward)) * sizeof(float);
  int occ = 0;
  C10_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, reduce_kernel(s.dtype, g.cl, backward), kThreads, smem));
  const int64_t wave = static_cast<int64_t>(std::max(occ, 1)) * info.sms;
  int64_t splits = std::max<int64_t>(1, ceil_div(wave, num_tiles));
  // at least a few steps per thread: fewer partials to write and merge for small tensors
  splits = std::min<int64_t>(splits, ceil_div(work, static_cast<int64_t>(ty) * kMinStepsPerThread));
  splits = std::min<int64_t>(splits, 65535);
  const int64_t per_block = ceil_div(work, splits);
  splits = ceil_div(work, per_block);
  plan.num_tiles = num_tiles;
  plan.splits = static_cast<int>(splits);
  plan.per_block = per_block;
  plan.workspace_floats = 2 * splits * g.C + splits;
}

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

// Persistent plan: co-resident grid (occupancy-confirmed), x (and g) cached in shared memory.
bool plan_persistent(const Shape& s, bool backward, Plan& plan) {
  const Geo g = geometry(s);
  const int64_t work = split_work(g);
  if (g.C == 0 || work == 0) return false;
  const DeviceInfo& info = device_info(s.device);
  if (!info.coop) return false;
  const void* kernel = persistent_kernel(s.dtype, g.cl, backward);
  allow_max_smem(kernel, s.device);
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));

  const int threads = kPersistentThreads;
  int tx = 1, ty = threads;
  if (g.cl) {
    tx = cl_tx(g.gpr);
    ty = threads / tx;
  }
  const int num_tiles = g.cl ? static_cast<int>(ceil_div(g.gpr, tx)) : g.C;
  const int64_t per_thread_div = g.cl ? ty : threads;
  const int64_t group_bytes = static_cast<int64_t>(kGroup) * esize(s.dtype) * (backward ? 2 : 1);
  const int64_t tree_bytes =
      (tree_floats(g, tx, ty, backward) + prm_floats(g, tx, backward)) * static_cast<int64_t>(sizeof(float));
  const int64_t cache_cap = persistent_cache_cap();

  Plan best;
  bool have_partial = false;
  for (int bps : {2, 1}) {
    int64_t splits = static_cast<int64_t>(bps) * info.sms / num_tiles;
    splits = std::min<int64_t>(splits, ceil_div(work, per_thread_div));
    if (splits < 1) continue;
    const int64_t per_block = ceil_div(work, splits);
    splits = ceil_div(work, per_block);
    const int iters = static_cast<int>(ceil_div(per_block, per_thread_div));
    const int64_t per_block_smem =
        std::min<int64_t>(info.smem_optin, info.smem_per_sm / bps - info.smem_reserved) -
        static_cast<int64_t>(attr.sharedSizeBytes);
    int64_t room = per_block_smem - tree_bytes;
    if (room < 0) continue;
    if (cache_cap >= 0) room = std::min(room, cache_cap);
    const int cache_iters =
        static_cast<int>(std::min<int64_t>(iters, room / (static_cast<int64_t>(threads) * group_bytes)));
    const size_t smem = static_cast<size_t>(cache_iters) * threads * group_bytes + tree_bytes;
    int occ = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, threads, smem));
    const int64_t grid = splits * num_tiles;
    if (static_cast<int64_t>(occ) * info.sms < grid || grid > 0x7fffffff) continue;  // not co-resident
    Plan cand;
    cand.scheme = Scheme::kPersistent;
    cand.num_tiles = num_tiles;
    cand.splits = static_cast<int>(splits);
    cand.per_block = per_block;
    cand.grid = static_cast<int>(grid);
    cand.threads = threads;
    cand.smem = smem;
    cand.cache_iters = cache_iters;
    cand.iters = iters;
    cand.workspace_floats = 2 * splits * g.C + splits;
    if (cache_iters == iters) {  // the whole slice stays on chip
      plan = cand;
      return true;
    }
    if (!have_partial) {
      best = cand;
      have_partial = true;
    }
  }
  if (have_partial) plan = best;
  return have_partial;
}

Scheme resolve(Scheme requested) {
  return requested == Scheme::kTwoPass ? Scheme::kTwoPass : Scheme::kPersistent;
}

KParams base_params(const Geo& g, const Plan& plan) {
  // Group indices are 32-bit in the kernels (FastDiv): N*C*ceil(H*W/8) < 2^31.
  TORCH_CHECK(g.outer * static_cast<int64_t>(g.gpr) < (int64_t{1} << 31),
              "resfused_cuda: tensor too large (more than 2^31 groups of 8 elements)");
  KParams p{};
  p.outer = g.outer;
  p.batch = g.batch;
  p.M = g.M;
  p.inner = g.inner;
  p.gpr = g.gpr;
  p.C = g.C;
  p.num_tiles = plan.num_tiles;
  p.splits = plan.splits;
  p.count = static_cast<float>(g.M);
  p.gpr_div = FastDiv(static_cast<uint32_t>(std::max(g.gpr, 1)));
  p.c_div = FastDiv(static_cast<uint32_t>(std::max(g.C, 1)));
  return p;
}

void set_partials(KParams& p, float* workspace, int splits, int C) {
  if (workspace == nullptr) return;  // no reduction in this call
  p.pa = workspace;
  p.pb = workspace + static_cast<int64_t>(splits) * C;
  p.pn = workspace + 2 * static_cast<int64_t>(splits) * C;
}

// Two-pass elementwise launch (apply / dx): channels_last (tiles, splits) grid with a few batches per
// thread, or a flat grid over nchw groups.
struct ElementwiseGrid {
  dim3 grid, block;
  int64_t per_block;
};

template <typename E>
ElementwiseGrid elementwise_grid(const Geo& g) {
  ElementwiseGrid e;
  if (g.cl) {
    const int tx = cl_tx(g.gpr), ty = kThreads / tx;
    // a few batches per thread; more rows per block where the grid's y limit needs it
    const int64_t rows_per_block =
        std::max<int64_t>(static_cast<int64_t>(ty) * E::kBatch * kApplyBatches, ceil_div(g.outer, 65535));
    e.per_block = rows_per_block;
    e.grid = dim3(static_cast<unsigned>(ceil_div(g.gpr, tx)), static_cast<unsigned>(ceil_div(g.outer, rows_per_block)));
    e.block = dim3(tx, ty);
  } else {
    const int64_t groups = g.outer * g.gpr;
    e.per_block = 0;
    e.grid = dim3(static_cast<unsigned>(ceil_div(groups, static_cast<int64_t>(kThreads) * E::kBatch)));
    e.block = dim3(kThreads);
  }
  return e;
}

template <typename E>
void launch_apply(const Geo& g, KParams p, cudaStream_t stream) {
  if (g.outer == 0 || g.gpr == 0) return;
  const ElementwiseGrid e = elementwise_grid<E>(g);
  p.per_block = e.per_block;
  p.cache_iters = 0;
  if (g.cl) {
    cl_apply_kernel<E><<<e.grid, e.block, 0, stream>>>(p);
  } else {
    nchw_apply_kernel<E><<<e.grid, e.block, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Two-pass reduction launch (statistics or backward sums) over plan.num_tiles x plan.splits blocks.
template <typename E>
void launch_reduce(const Geo& g, const Plan& plan, KParams p, bool backward, cudaStream_t stream) {
  if (plan.splits == 0) return;
  int tx = 1, ty = kThreads;
  if (g.cl) {
    tx = cl_tx(g.gpr);
    ty = kThreads / tx;
  }
  p.per_block = plan.per_block;
  p.cache_iters = 0;
  const size_t smem = static_cast<size_t>(tree_floats(g, tx, ty, backward)) * sizeof(float);
  if (g.cl) {
    const dim3 grid(plan.num_tiles, plan.splits), block(tx, ty);
    if (backward)
      cl_bwd_reduce_kernel<E><<<grid, block, smem, stream>>>(p);
    else
      cl_stats_kernel<E><<<grid, block, smem, stream>>>(p);
  } else {
    const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(plan.splits) * g.C)), block(kThreads);
    if (backward)
      nchw_bwd_reduce_kernel<E><<<grid, block, smem, stream>>>(p);
    else
      nchw_stats_kernel<E><<<grid, block, smem, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_finalize(const Geo& g, const KParams& p, bool backward, cudaStream_t stream) {
  if (g.C == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(g.C, kFinalizeTX))), block(kFinalizeTX, kFinalizeTY);
  if (backward)
    finalize_sums_kernel<<<grid, block, 0, stream>>>(p);
  else
    finalize_stats_kernel<<<grid, block, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename E>
void launch_persistent(const Geo& g, const Plan& plan, KParams p, bool backward, cudaStream_t stream) {
  const int threads = plan.threads;
  int tx = 1, ty = threads;  // nchw: 1-D blocks, the tree runs along threadIdx.x
  if (g.cl) {
    tx = cl_tx(g.gpr);
    ty = threads / tx;
  }
  const dim3 block = g.cl ? dim3(tx, ty) : dim3(threads);
  p.per_block = plan.per_block;
  p.cache_iters = plan.cache_iters;
  p.tree_floats = static_cast<int>(tree_floats(g, tx, ty, backward));
  const void* kernel;
  if (backward)
    kernel = g.cl ? reinterpret_cast<const void*>(&cl_bwd_persistent_kernel<E>)
                  : reinterpret_cast<const void*>(&nchw_bwd_persistent_kernel<E>);
  else
    kernel = g.cl ? reinterpret_cast<const void*>(&cl_fwd_persistent_kernel<E>)
                  : reinterpret_cast<const void*>(&nchw_fwd_persistent_kernel<E>);
  void* args[] = {&p};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, dim3(plan.grid), block, args, plan.smem, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename E>
void forward_train_impl(const Shape& s, const Plan& plan, const ForwardTrainArgs& a, cudaStream_t stream) {
  const Geo g = geometry(s);
  if (g.C == 0) return;
  KParams p = base_params(g, plan);
  p.x = a.x;
  p.res = a.residual;
  p.y = a.y;
  p.mask_out = a.mask;
  p.weight = a.weight;
  p.bias = a.bias;
  p.mean_out = a.mean;
  p.invstd_out = a.invstd;
  // An empty batch (N*H*W == 0) has no statistics and, as in the reference and torch, leaves the
  // running statistics untouched (finish_stats would otherwise blend in NaN).
  p.running_mean = g.M > 0 ? a.running_mean : nullptr;
  p.running_var = g.M > 0 ? a.running_var : nullptr;
  p.eps = static_cast<float>(a.eps);
  p.momentum = static_cast<float>(a.momentum);
  p.keep = static_cast<float>(1.0 - a.momentum);
  p.unbias = static_cast<float>(static_cast<double>(g.M) / static_cast<double>(std::max<int64_t>(g.M - 1, 1)));
  p.relu = a.relu;
  p.has_res = a.residual != nullptr;
  set_partials(p, a.workspace, plan.splits, g.C);

  if (plan.scheme == Scheme::kPersistent) {
    launch_persistent<E>(g, plan, p, false, stream);
    return;
  }
  launch_reduce<E>(g, plan, p, false, stream);
  launch_finalize(g, p, false, stream);
  p.mean_in = a.mean;
  p.scale_in = a.invstd;
  p.is_var = false;
  launch_apply<E>(g, p, stream);
}

template <typename E>
void forward_eval_impl(const Shape& s, const ForwardEvalArgs& a, cudaStream_t stream) {
  const Geo g = geometry(s);
  if (g.C == 0) return;
  KParams p = base_params(g, Plan());
  p.x = a.x;
  p.res = a.residual;
  p.y = a.y;
  p.mask_out = a.mask;
  p.weight = a.weight;
  p.bias = a.bias;
  p.mean_in = a.running_mean;
  p.scale_in = a.running_var;
  p.is_var = true;
  p.eps = static_cast<float>(a.eps);
  p.relu = a.relu;
  p.has_res = a.residual != nullptr;
  launch_apply<E>(g, p, stream);
}

template <typename E>
void backward_impl(const Shape& s, const Plan& plan, const BackwardArgs& a, cudaStream_t stream) {
  const Geo g = geometry(s);
  if (g.C == 0) return;
  KParams p = base_params(g, plan);
  p.dy = a.grad_out;
  p.x = a.x;
  p.mask_in = a.mask;
  p.mean_in = a.mean;
  p.scale_in = a.invstd;
  p.weight = a.weight;
  p.dx = a.grad_input;
  p.dres = a.grad_residual;
  p.grad_weight = a.grad_weight;
  p.grad_bias = a.grad_bias;
  p.relu = a.relu;
  p.write_dres = a.need_residual_grad;
  set_partials(p, a.workspace, plan.splits, g.C);

  const bool train_dx = a.training && a.need_input_grad;
  p.do_sums = a.need_weight_grad || train_dx;
  if (plan.scheme == Scheme::kPersistent) {  // only planned for train_dx
    p.dres_is_g = a.need_residual_grad;
    launch_persistent<E>(g, plan, p, true, stream);
    return;
  }
  p.write_dx = a.need_input_grad && !a.training;
  if (p.do_sums || p.write_dres || p.write_dx) launch_reduce<E>(g, plan, p, true, stream);
  if (p.do_sums) launch_finalize(g, p, true, stream);
  if (train_dx && g.outer > 0 && g.gpr > 0) {
    p.write_dx = false;
    p.dres_is_g = a.need_residual_grad;
    const ElementwiseGrid e = elementwise_grid<E>(g);
    p.per_block = e.per_block;
    p.cache_iters = 0;
    if (g.cl)
      cl_dx_kernel<E><<<e.grid, e.block, 0, stream>>>(p);
    else
      nchw_dx_kernel<E><<<e.grid, e.block, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Plans are pure functions of (shape, dtype, layout, device, scheme, cache cap, what is computed):
// computed once, then served from a cache, so steady-state calls (and CUDA graph capture after a
// warm-up) make no CUDA API calls besides the launches.
Plan cached_plan(const Shape& s, Scheme requested, int kind, const std::function<Plan()>& make) {
  using Key = std::tuple<int, int, int64_t, int64_t, int64_t, int, int, int64_t, int>;
  static std::mutex mu;
  static std::map<Key, Plan> cache;
  const Key key{static_cast<int>(s.dtype), static_cast<int>(s.layout), s.n, s.c, s.hw, s.device,
                static_cast<int>(resolve(requested)), persistent_cache_cap(), kind};
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
  return cached_plan(s, requested, 0, [&] {
    Plan plan;
    if (resolve(requested) == Scheme::kPersistent && plan_persistent(s, false, plan)) return plan;
    plan_two_pass(s, false, plan);
    return plan;
  });
}

Plan plan_backward(const Shape& s, Scheme requested, bool training, bool need_input_grad, bool need_residual_grad,
                   bool need_weight_grad) {
  (void)need_residual_grad;
  const bool train_dx = training && need_input_grad;
  const bool sums = need_weight_grad || train_dx;
  return cached_plan(s, requested, 1 + 2 * train_dx + sums, [&] {
    Plan plan;
    if (train_dx && resolve(requested) == Scheme::kPersistent && plan_persistent(s, true, plan)) return plan;
    plan_two_pass(s, true, plan);
    if (!sums) plan.workspace_floats = 0;
    return plan;
  });
}

void launch_forward_train(const Shape& s, const Plan& plan, const ForwardTrainArgs& a, cudaStream_t stream) {
  switch (s.dtype) {
    case DType::kFloat:
      return forward_train_impl<F32>(s, plan, a, stream);
    case DType::kHalf:
      return forward_train_impl<F16>(s, plan, a, stream);
    case DType::kBFloat16:
      return forward_train_impl<BF16>(s, plan, a, stream);
  }
}

void launch_forward_eval(const Shape& s, const ForwardEvalArgs& a, cudaStream_t stream) {
  switch (s.dtype) {
    case DType::kFloat:
      return forward_eval_impl<F32>(s, a, stream);
    case DType::kHalf:
      return forward_eval_impl<F16>(s, a, stream);
    case DType::kBFloat16:
      return forward_eval_impl<BF16>(s, a, stream);
  }
}

void launch_backward(const Shape& s, const Plan& plan, const BackwardArgs& a, cudaStream_t stream) {
  switch (s.dtype) {
    case DType::kFloat:
      return backward_impl<F32>(s, plan, a, stream);
    case DType::kHalf:
      return backward_impl<F16>(s, plan, a, stream);
    case DType::kBFloat16:
      return backward_impl<BF16>(s, plan, a, stream);
  }
}

}  // namespace resfused
