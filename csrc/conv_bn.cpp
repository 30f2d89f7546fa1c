// Convolutions with BatchNorm fused in, for training: the cuda backend's conv parts of the resfused::conv_bn_*
// ops (contract: resfused/reference/conv_bn.py; the Python side is resfused/ops/conv_bn_cuda.py).
//
//   conv_bn_forward(x, w, scale?, shift?, ...)   y = conv(relu(x * scale + shift)) (or conv(x) without a
//                                                 prologue) and, with stats, y's per-channel batch mean and
//                                                 biased variance
//   conv_bn_wgrad(grad_y, x, scale?, shift?, ...) dW = wgrad(relu(x * scale + shift), grad_y)
//   conv_bn_plan(...)                              which path a call takes, as a string
//
// Built on cuDNN's graph API (the backend descriptors of cudnn.h, the API under cuDNN's frontend and ATen's
// own v8 convolutions): one operation graph per call site,
//   forward:  X -> [mul scale -> add shift -> relu] -> conv fprop -> Y -> genstats (sum, sum of squares)
//   wgrad:    X -> [mul scale -> add shift -> relu] -> conv wgrad(dY) -> dW
// with the bracketed prologue and the intermediate A virtual: the normalized activation is computed on the
// input tiles inside the conv's mainloop and never written, and the statistics come from the conv's
// epilogue. These are the ConvBNfprop and scale-bias-ReLU-wgrad fusions cuDNN's runtime-fusion engines
// implement for NHWC half/bfloat16 on Ampere and Hopper (the recipe of NVIDIA's MLPerf ResNet-50).
//
// Each graph is finalized once per (shapes, canonical strides, dtype, geometry, flags, handle) and cached with
// its execution plan (bounded, least recently used evicted; built outside the cache's lock: csrc/plan_cache.h);
// cuDNN's heuristics (mode A, then FALLBACK) rank the engines, and engines are filtered much as ATen filters its
// own: for fp32 inputs no down-converting engines and no tensor cores unless TF32 is allowed for convolutions
// (torch.backends.cudnn.conv.fp32_precision), nothing non-deterministic under torch.use_deterministic_algorithms
// or torch.backends.cudnn.deterministic. Failures that say a configuration is unsupported are cached; others
// (out of memory, internal errors) are retried on the next call.
// When no engine supports a graph (fp32 NCHW, grouped convs on some versions, a misaligned pointer), the
// call takes the unfused path instead, with one warning naming the reason: the activation is materialized
// with ATen ops, the conv is ATen's (cuDNN), and the statistics come from at::var_mean. conv_bn_plan says
// which path a configuration takes.
//
// Descriptors get canonical strides (a size-1 dimension's stride is the one its layout implies, as ATen does), so
// a 1x1 weight whose channels_last copy kept NCHW-looking strides still pairs with NHWC engines.
//
// Numerics: the prologue is x * scale + shift in fp32 (scale = w_bn * invstd, shift = b_bn - mean * scale),
// the convs accumulate in fp32; the fused statistics are fp32 sums and sums of squares, finalized by
// csrc/conv_bn_stats.cu: mean = sum / n, var = max(sumsq / n - mean^2, 0), and where that uncentred estimate
// says |mean| > 4 std the channel is recentred from y (one more read of those channels of y; none otherwise), so
// the variance stays exact to the BN tolerance for |mean| / std up to 1e3 and beyond. Whether cuDNN's genstats reduction is deterministic depends on the engine: under
// torch.use_deterministic_algorithms engines with the non-deterministic note are skipped.
//
// No host synchronisation: plans are built on the host, execution is one cudnnBackendExecute on the current
// stream with a workspace from PyTorch's caching allocator, so the op can be captured in a CUDA graph once
// its plan is cached. Plans are never built during capture (finalizing a runtime-fusion plan compiles and
// loads kernels): a configuration first seen inside capture takes the unfused path for that call.

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cudnn/Handle.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <cudnn.h>
#include <torch/library.h>

#include "conv_bn_stats.h"
#include "plan_cache.h"

#include <cstdint>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

// The graph API's handle attributes are marked deprecated in recent cuDNN 9 releases but still required by
// the older 9.x ones torch wheels ship with.
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

namespace resfused {
namespace conv_bn_cudnn {
namespace {

using at::IntArrayRef;
using at::Tensor;

// A cuDNN call that failed while a graph or plan was being built: the op takes the unfused path. `settled`:
// the failure says the configuration is unsupported (cuDNN's BAD_PARAM and NOT_SUPPORTED categories), so the
// answer is cached; other failures (out of memory, internal errors) are retried on the next call. Failures
// while executing a finalized plan are errors instead (TORCH_CHECK).
struct Unsupported {
  std::string why;
  bool settled = true;
};

void require(cudnnStatus_t status, const char* what) {
  if (status != CUDNN_STATUS_SUCCESS) {
    const int category = static_cast<int>(status) / 1000 * 1000;  // cuDNN 9's CUDNN_STATUS_CATEGORY
    throw Unsupported{std::string(what) + ": " + cudnnGetErrorString(status),
                      category == CUDNN_STATUS_BAD_PARAM || category == CUDNN_STATUS_NOT_SUPPORTED};
  }
}

// One backend descriptor, destroyed with the object.
class Desc {
 public:
  Desc(cudnnBackendDescriptorType_t type, const char* what) : what_(what) {
    require(cudnnBackendCreateDescriptor(type, &desc_), what_);
  }
  ~Desc() {
    if (desc_ != nullptr) cudnnBackendDestroyDescriptor(desc_);
  }
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;

