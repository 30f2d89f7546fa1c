// resfused._C: registers the CUDA backend's ops under torch.ops.resfused_cuda.
//
// Schemas (same contract as resfused/reference/bn_add_relu.py):
//   bn_add_relu_forward_train(x, residual?, weight?, bias?, running_mean(a!)?, running_var(b!)?, momentum, eps,
//                             relu) -> (y, mask, mean, invstd)
//   bn_add_relu_forward_eval(x, residual?, weight?, bias?, running_mean, running_var, eps, relu, save_mask)
//                             -> (y, mask)
//   bn_add_relu_backward(grad_out, x, mask, mean, invstd, weight?, relu, training, need_input_grad,
//                        need_residual_grad, need_weight_grad) -> (grad_input, grad_residual, grad_weight, grad_bias)
//   bn_add_relu_plan(x, op) -> str   which scheme a call would use (diagnostics for tests and benchmarks)
// This file validates arguments (TORCH_CHECK messages name the tensor), allocates through PyTorch
// and launches on the current stream; the kernels are in bn_add_relu.cu.
//
// Environment (read on every call; see bn_add_relu.cu for the schemes):
//   RESFUSED_CUDA_SCHEME=auto|two_pass|persistent   kernel scheme (persistent falls back to two_pass where
//                                                   the grid cannot be co-resident)
//   RESFUSED_CUDA_PERSISTENT_CACHE_BYTES=n          cap on the persistent kernels' shared-memory cache per
//                                                   block (testing knob for their re-read path)

#include <Python.h>

#include <cstdio>
#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bn_add_relu.h"

// `import resfused._C` loads this library (running the static op registrations below); the module
// itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace resfused {
namespace {

using at::Tensor;

struct Input {
  Shape shape;
  at::MemoryFormat format;
};

const char* layout_name(Layout l) { return l == Layout::kChannelsLast ? "channels_last" : "contiguous (NCHW)"; }

// x: a CUDA, 4-D, fp32/fp16/bf16 tensor, NCHW-contiguous or channels_last-contiguous (NCHW wins
// where both hold, as resfused._layout.layout_of).
Input check_input(const Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "resfused_cuda: ", name, " must be a CUDA tensor, got a tensor on ", x.device());
  TORCH_CHECK(x.dim() == 4, "resfused_cuda: ", name, " must be 4-D (N, C, H, W), got ", x.dim(), "-D with shape ",
              x.sizes());
  Input in;
  switch (x.scalar_type()) {
    case at::kFloat:
      in.shape.dtype = DType::kFloat;
      break;
    case at::kHalf:
      in.shape.dtype = DType::kHalf;
      break;
    case at::kBFloat16:
      in.shape.dtype = DType::kBFloat16;
      break;
    default:
      TORCH_CHECK(false, "resfused_cuda: ", name, " must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  if (x.is_contiguous()) {
    in.shape.layout = Layout::kNCHW;
    in.format = at::MemoryFormat::Contiguous;
  } else if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    in.shape.layout = Layout::kChannelsLast;
    in.format = at::MemoryFormat::ChannelsLast;
  } else {
    TORCH_CHECK(false, "resfused_cuda: ", name, " must be contiguous (NCHW) or channels_last, got strides ",
                x.strides(), " for shape ", x.sizes());
  }
  TORCH_CHECK(x.size(1) <= INT32_MAX && x.size(2) * x.size(3) <= INT32_MAX, "resfused_cuda: ", name,
              " has too many channels or spatial positions: ", x.sizes());
  in.shape.n = x.size(0);
  in.shape.c = x.size(1);
  in.shape.hw = x.size(2) * x.size(3);
  in.shape.device = x.get_device();
  return in;
}

// t has x's shape, dtype, device and memory layout.
void check_like_x(const Tensor& t, const char* name, const Tensor& x, const Input& in) {
  TORCH_CHECK(t.device() == x.device(), "resfused_cuda: ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "resfused_cuda: ", name, " must have x's dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), "resfused_cuda: ", name, " must have x's shape ", x.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(in.format), "resfused_cuda: ", name, " must have x's memory layout (",
              layout_name(in.shape.layout), "), got strides ", t.strides());
}

// A per-channel fp32 vector of length C on x's device.
void check_channel_vector(const Tensor& t, const char* name, const Tensor& x) {
  const int64_t c = x.size(1);
  TORCH_CHECK(t.device() == x.device(), "resfused_cuda: ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "resfused_cuda: ", name, " must be float32 (the statistics dtype for ",
              x.scalar_type(), " input), got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == c, "resfused_cuda: ", name, " must have shape (", c, ",), got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "resfused_cuda: ", name, " must be contiguous, got stride ", t.strides());
}

const float* optional_channel_vector(const std::optional<Tensor>& t, const char* name, const Tensor& x) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_channel_vector(*t, name, x);
  return t->data_ptr<float>();
}

Scheme requested_scheme() {
  const int v = requested_scheme_from_env();
  TORCH_CHECK(v >= 0, "resfused_cuda: RESFUSED_CUDA_SCHEME must be auto, two_pass or persistent");
  return static_cast<Scheme>(v);
}

