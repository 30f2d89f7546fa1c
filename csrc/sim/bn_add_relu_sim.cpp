// The `cuda_sim` test backend's native side: the real kernels and launch sequences of csrc/bn_add_relu/
// over the CPU SIMT runtime, planned by the same planner as the GPU, fed a simulated device's properties
// (H100's by default, set from resfused/_cuda_sim.py). A C API for ctypes; every entry returns 0 on
// success, -1 on an error (message: rf_sim_error()).
//
// Compiled with -fsanitize=kernel-address: the instrumentation calls the runtime's access hooks (race
// and bounds checks, runtime.h); no sanitizer runtime is linked.
#define RESFUSED_SIM 1

#include <cstdio>
#include <exception>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#define RESFUSED_CHECK(cond, msg)                      \
  do {                                                 \
    if (!(cond)) throw std::invalid_argument(msg);    \
  } while (0)

#include "../bn_add_relu/launch.cuh"
#include "runtime.h"

namespace resfused {
namespace {

// Simulated device. Register counts per thread are assumptions (the host compiler cannot tell what
// ptxas allocates): 64 for the 256-thread two-pass kernels (reduce, elementwise), 64 for the
// persistent kernels (their __launch_bounds__(512, 1) allows up to 128; bench/results/static/sm90.json
// has what ptxas gives each). launch_persistent_regs is what the launch-time
// co-residency check uses: tests raise it above the planner's to make a planned cooperative launch fail.
struct SimDevice {
  DeviceProps props{132, 233472, 232448, 1024, 65536, 2048, 32, true, 50331648};
  int reduce_regs = 64, elementwise_regs = 64, persistent_regs = 64, launch_persistent_regs = 64;
};

SimDevice g_device;
PlanCache g_plans;
std::string g_error;
std::map<std::string, int64_t> g_kernel_launches;
std::string g_counts_text;

int static_smem_of(const KernelRef& k) {
  // the static __shared__ arrays of the kernels (two_pass.cuh): only the cl backward reduction has one
  if (k.role == KernelRole::kReduce && k.cl && k.backward) return kReduceFields * kGroup * kMaxTX * 4;
  return 0;
}

class SimTarget final : public PlanTarget {
 public:
  const DeviceProps& props() const override { return g_device.props; }
  int static_smem(const KernelRef& k) const override { return static_smem_of(k); }
  int occupancy(const KernelRef& k, int threads, size_t dyn_smem) const override {
    const int regs = k.role == KernelRole::kPersistent    ? g_device.persistent_regs
                     : k.role == KernelRole::kElementwise ? g_device.elementwise_regs
                                                          : g_device.reduce_regs;
    return modelled_occupancy(g_device.props, regs, static_smem_of(k), threads, dyn_smem);
  }
};

template <typename E>
void name_kernels(std::map<Kernel, std::string>& m, const char* e) {
  const std::string t = std::string("<") + e + ">";
  m[&cl_stats_kernel<E>] = "cl_stats_kernel" + t;
  m[&nchw_stats_kernel<E>] = "nchw_stats_kernel" + t;
  m[&cl_apply_kernel<E>] = "cl_apply_kernel" + t;
  m[&nchw_apply_kernel<E>] = "nchw_apply_kernel" + t;
  m[&cl_bwd_reduce_kernel<E>] = "cl_bwd_reduce_kernel" + t;
  m[&nchw_bwd_reduce_kernel<E>] = "nchw_bwd_reduce_kernel" + t;
  m[&cl_dx_kernel<E>] = "cl_dx_kernel" + t;
  m[&nchw_dx_kernel<E>] = "nchw_dx_kernel" + t;
  m[&cl_fwd_persistent_kernel<E>] = "cl_fwd_persistent_kernel" + t;
  m[&nchw_fwd_persistent_kernel<E>] = "nchw_fwd_persistent_kernel" + t;
  m[&cl_bwd_persistent_kernel<E>] = "cl_bwd_persistent_kernel" + t;
  m[&nchw_bwd_persistent_kernel<E>] = "nchw_bwd_persistent_kernel" + t;
  m[&finalize_stats_kernel<E>] = "finalize_stats_kernel" + t;
}

const std::string& kernel_name(Kernel k) {
  static std::map<Kernel, std::string> names;
  if (names.empty()) {
    name_kernels<F32>(names, "F32");
    name_kernels<F16>(names, "F16");
    name_kernels<BF16>(names, "BF16");
    names[&finalize_sums_kernel] = "finalize_sums_kernel";
  }
  static const std::string unknown = "unknown_kernel";
  auto it = names.find(k);
  return it == names.end() ? unknown : it->second;
}

struct Call {
  Kernel kernel;
  const KParams* params;
};

// Runs on every fiber: the kernel's by-value parameter is copied here, outside the instrumentation
// (the Call lives on the scheduler's stack, which the bounds check does not know).
__attribute__((no_sanitize_address)) void run_thread(void* arg) {
  const Call* c = static_cast<const Call*>(arg);
  c->kernel(*c->params);
}

resfused_sim::Index3 index3(Dims d) { return resfused_sim::Index3{d.x, d.y, d.z}; }

struct SimLauncher {
  void launch(Kernel k, Dims grid, Dims block, size_t smem, const KParams& p) {
    run(k, grid, block, smem, p, false);
  }
  bool launch_cooperative(Kernel k, Dims grid, Dims block, size_t smem, const KParams& p) {
    // refused exactly when the simulated device cannot hold the whole grid at once
    const int threads = static_cast<int>(block.x * block.y * block.z);
    const int occ = modelled_occupancy(g_device.props, g_device.launch_persistent_regs, 0, threads, smem);
    const int64_t blocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
    if (!g_device.props.coop || static_cast<int64_t>(occ) * g_device.props.sms < blocks) return false;
    run(k, grid, block, smem, p, true);
    return true;
  }
  void run(Kernel k, Dims grid, Dims block, size_t smem, const KParams& p, bool cooperative) {
    const std::string& name = kernel_name(k);
    if (smem + static_smem_total(k) > static_cast<size_t>(g_device.props.smem_optin))
      throw std::runtime_error("cuda_sim: kernel " + name + " asks for " + std::to_string(smem) +
                               " bytes of dynamic shared memory, more than the device's opt-in limit");
    ++g_kernel_launches[name];
    Call c{k, &p};
    resfused_sim::run(name.c_str(), index3(grid), index3(block), smem, cooperative, &run_thread, &c);
  }
  static size_t static_smem_total(Kernel k) {
    const bool cl_bwd_reduce = k == &cl_bwd_reduce_kernel<F32> || k == &cl_bwd_reduce_kernel<F16> ||
                               k == &cl_bwd_reduce_kernel<BF16>;
    return cl_bwd_reduce ? static_smem_of(KernelRef{DType::kFloat, true, true, KernelRole::kReduce}) : 0;
  }
};

Shape make_shape(int dtype, int layout, int64_t n, int64_t c, int64_t hw) {
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("cuda_sim: dtype code must be 0, 1 or 2");
  if (layout < 0 || layout > 1) throw std::invalid_argument("cuda_sim: layout code must be 0 or 1");
  Shape s;
  s.dtype = static_cast<DType>(dtype);
  s.layout = static_cast<Layout>(layout);
  s.n = n;
  s.c = c;
  s.hw = hw;
  s.device = 0;
  return s;
}

Scheme make_scheme(int scheme) {
  if (scheme < 0 || scheme > 2) throw std::invalid_argument("cuda_sim: scheme code must be 0, 1 or 2");
  return static_cast<Scheme>(scheme);
}

Plan plan_for(const Shape& s, int op, Scheme requested, int64_t cap, bool training, bool need_input_grad,
              bool need_weight_grad) {
  SimTarget target;
  if (op == 0)
    return g_plans.get(PlanCache::key(s, requested, cap, 0),
                       [&] { return make_forward_train_plan(s, requested, cap, target); });
  return g_plans.get(PlanCache::key(s, requested, cap, backward_kind(training, need_input_grad, need_weight_grad)), [&] {
    return make_backward_plan(s, requested, training, need_input_grad, need_weight_grad, cap, target);
  });
}

void plan_to_array(const Plan& p, int64_t* out) {
  out[0] = static_cast<int64_t>(p.scheme);
  out[1] = p.workspace_floats;
  out[2] = p.num_tiles;
  out[3] = p.splits;
  out[4] = p.per_block;
  out[5] = p.grid;
  out[6] = p.threads;
  out[7] = static_cast<int64_t>(p.smem);
  out[8] = p.cache_iters;
  out[9] = p.iters;
}

Plan plan_from_array(const int64_t* in) {
  Plan p;
  p.scheme = static_cast<Scheme>(in[0]);
  p.workspace_floats = in[1];
  p.num_tiles = static_cast<int>(in[2]);
  p.splits = static_cast<int>(in[3]);
  p.per_block = in[4];
  p.grid = static_cast<int>(in[5]);
  p.threads = static_cast<int>(in[6]);
  p.smem = static_cast<size_t>(in[7]);
  p.cache_iters = static_cast<int>(in[8]);
  p.iters = static_cast<int>(in[9]);
  return p;
}

template <class F>
int guarded(F&& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    g_error = e.what();
    return -1;
  }
}

template <template <typename> class Op, typename... A>
auto by_dtype(DType t, A&&... a) {
  switch (t) {
    case DType::kFloat:
      return Op<F32>::run(a...);
    case DType::kHalf:
      return Op<F16>::run(a...);
    default:
      return Op<BF16>::run(a...);
  }
}

template <typename E>
struct ForwardTrainOp {
  static bool run(const Shape& s, const Plan& plan, const ForwardTrainArgs& a) {
    SimLauncher l;
    return forward_train_impl<E>(l, s, plan, a);
  }
};
template <typename E>
struct ForwardEvalOp {
  static bool run(const Shape& s, const ForwardEvalArgs& a) {
    SimLauncher l;
    forward_eval_impl<E>(l, s, a);
    return true;
  }
};
template <typename E>
struct BackwardOp {
  static bool run(const Shape& s, const Plan& plan, const BackwardArgs& a) {
    SimLauncher l;
    return backward_impl<E>(l, s, plan, a);
  }
};

}  // namespace
}  // namespace resfused