  cudnnBackendDescriptor_t get() const { return desc_; }

  Desc& set(cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, int64_t count, const void* values) {
    require(cudnnBackendSetAttribute(desc_, name, type, count, values), what_);
    return *this;
  }
  Desc& set_i64(cudnnBackendAttributeName_t name, const std::vector<int64_t>& values) {
    return set(name, CUDNN_TYPE_INT64, static_cast<int64_t>(values.size()), values.data());
  }
  Desc& set_desc(cudnnBackendAttributeName_t name, const Desc& other) {
    cudnnBackendDescriptor_t raw = other.get();
    return set(name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &raw);
  }
  Desc& set_dtype(cudnnBackendAttributeName_t name, cudnnDataType_t dtype) {
    return set(name, CUDNN_TYPE_DATA_TYPE, 1, &dtype);
  }
  void finalize() { require(cudnnBackendFinalize(desc_), what_); }

 private:
  cudnnBackendDescriptor_t desc_ = nullptr;
  const char* what_;
};
using DescPtr = std::shared_ptr<Desc>;

// Tensor unique ids of the graphs' non-virtual tensors (what the variant pack binds) and virtual ones.
enum Uid : int64_t {
  kX = 1, kW = 2, kScale = 3, kShift = 4, kY = 5, kSum = 6, kSqSum = 7, kDy = 8, kDw = 9,
  kScaled = 101, kShifted = 102, kActivation = 103,
};

cudnnDataType_t cudnn_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return CUDNN_DATA_HALF;
    case at::kBFloat16: return CUDNN_DATA_BFLOAT16;
    case at::kFloat: return CUDNN_DATA_FLOAT;
    default: TORCH_CHECK(false, "conv_bn (cuda): x must be float16, bfloat16 or float32, got ", t);
  }
  return CUDNN_DATA_FLOAT;  // unreachable
}

struct Geometry {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
};

// Builds an operation graph; keeps every descriptor it made alive for as long as the plan needs them.
class GraphBuilder {
 public:
  explicit GraphBuilder(cudnnHandle_t handle) : handle_(handle) {}

  DescPtr tensor(int64_t uid, cudnnDataType_t dtype, IntArrayRef sizes, IntArrayRef strides, bool is_virtual) {
    auto t = make(CUDNN_BACKEND_TENSOR_DESCRIPTOR, "tensor descriptor");
    const int64_t alignment = 16;
    t->set_dtype(CUDNN_ATTR_TENSOR_DATA_TYPE, dtype)
        .set_i64(CUDNN_ATTR_TENSOR_DIMENSIONS, sizes.vec())
        .set_i64(CUDNN_ATTR_TENSOR_STRIDES, strides.vec())
        .set(CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid)
        .set(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &alignment)
        .set(CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &is_virtual);
    t->finalize();
    return t;
  }

  // A (1, C, 1, 1) fp32 per-channel vector in the layout's strides.
  DescPtr channel_vector(int64_t uid, int64_t c) {
    const std::vector<int64_t> sizes{1, c, 1, 1};
    const std::vector<int64_t> strides{c, 1, c, c};
    return tensor(uid, CUDNN_DATA_FLOAT, sizes, strides, false);
  }

  // y = mode(x) or mode(x, b), computed in fp32.
  void pointwise(cudnnPointwiseMode_t mode, const DescPtr& x, const DescPtr& b, const DescPtr& y) {
    auto pw = make(CUDNN_BACKEND_POINTWISE_DESCRIPTOR, "pointwise descriptor");
    const cudnnDataType_t prec = CUDNN_DATA_FLOAT;
    pw->set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode)
        .set(CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &prec);
    pw->finalize();
    auto op = make(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, "pointwise operation");
    op->set_desc(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, *pw)
        .set_desc(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, *x)
        .set_desc(CUDNN_ATTR_OPERATION_POINTWISE_YDESC, *y);
    if (b) op->set_desc(CUDNN_ATTR_OPERATION_POINTWISE_BDESC, *b);
    op->finalize();
    ops_.push_back(op);
  }

  // relu(x * scale + shift) as a virtual fp32 tensor of x's sizes and strides.
  DescPtr prologue(const DescPtr& x, IntArrayRef sizes, IntArrayRef strides) {
    const int64_t c = sizes[1];
    auto scale = channel_vector(kScale, c);
    auto shift = channel_vector(kShift, c);
    auto scaled = tensor(kScaled, CUDNN_DATA_FLOAT, sizes, strides, true);
    auto shifted = tensor(kShifted, CUDNN_DATA_FLOAT, sizes, strides, true);
    auto act = tensor(kActivation, CUDNN_DATA_FLOAT, sizes, strides, true);
    pointwise(CUDNN_POINTWISE_MUL, x, scale, scaled);
    pointwise(CUDNN_POINTWISE_ADD, scaled, shift, shifted);
    pointwise(CUDNN_POINTWISE_RELU_FWD, shifted, nullptr, act);
    return act;
  }