int64_t mask_rows(const Input& in) {
  return in.shape.layout == Layout::kChannelsLast ? in.shape.n * in.shape.hw : in.shape.n * in.shape.c;
}

int64_t mask_cols(const Input& in) {
  const int64_t inner = in.shape.layout == Layout::kChannelsLast ? in.shape.c : in.shape.hw;
  return (inner + 7) / 8;
}

Tensor float_workspace(const Tensor& x, int64_t floats) {
  return at::empty({std::max<int64_t>(floats, 1)}, x.options().dtype(at::kFloat));
}

cudaStream_t current_stream(const Tensor& x) { return c10::cuda::getCurrentCUDAStream(x.get_device()).stream(); }

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_train(const Tensor& x, const std::optional<Tensor>& residual,
                                                         const std::optional<Tensor>& weight,
                                                         const std::optional<Tensor>& bias,
                                                         const std::optional<Tensor>& running_mean,
                                                         const std::optional<Tensor>& running_var, double momentum,
                                                         double eps, bool relu) {
  const Input in = check_input(x, "x");
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_like_x(*residual, "residual", x, in);
  ForwardTrainArgs a{};
  a.weight = optional_channel_vector(weight, "weight", x);
  a.bias = optional_channel_vector(bias, "bias", x);
  a.running_mean = const_cast<float*>(optional_channel_vector(running_mean, "running_mean", x));
  a.running_var = const_cast<float*>(optional_channel_vector(running_var, "running_var", x));
  const Scheme scheme = requested_scheme();

  const c10::cuda::CUDAGuard guard(x.device());
  Tensor y = at::empty_like(x);
  Tensor mask = relu ? at::empty({mask_rows(in), mask_cols(in)}, x.options().dtype(at::kByte))
                     : at::empty({0}, x.options().dtype(at::kByte));
  Tensor mean = at::empty({in.shape.c}, x.options().dtype(at::kFloat));
  Tensor invstd = at::empty({in.shape.c}, x.options().dtype(at::kFloat));
  const Plan plan = plan_forward_train(in.shape, scheme);
  Tensor workspace = float_workspace(x, plan.workspace_floats);

  a.x = x.data_ptr();
  a.residual = has_res ? residual->data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.mask = relu ? mask.data_ptr<uint8_t>() : nullptr;
  a.mean = mean.data_ptr<float>();
  a.invstd = invstd.data_ptr<float>();
  a.workspace = plan.workspace_floats > 0 ? workspace.data_ptr<float>() : nullptr;
  a.momentum = momentum;
  a.eps = eps;
  a.relu = relu;
  launch_forward_train(in.shape, plan, a, current_stream(x));
  return {y, mask, mean, invstd};
}