using namespace resfused;

extern "C" {

const char* rf_sim_error() { return g_error.c_str(); }

int rf_sim_configure(const int* props, int reduce_regs, int elementwise_regs, int persistent_regs,
                     int launch_persistent_regs) {
  return guarded([&] {
    DeviceProps d;
    d.sms = props[0];
    d.smem_per_sm = props[1];
    d.smem_optin = props[2];
    d.smem_reserved = props[3];
    d.regs_per_sm = props[4];
    d.threads_per_sm = props[5];
    d.max_blocks_per_sm = props[6];
    d.coop = props[7] != 0;
    d.l2_bytes = props[8];
    g_device.props = d;
    g_device.reduce_regs = reduce_regs;
    g_device.elementwise_regs = elementwise_regs;
    g_device.persistent_regs = persistent_regs;
    g_device.launch_persistent_regs = launch_persistent_regs;
    g_plans.clear();
    return 0;
  });
}

int rf_sim_set_run(int order, uint64_t seed, int races, int bounds) {
  return guarded([&] {
    if (order < 0 || order > 2) throw std::invalid_argument("cuda_sim: order must be 0, 1 or 2");
    resfused_sim::set_order(static_cast<resfused_sim::Order>(order), seed);
    resfused_sim::set_checks(races != 0, bounds != 0);
    return 0;
  });
}

int rf_sim_set_regions(const void* const* ptrs, const int64_t* bytes, const char* const* names, int n) {
  return guarded([&] {
    static std::vector<std::string> kept;
    std::vector<resfused_sim::Region> r;
    kept.assign(names, names + n);
    for (int i = 0; i < n; ++i)
      r.push_back(resfused_sim::Region{ptrs[i], static_cast<size_t>(bytes[i]), kept[i].c_str()});
    resfused_sim::set_regions(r.data(), n);
    return 0;
  });
}

// op 0: forward_train, 1: backward. out: 10 int64 (plan_to_array).
int rf_sim_plan(int op, int dtype, int layout, int64_t n, int64_t c, int64_t hw, int scheme, int64_t cache_cap,
                int training, int need_input_grad, int need_weight_grad, int64_t* out) {
  return guarded([&] {
    const Plan p = plan_for(make_shape(dtype, layout, n, c, hw), op, make_scheme(scheme), cache_cap, training != 0,
                            need_input_grad != 0, need_weight_grad != 0);
    plan_to_array(p, out);
    return 0;
  });
}

// The planner's cost estimate (plan.h) of running plan (10 int64, plan_to_array) for op (0: forward_train,
// 1: the training backward with the input's gradient) on the simulated device. out: us, HBM bytes,
// launches, grid syncs.
int rf_sim_plan_cost(int op, int dtype, int layout, int64_t n, int64_t c, int64_t hw, const int64_t* plan,
                     double* out) {
  return guarded([&] {
    const CostEstimate e = estimate_cost(make_shape(dtype, layout, n, c, hw), plan_from_array(plan), op != 0,
                                         SimTarget());
    out[0] = e.us;
    out[1] = e.hbm_bytes;
    out[2] = e.launches;
    out[3] = e.grid_syncs;
    return 0;
  });
}

// Returns 1 when the plan's cooperative launch was refused (nothing ran), 0 when the op ran.
int rf_sim_forward_train(int dtype, int layout, int64_t n, int64_t c, int64_t hw, const int64_t* plan, const void* x,
                         const void* residual, const float* weight, const float* bias, float* running_mean,
                         float* running_var, void* y, uint8_t* mask, float* mean, float* invstd, float* workspace,
                         double momentum, double eps, int relu) {
  return guarded([&] {
    const Shape s = make_shape(dtype, layout, n, c, hw);
    ForwardTrainArgs a{x, residual, weight, bias, running_mean, running_var, y, mask, mean, invstd, workspace,
                       momentum, eps, relu != 0};
    return by_dtype<ForwardTrainOp>(s.dtype, s, plan_from_array(plan), a) ? 0 : 1;
  });
}

int rf_sim_forward_eval(int dtype, int layout, int64_t n, int64_t c, int64_t hw, const void* x, const void* residual,
                        const float* weight, const float* bias, const float* running_mean, const float* running_var,
                        void* y, uint8_t* mask, double eps, int relu) {
  return guarded([&] {
    const Shape s = make_shape(dtype, layout, n, c, hw);
    ForwardEvalArgs a{x, residual, weight, bias, running_mean, running_var, y, mask, eps, relu != 0};
    by_dtype<ForwardEvalOp>(s.dtype, s, a);
    return 0;
  });
}

int rf_sim_backward(int dtype, int layout, int64_t n, int64_t c, int64_t hw, const int64_t* plan, const void* grad_out,
                    const void* x, const uint8_t* mask, const float* mean, const float* invstd, const float* weight,
                    void* grad_input, void* grad_residual, float* grad_weight, float* grad_bias, float* workspace,
                    int relu, int training, int need_input_grad, int need_residual_grad, int need_weight_grad) {
  return guarded([&] {
    const Shape s = make_shape(dtype, layout, n, c, hw);
    BackwardArgs a{grad_out,  x,         mask,      mean,           invstd,          weight,
                   grad_input, grad_residual, grad_weight, grad_bias, workspace, relu != 0,
                   training != 0, need_input_grad != 0, need_residual_grad != 0, need_weight_grad != 0};
    return by_dtype<BackwardOp>(s.dtype, s, plan_from_array(plan), a) ? 0 : 1;
  });
}

// A persistent launch of the shape was refused: the planner's refuse_persistent (as the GPU glue) gives the
// two-pass plan and makes it the shape's cached plan. out: the two-pass plan.
int rf_sim_refuse_persistent(int op, int dtype, int layout, int64_t n, int64_t c, int64_t hw, int64_t cache_cap,
                             int training, int need_input_grad, int need_weight_grad, int64_t* out) {
  return guarded([&] {
    const Plan p = refuse_persistent(g_plans, make_shape(dtype, layout, n, c, hw), op != 0, training != 0,
                                     need_input_grad != 0, need_weight_grad != 0, cache_cap, SimTarget());
    plan_to_array(p, out);
    return 0;
  });
}

// "name=count;..." of the kernels launched since the library was loaded.
const char* rf_sim_kernel_counts() {
  g_counts_text.clear();
  for (const auto& kv : g_kernel_launches) g_counts_text += kv.first + "=" + std::to_string(kv.second) + ";";
  return g_counts_text.c_str();
}

}  // extern "C"