  DescPtr convolution(const Geometry& g) {
    auto conv = make(CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR, "convolution descriptor");
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    const cudnnConvolutionMode_t mode = CUDNN_CROSS_CORRELATION;
    const int64_t dims = 2;
    conv->set(CUDNN_ATTR_CONVOLUTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp)
        .set(CUDNN_ATTR_CONVOLUTION_CONV_MODE, CUDNN_TYPE_CONVOLUTION_MODE, 1, &mode)
        .set(CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, CUDNN_TYPE_INT64, 1, &dims)
        .set_i64(CUDNN_ATTR_CONVOLUTION_DILATIONS, g.dilation)
        .set_i64(CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES, g.stride)
        .set_i64(CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, g.padding)
        .set_i64(CUDNN_ATTR_CONVOLUTION_POST_PADDINGS, g.padding);
    conv->finalize();
    return conv;
  }

  // The conv's attribute names, in the order of conv_op's tensor arguments: two inputs, the output, the conv
  // descriptor, alpha, beta.
  struct ConvAttrs {
    cudnnBackendDescriptorType_t type;
    const char* what;
    cudnnBackendAttributeName_t in0, in1, out, desc, alpha, beta;
  };

  void conv_forward(const DescPtr& x, const DescPtr& w, const DescPtr& y, const Geometry& g) {
    conv_op({CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR, "conv fprop operation",
             CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W,
             CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC,
             CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA},
            x, w, y, g);
  }

  void conv_wgrad(const DescPtr& x, const DescPtr& dy, const DescPtr& dw, const Geometry& g) {
    conv_op({CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_FILTER_DESCRIPTOR, "conv wgrad operation",
             CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_X, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DY,
             CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DW, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_CONV_DESC,
             CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_ALPHA, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_BETA},
            x, dy, dw, g);
  }

  // out = conv(in0, in1) with alpha 1, beta 0 (out is overwritten, not accumulated into).
  void conv_op(const ConvAttrs& a, const DescPtr& in0, const DescPtr& in1, const DescPtr& out, const Geometry& g) {
    auto conv = convolution(g);
    const float alpha = 1.0f, beta = 0.0f;
    auto op = make(a.type, a.what);
    op->set_desc(a.in0, *in0)
        .set_desc(a.in1, *in1)
        .set_desc(a.out, *out)
        .set_desc(a.desc, *conv)
        .set(a.alpha, CUDNN_TYPE_FLOAT, 1, &alpha)
        .set(a.beta, CUDNN_TYPE_FLOAT, 1, &beta);
    op->finalize();
    ops_.push_back(op);
  }

  void genstats(const DescPtr& y, int64_t c) {
    auto sum = channel_vector(kSum, c);
    auto sqsum = channel_vector(kSqSum, c);
    const cudnnGenStatsMode_t mode = CUDNN_GENSTATS_SUM_SQSUM;
    const cudnnDataType_t prec = CUDNN_DATA_FLOAT;
    auto op = make(CUDNN_BACKEND_OPERATION_GEN_STATS_DESCRIPTOR, "genstats operation");
    op->set(CUDNN_ATTR_OPERATION_GENSTATS_MODE, CUDNN_TYPE_GENSTATS_MODE, 1, &mode)
        .set(CUDNN_ATTR_OPERATION_GENSTATS_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &prec)
        .set_desc(CUDNN_ATTR_OPERATION_GENSTATS_XDESC, *y)
        .set_desc(CUDNN_ATTR_OPERATION_GENSTATS_SUMDESC, *sum)
        .set_desc(CUDNN_ATTR_OPERATION_GENSTATS_SQSUMDESC, *sqsum);
    op->finalize();
    ops_.push_back(op);
  }

  DescPtr finish() {
    auto graph = make(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, "operation graph");
    std::vector<cudnnBackendDescriptor_t> raw;
    for (const auto& op : ops_) raw.push_back(op->get());
    graph->set(CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle_)
        .set(CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, static_cast<int64_t>(raw.size()),
             raw.data());
    graph->finalize();
    return graph;
  }

  std::vector<DescPtr>& kept() { return keep_; }

 private:
  DescPtr make(cudnnBackendDescriptorType_t type, const char* what) {
    keep_.push_back(std::make_shared<Desc>(type, what));
    return keep_.back();
  }

  cudnnHandle_t handle_;
  std::vector<DescPtr> ops_;
  std::vector<DescPtr> keep_;
};

// A finalized execution plan, or why there is none.
struct Plan {
  std::vector<DescPtr> keep;  // the graph's descriptors, the chosen engine config and the plan
  DescPtr plan;
  int64_t workspace = 0;
  int64_t engine = -1;
  std::string unsupported;  // empty when plan is set
  bool settled = true;      // false: a transient failure, not cached
};

struct EngineFilter {
  bool fp32;
  bool allow_tf32;
  bool deterministic;
};

bool has_note(const std::vector<cudnnBackendNumericalNote_t>& notes, cudnnBackendNumericalNote_t note) {
  for (auto n : notes) {
    if (n == note) return true;
  }
  return false;
}