std::tuple<Tensor, Tensor> forward_eval(const Tensor& x, const std::optional<Tensor>& residual,
                                        const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                                        const Tensor& running_mean, const Tensor& running_var, double eps, bool relu,
                                        bool save_mask) {
  const Input in = check_input(x, "x");
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_like_x(*residual, "residual", x, in);
  check_channel_vector(running_mean, "running_mean", x);
  check_channel_vector(running_var, "running_var", x);
  ForwardEvalArgs a{};
  a.weight = optional_channel_vector(weight, "weight", x);
  a.bias = optional_channel_vector(bias, "bias", x);

  const c10::cuda::CUDAGuard guard(x.device());
  const bool want_mask = relu && save_mask;
  Tensor y = at::empty_like(x);
  Tensor mask = want_mask ? at::empty({mask_rows(in), mask_cols(in)}, x.options().dtype(at::kByte))
                          : at::empty({0}, x.options().dtype(at::kByte));
  a.x = x.data_ptr();
  a.residual = has_res ? residual->data_ptr() : nullptr;
  a.running_mean = running_mean.data_ptr<float>();
  a.running_var = running_var.data_ptr<float>();
  a.y = y.data_ptr();
  a.mask = want_mask ? mask.data_ptr<uint8_t>() : nullptr;
  a.eps = eps;
  a.relu = relu;
  launch_forward_eval(in.shape, a, current_stream(x));
  return {y, mask};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward(const Tensor& grad_out, const Tensor& x, const Tensor& mask,
                                                    const Tensor& mean, const Tensor& invstd,
                                                    const std::optional<Tensor>& weight, bool relu, bool training,
                                                    bool need_input_grad, bool need_residual_grad,
                                                    bool need_weight_grad) {
  const Input in = check_input(x, "x");
  check_like_x(grad_out, "grad_out", x, in);
  check_channel_vector(mean, "mean", x);
  check_channel_vector(invstd, "invstd", x);
  BackwardArgs a{};
  a.weight = optional_channel_vector(weight, "weight", x);
  if (relu) {
    TORCH_CHECK(mask.device() == x.device(), "resfused_cuda: mask is on ", mask.device(), " but x is on ",
                x.device());
    TORCH_CHECK(mask.scalar_type() == at::kByte, "resfused_cuda: mask must be uint8, got ", mask.scalar_type());
    TORCH_CHECK(mask.is_contiguous() && mask.numel() == mask_rows(in) * mask_cols(in), "resfused_cuda: mask must be a ",
                "contiguous uint8 tensor of ", mask_rows(in), " x ", mask_cols(in),
                " packed bits (resfused._layout), got shape ", mask.sizes(), " and strides ", mask.strides());
  }
  const Scheme scheme = requested_scheme();

  const c10::cuda::CUDAGuard guard(x.device());
  auto empty_of = [&](at::ScalarType t) { return at::empty({0}, x.options().dtype(t)); };
  Tensor grad_input = need_input_grad ? at::empty_like(x) : empty_of(x.scalar_type());
  Tensor grad_residual = need_residual_grad ? at::empty_like(x) : empty_of(x.scalar_type());
  // Always computed when a reduction runs (dx needs the sums); returned only when asked for.
  Tensor grad_weight = at::empty({in.shape.c}, x.options().dtype(at::kFloat));
  Tensor grad_bias = at::empty({in.shape.c}, x.options().dtype(at::kFloat));
  const Plan plan =
      plan_backward(in.shape, scheme, training, need_input_grad, need_residual_grad, need_weight_grad);
  Tensor workspace = float_workspace(x, plan.workspace_floats);

  a.grad_out = grad_out.data_ptr();
  a.x = x.data_ptr();
  a.mask = relu ? mask.data_ptr<uint8_t>() : nullptr;
  a.mean = mean.data_ptr<float>();
  a.invstd = invstd.data_ptr<float>();
  a.grad_input = need_input_grad ? grad_input.data_ptr() : nullptr;
  a.grad_residual = need_residual_grad ? grad_residual.data_ptr() : nullptr;
  a.grad_weight = grad_weight.data_ptr<float>();
  a.grad_bias = grad_bias.data_ptr<float>();
  a.workspace = plan.workspace_floats > 0 ? workspace.data_ptr<float>() : nullptr;
  a.relu = relu;
  a.training = training;
  a.need_input_grad = need_input_grad;
  a.need_residual_grad = need_residual_grad;
  a.need_weight_grad = need_weight_grad;
  launch_backward(in.shape, plan, a, current_stream(x));
  if (!need_weight_grad) {
    grad_weight = empty_of(at::kFloat);
    grad_bias = empty_of(at::kFloat);
  }
  return {grad_input, grad_residual, grad_weight, grad_bias};
}

// "persistent grid=... threads=... smem=... cache_iters=... iters=... est_us=..." or "two_pass tiles=...
// splits=... est_us=...", for op "forward_train" or "backward" (training, all gradients) on x's shape, dtype,
// layout and device; est_us is the planner's cost estimate (bn_add_relu/plan.h), for comparison with a
// measured time.
std::string plan(const Tensor& x, c10::string_view op) {
  const Input in = check_input(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  Plan p;
  if (op == "forward_train") {
    p = plan_forward_train(in.shape, requested_scheme());
  } else if (op == "backward") {
    p = plan_backward(in.shape, requested_scheme(), true, true, true, true);
  } else {
    TORCH_CHECK(false, "resfused_cuda: op must be 'forward_train' or 'backward', got '", std::string(op), "'");
  }
  char est[32];
  std::snprintf(est, sizeof(est), " est_us=%.1f", estimated_us(in.shape, p, op == "backward"));
  if (p.scheme == Scheme::kPersistent) {
    return "persistent grid=" + std::to_string(p.grid) + " threads=" + std::to_string(p.threads) +
           " smem=" + std::to_string(p.smem) + " cache_iters=" + std::to_string(p.cache_iters) +
           " iters=" + std::to_string(p.iters) + est;
  }
  return "two_pass tiles=" + std::to_string(p.num_tiles) + " splits=" + std::to_string(p.splits) + est;
}

}  // namespace
}  // namespace resfused

TORCH_LIBRARY(resfused_cuda, m) {
  m.def(
      "bn_add_relu_forward_train(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps, bool relu) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bn_add_relu_forward_eval(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, "
      "Tensor running_mean, Tensor running_var, float eps, bool relu, bool save_mask) -> (Tensor, Tensor)");
  m.def(
      "bn_add_relu_backward(Tensor grad_out, Tensor x, Tensor mask, Tensor mean, Tensor invstd, Tensor? weight, "
      "bool relu, bool training, bool need_input_grad, bool need_residual_grad, bool need_weight_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("bn_add_relu_plan(Tensor x, str op) -> str");
}

TORCH_LIBRARY_IMPL(resfused_cuda, CUDA, m) {
  m.impl("bn_add_relu_forward_train", &resfused::forward_train);
  m.impl("bn_add_relu_forward_eval", &resfused::forward_eval);
  m.impl("bn_add_relu_backward", &resfused::backward);
  m.impl("bn_add_relu_plan", &resfused::plan);
}