// Whether the engine of `cfg` is acceptable, and its global index.
bool engine_acceptable(const Desc& cfg, const EngineFilter& f, int64_t* index) {
  Desc engine(CUDNN_BACKEND_ENGINE_DESCRIPTOR, "engine descriptor");
  cudnnBackendDescriptor_t raw = engine.get();
  int64_t got = 0;
  require(cudnnBackendGetAttribute(cfg.get(), CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &got,
                                   &raw),
          "engine config's engine");
  require(cudnnBackendGetAttribute(engine.get(), CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &got, index),
          "engine index");
  std::vector<cudnnBackendNumericalNote_t> notes(CUDNN_NUMERICAL_NOTE_TYPE_COUNT);
  int64_t count = 0;
  require(cudnnBackendGetAttribute(engine.get(), CUDNN_ATTR_ENGINE_NUMERICAL_NOTE, CUDNN_TYPE_NUMERICAL_NOTE,
                                   static_cast<int64_t>(notes.size()), &count, notes.data()),
          "engine numerical notes");
  notes.resize(static_cast<size_t>(count));
  // Half inputs: the prologue's fp32 output is rounded to x's dtype for the MMA (as the reference does), so
  // down-converting engines are what is wanted; fp32 inputs must not be down-converted.
  if (f.fp32 && has_note(notes, CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS)) return false;
  if (f.fp32 && !f.allow_tf32 && has_note(notes, CUDNN_NUMERICAL_NOTE_TENSOR_CORE)) return false;
  if (f.deterministic && has_note(notes, CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC)) return false;
  return true;
}

// The first engine config, in heuristics order (mode A, then FALLBACK, each tried on its own), that passes the
// filter and finalizes.
Plan make_plan(GraphBuilder& builder, cudnnHandle_t handle, const EngineFilter& filter) {
  Plan result;
  std::string last = "cuDNN's heuristics returned no engine for the graph";
  bool settled = true;
  DescPtr graph;
  try {
    graph = builder.finish();
  } catch (const Unsupported& e) {
    result.unsupported = e.why;
    result.settled = e.settled;
    return result;
  }
  for (cudnnBackendHeurMode_t mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
    try {
      Desc heur(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, "engine heuristics");
      heur.set_desc(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, *graph)
          .set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
      heur.finalize();
      int64_t count = 0;
      require(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0,
                                       &count, nullptr),
              "heuristics result count");
      if (count <= 0) continue;
      std::vector<DescPtr> cfgs;
      std::vector<cudnnBackendDescriptor_t> raw;
      for (int64_t i = 0; i < count; ++i) {
        cfgs.push_back(std::make_shared<Desc>(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, "engine config"));
        raw.push_back(cfgs.back()->get());
      }
      int64_t got = 0;
      require(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, count,
                                       &got, raw.data()),
              "heuristics results");
      for (int64_t i = 0; i < got; ++i) {
        try {
          int64_t index = -1;
          if (!engine_acceptable(*cfgs[i], filter, &index)) {
            last = "every engine cuDNN offered was filtered out (TF32, down-converting or non-deterministic)";
            continue;
          }
          auto plan = std::make_shared<Desc>(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, "execution plan");
          plan->set(CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle)
              .set_desc(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, *cfgs[i]);
          plan->finalize();
          int64_t workspace = 0;
          require(cudnnBackendGetAttribute(plan->get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1,
                                           &got, &workspace),
                  "plan workspace size");
          result.keep = builder.kept();  // the graph and its operations
          result.keep.push_back(cfgs[i]);
          result.plan = plan;
          result.workspace = workspace;
          result.engine = index;
          return result;
        } catch (const Unsupported& e) {
          last = e.why;
          settled = settled && e.settled;
        }
      }
    } catch (const Unsupported& e) {
      last = e.why;
      settled = settled && e.settled;
    }
  }
  result.unsupported = last;
  result.settled = settled;
  return result;
}

// Plans by configuration key, built once. Unsupported configurations are cached too (as their reason). Bounded
// (least recently used evicted beyond kPlanCacheCapacity configurations) and built outside its lock: see
// csrc/plan_cache.h.
constexpr size_t kPlanCacheCapacity = 1024;
auto* const cache = new BoundedCache<Plan>(kPlanCacheCapacity);

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

cudnnHandle_t current_handle() {
  cudnnHandle_t handle = at::native::getCudnnHandle();
  TORCH_CHECK(cudnnSetStream(handle, at::cuda::getCurrentCUDAStream()) == CUDNN_STATUS_SUCCESS,
              "conv_bn (cuda): cudnnSetStream failed");
  return handle;
}

// TF32 as cuDNN convolutions use it: the conv-specific setting (torch.backends.cudnn.conv.fp32_precision).
// allowTF32CuDNN() without an operator throws once the conv and RNN settings differ (torch >= 2.9; the
// optional Float32Op argument exists in every torch this builds against, 2.11 and 2.14 included).
EngineFilter filter_for(const Tensor& x) {
  const auto& ctx = at::globalContext();
  return {x.scalar_type() == at::kFloat, ctx.allowTF32CuDNN(at::Float32Op::CONV),
          ctx.deterministicCuDNN() || ctx.deterministicAlgorithms()};
}

// Strides as cuDNN should see them: a size-1 dimension's stride is arbitrary in PyTorch (a 1x1 weight made
// channels_last may keep (C, 1, 1, 1)), so it is replaced by the stride the layout implies, the product of
// the sizes of the dimensions inside it in memory order (NHWC: C, then W, H, N; NCHW: W, H, C, N). ATen does
// the same before building its cuDNN descriptors; without it such a tensor looks NCHW to cuDNN and the NHWC
// runtime-fusion engines reject the graph.
// Whether x is laid out NHWC (channels_last and not also contiguous), the layout every tensor of its graph
// takes (format_of below).
bool is_nhwc(const Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

std::vector<int64_t> canonical_strides(IntArrayRef sizes, IntArrayRef strides, bool nhwc) {
  std::vector<int64_t> out = strides.vec();
  if (sizes.size() != 4) return out;
  const int nhwc_order[4] = {1, 3, 2, 0};
  const int nchw_order[4] = {3, 2, 1, 0};
  const int* order = nhwc ? nhwc_order : nchw_order;
  int64_t inner = 1;
  for (int i = 0; i < 4; ++i) {
    const int d = order[i];
    if (sizes[d] == 1) {
      out[d] = inner;
    } else {
      inner *= sizes[d];
    }
  }
  return out;
}

std::vector<int64_t> canonical_strides(const Tensor& t, bool nhwc) {
  return canonical_strides(t.sizes(), t.strides(), nhwc);
}

void key_dims(std::ostringstream& key, const char* name, const Tensor& t, bool nhwc) {
  key << name << t.sizes() << IntArrayRef(canonical_strides(t, nhwc)) << ';';
}

std::string make_key(const char* op, cudnnHandle_t handle, const Tensor& x, const Tensor& other, const Tensor& out,
                     bool prologue, bool stats, const Geometry& g, const EngineFilter& f) {
  std::ostringstream key;
  key << op << ';' << static_cast<const void*>(handle) << ';' << x.get_device() << ';' << x.scalar_type() << ';';
  const bool nhwc = is_nhwc(x);
  key_dims(key, "x", x, nhwc);
  key_dims(key, "o", other, nhwc);
  key_dims(key, "y", out, nhwc);
  key << prologue << stats << ';' << IntArrayRef(g.stride) << IntArrayRef(g.padding) << IntArrayRef(g.dilation)
      << g.groups << ';' << f.fp32 << f.allow_tf32 << f.deterministic;
  return key.str();
}

std::shared_ptr<const Plan> unsupported(std::string why) {
  auto plan = std::make_shared<Plan>();
  plan->unsupported = std::move(why);
  return plan;
}

// The cached plan for `key`, built by `build(builder)` (which adds the graph's operations) on first use.
// Not during CUDA graph capture: runtime-fusion plans compile and load kernels when finalized, which must
// happen before capture (the first call of an op, as for cuDNN's own plans); a call captured first takes the
// unfused path, and nothing is cached.
template <typename Build>
std::shared_ptr<const Plan> cached_plan(const std::string& key, cudnnHandle_t handle, const EngineFilter& f,
                                        Build&& build) {
  return cache->find_or_build(key, [&]() -> std::shared_ptr<const Plan> {
    if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
      auto during_capture = std::make_shared<Plan>();  // not cached: the same key outside capture builds
      during_capture->unsupported = "no cuDNN plan was built for this configuration before CUDA graph capture "
                                    "began; run it once outside capture (warm-up)";
      during_capture->settled = false;
      return during_capture;
    }
    Plan plan;
    try {
      GraphBuilder b(handle);
      build(b);
      plan = make_plan(b, handle, f);
    } catch (const Unsupported& e) {
      plan.unsupported = e.why;
      plan.settled = e.settled;
    }
    return std::make_shared<const Plan>(std::move(plan));
  }, [](const Plan& plan) { return plan.settled; });
}

// Forward: x (N,C,H,W), w (K,C/g,R,S) in x's memory format, y (N,K,P,Q) allocated by the caller.
std::shared_ptr<const Plan> forward_plan(cudnnHandle_t handle, const Tensor& x, const Tensor& w, const Tensor& y,
                                         bool prologue, bool stats, const Geometry& g) {
  if (!aligned16(x) || !aligned16(w)) return unsupported("x or the weight is not 16-byte aligned");
  const EngineFilter f = filter_for(x);
  return cached_plan(make_key("fprop", handle, x, w, y, prologue, stats, g, f), handle, f, [&](GraphBuilder& b) {
    const cudnnDataType_t dt = cudnn_dtype(x.scalar_type());
    const bool nhwc = is_nhwc(x);
    const auto xs = canonical_strides(x, nhwc);
    DescPtr xd = b.tensor(kX, dt, x.sizes(), xs, false);
    DescPtr in = prologue ? b.prologue(xd, x.sizes(), xs) : xd;
    DescPtr wd = b.tensor(kW, dt, w.sizes(), canonical_strides(w, nhwc), false);
    DescPtr yd = b.tensor(kY, dt, y.sizes(), canonical_strides(y, nhwc), false);
    b.conv_forward(in, wd, yd, g);
    if (stats) b.genstats(yd, y.size(1));
  });
}

// Wgrad: x (N,C,H,W), dy (N,K,P,Q), dw (K,C/g,R,S) in x's memory format.
std::shared_ptr<const Plan> wgrad_plan(cudnnHandle_t handle, const Tensor& x, const Tensor& dy, const Tensor& dw,
                                       bool prologue, const Geometry& g) {
  if (!aligned16(x) || !aligned16(dy)) return unsupported("x or grad_y is not 16-byte aligned");
  const EngineFilter f = filter_for(x);
  return cached_plan(make_key("wgrad", handle, x, dy, dw, prologue, false, g, f), handle, f, [&](GraphBuilder& b) {
    const cudnnDataType_t dt = cudnn_dtype(x.scalar_type());
    const bool nhwc = is_nhwc(x);
    const auto xs = canonical_strides(x, nhwc);
    DescPtr xd = b.tensor(kX, dt, x.sizes(), xs, false);
    DescPtr in = prologue ? b.prologue(xd, x.sizes(), xs) : xd;
    DescPtr dyd = b.tensor(kDy, dt, dy.sizes(), canonical_strides(dy, nhwc), false);
    DescPtr dwd = b.tensor(kDw, dt, dw.sizes(), canonical_strides(dw, nhwc), false);
    b.conv_wgrad(in, dyd, dwd, g);
  });
}

void execute(cudnnHandle_t handle, const Plan& plan, const std::vector<int64_t>& uids, const std::vector<void*>& ptrs,
             const Tensor& like) {
  Tensor workspace = at::empty({std::max<int64_t>(plan.workspace, 1)}, like.options().dtype(at::kByte));
  void* ws = workspace.data_ptr();
  cudnnBackendDescriptor_t pack = nullptr;
  TORCH_CHECK(cudnnBackendCreateDescriptor(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, &pack) == CUDNN_STATUS_SUCCESS,
              "conv_bn (cuda): could not create a cuDNN variant pack");
  std::unique_ptr<void, void (*)(void*)> guard(pack, [](void* p) {
    cudnnBackendDestroyDescriptor(static_cast<cudnnBackendDescriptor_t>(p));
  });
  auto ok = [](cudnnStatus_t s) { return s == CUDNN_STATUS_SUCCESS; };
  TORCH_CHECK(ok(cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64,
                                          static_cast<int64_t>(uids.size()), uids.data())) &&
                  ok(cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR,
                                              static_cast<int64_t>(ptrs.size()), ptrs.data())) &&
                  ok(cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &ws)) &&
                  ok(cudnnBackendFinalize(pack)),
              "conv_bn (cuda): could not build the cuDNN variant pack");
  const cudnnStatus_t status = cudnnBackendExecute(handle, plan.plan->get(), pack);
  TORCH_CHECK(status == CUDNN_STATUS_SUCCESS, "conv_bn (cuda): cuDNN plan (engine ", plan.engine,
              ") failed to execute: ", cudnnGetErrorString(status));
}

// ------------------------------------------------------------------------------------------------------
// argument checks and the unfused path
// ------------------------------------------------------------------------------------------------------

at::MemoryFormat format_of(const Tensor& x) {
  if (!x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

// x itself must be dense (contiguous or channels_last); `t` (the weight, grad_y) is returned in x's memory format,
// which is what cuDNN's engines pair with x (a no-op when it already is).
Tensor like_x(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "conv_bn (cuda): ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.dim() == 4, "conv_bn (cuda): ", name, " must be 4-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "conv_bn (cuda): ", name, " must have x's dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
  return t.contiguous(format_of(x));
}

void check_vector(const std::optional<Tensor>& v, const char* name, const Tensor& x) {
  TORCH_CHECK(v.has_value(), "conv_bn (cuda): prologue needs ", name);
  TORCH_CHECK(v->device() == x.device(), "conv_bn (cuda): ", name, " is on ", v->device(), " but x is on ",
              x.device());
  TORCH_CHECK(v->scalar_type() == at::kFloat && v->dim() == 1 && v->size(0) == x.size(1) && v->is_contiguous(),
              "conv_bn (cuda): ", name, " must be a contiguous float32 tensor of shape (", x.size(1), ",), got ",
              v->scalar_type(), " ", v->sizes());
}

Geometry geometry(IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(stride.size() == 2, "conv_bn (cuda): stride must have two entries, got ", stride);
  TORCH_CHECK(padding.size() == 2, "conv_bn (cuda): padding must have two entries, got ", padding);
  TORCH_CHECK(dilation.size() == 2, "conv_bn (cuda): dilation must have two entries, got ", dilation);
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(stride[d] >= 1, "conv_bn (cuda): stride must be positive, got ", stride);
    TORCH_CHECK(padding[d] >= 0, "conv_bn (cuda): padding must be non-negative, got ", padding);
    TORCH_CHECK(dilation[d] >= 1, "conv_bn (cuda): dilation must be positive, got ", dilation);
  }
  TORCH_CHECK(groups >= 1, "conv_bn (cuda): groups must be positive, got ", groups);
  return {stride.vec(), padding.vec(), dilation.vec(), groups};
}

// The weight's shape (K, C/groups, R, S) against x's C channels and groups.
void check_weight_shape(IntArrayRef w, const Tensor& x, int64_t groups, const char* name) {
  TORCH_CHECK(w.size() == 4, "conv_bn (cuda): ", name, " must have four entries (K, C/groups, R, S), got ", w);
  TORCH_CHECK(w[0] >= 1 && w[2] >= 1 && w[3] >= 1, "conv_bn (cuda): ", name, " must have positive sizes, got ", w);
  TORCH_CHECK(w[1] * groups == x.size(1) && w[0] % groups == 0, "conv_bn (cuda): ", name, " ", w, " with groups=",
              groups, " does not fit x's ", x.size(1), " channels");
}

std::vector<int64_t> output_sizes(const Tensor& x, IntArrayRef w_sizes, const Geometry& g) {
  std::vector<int64_t> out{x.size(0), w_sizes[0], 0, 0};
  for (int d = 0; d < 2; ++d) {
    out[d + 2] = (x.size(d + 2) + 2 * g.padding[d] - g.dilation[d] * (w_sizes[d + 2] - 1) - 1) / g.stride[d] + 1;
    TORCH_CHECK(out[d + 2] > 0, "conv_bn (cuda): x of spatial size ", x.sizes().slice(2), " is too small for the conv");
  }
  return out;
}

// relu(x * scale + shift) rounded to x's dtype and memory format, or x itself without a prologue.
Tensor activation(const Tensor& x, const std::optional<Tensor>& scale, const std::optional<Tensor>& shift) {
  if (!scale.has_value()) return x;
  Tensor z = at::relu(x.to(at::kFloat) * scale->view({1, -1, 1, 1}) + shift->view({1, -1, 1, 1}));
  return z.to(x.scalar_type()).contiguous(format_of(x));
}

// scale/shift as cuDNN reads them: 16-byte aligned, as the graph declares (fresh tensors are; a view may not be).
std::optional<Tensor> aligned_vector(const std::optional<Tensor>& v) {
  if (!v.has_value() || aligned16(*v)) return v;
  return v->clone();
}

void add_prologue(std::vector<int64_t>& uids, std::vector<void*>& ptrs, const std::optional<Tensor>& scale,
                  const std::optional<Tensor>& shift) {
  if (!scale.has_value()) return;
  uids.insert(uids.end(), {kScale, kShift});
  ptrs.insert(ptrs.end(), {scale->data_ptr(), shift->data_ptr()});
}

std::string describe(const Plan& plan) {
  if (plan.plan) {
    return "cudnn-graph engine=" + std::to_string(plan.engine) + " workspace=" + std::to_string(plan.workspace);
  }
  return "unfused: " + plan.unsupported;
}

// x: a 4-D CUDA (or meta: the shape-only kernels) tensor, contiguous or channels_last, of a supported dtype.
void check_x(const Tensor& x) {
  TORCH_CHECK(x.is_cuda() || x.is_meta(), "conv_bn (cuda): x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 4, "conv_bn (cuda): x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  cudnn_dtype(x.scalar_type());
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "conv_bn (cuda): x must be contiguous or channels_last, got strides ", x.strides());
}

// The prologue's (scale, shift), checked and 16-byte aligned; both empty without a prologue.
std::pair<std::optional<Tensor>, std::optional<Tensor>> prologue_vectors(const std::optional<Tensor>& scale,
                                                                         const std::optional<Tensor>& shift,
                                                                         const Tensor& x) {
  TORCH_CHECK(scale.has_value() == shift.has_value(), "conv_bn (cuda): scale and shift must be given together");
  if (scale.has_value()) {
    check_vector(scale, "scale", x);
    check_vector(shift, "shift", x);
  }
  return {aligned_vector(scale), aligned_vector(shift)};
}

// ------------------------------------------------------------------------------------------------------
// the ops
// ------------------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> conv_bn_forward(const Tensor& x, const Tensor& weight_in,
                                                   const std::optional<Tensor>& scale_in,
                                                   const std::optional<Tensor>& shift_in, IntArrayRef stride,
                                                   IntArrayRef padding, IntArrayRef dilation, int64_t groups,
                                                   bool stats) {
  check_x(x);
  const Tensor weight = like_x(weight_in, "weight", x);
  const auto [scale, shift] = prologue_vectors(scale_in, shift_in, x);
  const bool prologue = scale.has_value();
  const Geometry g = geometry(stride, padding, dilation, groups);
  check_weight_shape(weight.sizes(), x, groups, "weight");
  const auto out_sizes = output_sizes(x, weight.sizes(), g);
  const auto f32 = x.options().dtype(at::kFloat);
  if (x.is_meta()) {
    const int64_t nk = stats ? out_sizes[1] : 0;
    return {at::empty(out_sizes, x.options().memory_format(format_of(x))), at::empty({nk}, f32),
            at::empty({nk}, f32)};
  }
  const c10::cuda::CUDAGuard device_guard(x.device());
  Tensor y = at::empty(out_sizes, x.options().memory_format(format_of(x)));
  const int64_t k = y.size(1);
  cudnnHandle_t handle = current_handle();
  auto plan = forward_plan(handle, x, weight, y, prologue, stats, g);
  if (plan->plan) {
    std::vector<int64_t> uids{kX, kW, kY};
    std::vector<void*> ptrs{x.data_ptr(), weight.data_ptr(), y.data_ptr()};
    add_prologue(uids, ptrs, scale, shift);
    // genstats is given zeroed outputs: some engines accumulate into them.
    Tensor sum = at::zeros({stats ? k : 0}, f32);
    Tensor sqsum = at::zeros({stats ? k : 0}, f32);
    if (stats) {
      uids.insert(uids.end(), {kSum, kSqSum});
      ptrs.insert(ptrs.end(), {sum.data_ptr(), sqsum.data_ptr()});
    }
    execute(handle, *plan, uids, ptrs, x);
    if (!stats) return {y, sum, sqsum};
    // mean and biased variance from the fp32 sums, recentred from y where cancellation would cost digits
    // (csrc/conv_bn_stats.cu).
    auto [mean, var] = finalize_stats(y, sum, sqsum);
    return {y, mean, var};
  }
  TORCH_WARN_ONCE("resfused conv_bn (cuda): no fused cuDNN forward engine (", plan->unsupported,
                  "); using the unfused path (ATen activation + cuDNN conv + var_mean)");
  Tensor acc = at::convolution(activation(x, scale, shift), weight, std::nullopt, stride, padding, dilation, false,
                               {0, 0}, groups);
  y.copy_(acc);
  if (!stats) return {y, at::empty({0}, f32), at::empty({0}, f32)};
  auto [var, mean] = at::var_mean(acc.to(at::kFloat), IntArrayRef{0, 2, 3}, /*correction=*/0, /*keepdim=*/false);
  return {y, mean, var};
}

Tensor conv_bn_wgrad(const Tensor& grad_y_in, const Tensor& x, const std::optional<Tensor>& scale_in,
                     const std::optional<Tensor>& shift_in, IntArrayRef weight_size, IntArrayRef stride,
                     IntArrayRef padding, IntArrayRef dilation, int64_t groups) {
  check_x(x);
  const Tensor grad_y = like_x(grad_y_in, "grad_y", x);
  const auto [scale, shift] = prologue_vectors(scale_in, shift_in, x);
  const bool prologue = scale.has_value();
  const Geometry g = geometry(stride, padding, dilation, groups);
  check_weight_shape(weight_size, x, groups, "weight_size");
  TORCH_CHECK(IntArrayRef(output_sizes(x, weight_size, g)) == grad_y.sizes(), "conv_bn (cuda): grad_y has shape ",
              grad_y.sizes(), " but the conv's output has shape ", IntArrayRef(output_sizes(x, weight_size, g)));
  if (x.is_meta()) return at::empty(weight_size, x.options().memory_format(format_of(x)));
  const c10::cuda::CUDAGuard device_guard(x.device());
  Tensor dw = at::empty(weight_size, x.options().memory_format(format_of(x)));
  cudnnHandle_t handle = current_handle();
  auto plan = wgrad_plan(handle, x, grad_y, dw, prologue, g);
  if (plan->plan) {
    std::vector<int64_t> uids{kX, kDy, kDw};
    std::vector<void*> ptrs{x.data_ptr(), grad_y.data_ptr(), dw.data_ptr()};
    add_prologue(uids, ptrs, scale, shift);
    execute(handle, *plan, uids, ptrs, x);
    return dw;
  }
  TORCH_WARN_ONCE("resfused conv_bn (cuda): no fused cuDNN wgrad engine (", plan->unsupported,
                  "); using the unfused path (ATen activation + cuDNN wgrad)");
  const Tensor a = activation(x, scale, shift);
  auto grads = at::convolution_backward(grad_y, a, dw, /*bias_sizes=*/std::nullopt, stride, padding, dilation,
                                        /*transposed=*/false, /*output_padding=*/{0, 0}, groups,
                                        /*output_mask=*/{false, true, false});
  dw.copy_(std::get<1>(grads));
  return dw;
}

// Which path conv_bn_forward (op "forward", with or without stats) or conv_bn_wgrad (op "wgrad") takes for
// this configuration: "cudnn-graph engine=<cuDNN global engine index> workspace=<bytes>" or
// "unfused: <why>". Builds and caches the plan; runs nothing on the GPU.
std::string conv_bn_plan(const Tensor& x, const Tensor& weight_in, bool prologue, IntArrayRef stride,
                         IntArrayRef padding, IntArrayRef dilation, int64_t groups, bool stats, c10::string_view op) {
  check_x(x);
  TORCH_CHECK(x.is_cuda(), "conv_bn (cuda): x must be a CUDA tensor, got device ", x.device());
  const Tensor weight = like_x(weight_in, "weight", x);
  const Geometry g = geometry(stride, padding, dilation, groups);
  check_weight_shape(weight.sizes(), x, groups, "weight");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto fmt = format_of(x);
  Tensor y = at::empty(output_sizes(x, weight.sizes(), g), x.options().memory_format(fmt));
  cudnnHandle_t handle = current_handle();
  if (op == "forward") return describe(*forward_plan(handle, x, weight, y, prologue, stats, g));
  TORCH_CHECK(op == "wgrad", "conv_bn (cuda): op must be 'forward' or 'wgrad', got '", std::string(op), "'");
  Tensor dw = at::empty(weight.sizes(), x.options().memory_format(fmt));
  return describe(*wgrad_plan(handle, x, y, dw, prologue, g));
}

}  // namespace
}  // namespace conv_bn_cudnn
}  // namespace resfused

// A namespace of its own (TORCH_LIBRARY may appear once per namespace; resfused_cuda is csrc/ops.cpp's).
TORCH_LIBRARY(resfused_cuda_conv_bn, m) {
  m.def(
      "conv_bn_forward(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, int[] stride, int[] padding, "
      "int[] dilation, int groups, bool stats) -> (Tensor, Tensor, Tensor)");
  m.def(
      "conv_bn_wgrad(Tensor grad_y, Tensor x, Tensor? scale, Tensor? shift, int[] weight_size, int[] stride, "
      "int[] padding, int[] dilation, int groups) -> Tensor");
  m.def(
      "conv_bn_plan(Tensor x, Tensor weight, bool prologue, int[] stride, int[] padding, int[] dilation, int groups, "
      "bool stats, str op) -> str");
}

TORCH_LIBRARY_IMPL(resfused_cuda_conv_bn, CUDA, m) {
  m.impl("conv_bn_forward", &resfused::conv_bn_cudnn::conv_bn_forward);
  m.impl("conv_bn_wgrad", &resfused::conv_bn_cudnn::conv_bn_wgrad);
  m.impl("conv_bn_plan", &resfused::conv_bn_cudnn::conv_bn_plan);
}

// Meta: the same argument checks and output shapes, no device work (shape propagation, and the checks testable
// without a GPU).
TORCH_LIBRARY_IMPL(resfused_cuda_conv_bn, Meta, m) {
  m.impl("conv_bn_forward", &resfused::conv_bn_cudnn::conv_bn_forward);
  m.impl("conv_bn_wgrad", &resfused::conv_bn_cudnn::conv_bn_wgrad);
}
