// Launch sequences of the fused BatchNorm + add + ReLU op: which kernels run, in which order, with
// which parameters, over a launcher L that the includer provides:
//   void L::launch(Kernel k, Dims grid, Dims block, size_t smem, const KParams& p)
//   bool L::launch_cooperative(Kernel k, Dims grid, Dims block, size_t smem, const KParams& p)
//        false: the launch was refused (the grid is not co-resident) and nothing ran
// The GPU's launcher (gpu_launch.cuh) calls the CUDA runtime; the CPU SIMT runtime's (csrc/sim/) runs the
// kernels on fibers. RESFUSED_CHECK(cond, message) must be defined by the includer (TORCH_CHECK on the GPU).
#pragma once

#include "persistent.cuh"
#include "plan.h"
#include "two_pass.cuh"

namespace resfused {
namespace {

using Kernel = void (*)(KParams);

struct Dims {
  unsigned x = 1, y = 1, z = 1;
};

inline Dims dims(int64_t x, int64_t y = 1) { return Dims{static_cast<unsigned>(x), static_cast<unsigned>(y), 1u}; }

KParams base_params(const Geo& g, const Plan& plan) {
  // Group indices are 32-bit in the kernels (FastDiv): N*C*ceil(H*W/8) < 2^31.
  RESFUSED_CHECK(g.outer * static_cast<int64_t>(g.gpr) < (int64_t{1} << 31),
                 "resfused_cuda: tensor too large (more than 2^31 groups of 8 elements)");
  KParams p{};
  p.outer = g.outer;
  p.batch = g.batch;
  p.M = g.M;
  p.inner = g.inner;
  p.chan_stride = g.cl ? 1 : g.inner;
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

template <typename E, class L>
void launch_apply(L& l, const Geo& g, KParams p) {
  if (g.outer == 0 || g.gpr == 0) return;
  const ElementwiseGrid e = elementwise_grid(g, E::kBatch);
  p.per_block = e.per_block;
  p.cache_iters = 0;
  l.launch(g.cl ? &cl_apply_kernel<E> : &nchw_apply_kernel<E>, dims(e.grid_x, e.grid_y), dims(e.block_x, e.block_y),
           0, p);
}

// Two-pass reduction launch (statistics or backward sums) over plan.num_tiles x plan.splits blocks.
template <typename E, class L>
void launch_reduce(L& l, const Geo& g, const Plan& plan, KParams p, bool backward) {
  if (plan.splits == 0) return;
  int tx = 1, ty = kThreads;
  if (g.cl) {
    tx = cl_tx(g.gpr);
    ty = kThreads / tx;
  }
  p.per_block = plan.per_block;
  p.cache_iters = 0;
  const size_t smem = static_cast<size_t>(tree_floats(g, tx, ty, backward)) * sizeof(float);
  if (g.cl)
    l.launch(backward ? &cl_bwd_reduce_kernel<E> : &cl_stats_kernel<E>, dims(plan.num_tiles, plan.splits),
             dims(tx, ty), smem, p);
  else
    l.launch(backward ? &nchw_bwd_reduce_kernel<E> : &nchw_stats_kernel<E>,
             dims(static_cast<int64_t>(plan.splits) * g.C), dims(kThreads), smem, p);
}

template <typename E, class L>
void launch_finalize(L& l, const Geo& g, const KParams& p, bool backward) {
  if (g.C == 0) return;
  l.launch(backward ? &finalize_sums_kernel : &finalize_stats_kernel<E>, dims(ceil_div(g.C, kFinalizeTX)),
           dims(kFinalizeTX, kFinalizeTY), 0, p);
}

template <typename E, class L>
bool launch_persistent(L& l, const Geo& g, const Plan& plan, KParams p, bool backward) {
  const int threads = plan.threads;
  int tx = 1, ty = threads;  // nchw: 1-D blocks, the tree runs along threadIdx.x
  if (g.cl) {
    tx = cl_tx(g.gpr);
    ty = threads / tx;
  }
  p.per_block = plan.per_block;
  p.cache_iters = plan.cache_iters;
  p.tree_floats = static_cast<int>(tree_floats(g, tx, ty, backward));
  Kernel kernel;
  if (backward)
    kernel = g.cl ? &cl_bwd_persistent_kernel<E> : &nchw_bwd_persistent_kernel<E>;
  else
    kernel = g.cl ? &cl_fwd_persistent_kernel<E> : &nchw_fwd_persistent_kernel<E>;
  return l.launch_cooperative(kernel, dims(plan.grid), g.cl ? dims(tx, ty) : dims(threads), plan.smem, p);
}

// False when the plan's persistent launch was refused (nothing was written); true when the op ran.
template <typename E, class L>
bool forward_train_impl(L& l, const Shape& s, const Plan& plan, const ForwardTrainArgs& a) {
  const Geo g = geometry(s);
  if (g.C == 0) return true;
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

  if (plan.scheme == Scheme::kPersistent) return launch_persistent<E>(l, g, plan, p, false);
  launch_reduce<E>(l, g, plan, p, false);
  launch_finalize<E>(l, g, p, false);
  p.mean_in = a.mean;
  p.scale_in = a.invstd;
  p.is_var = false;
  launch_apply<E>(l, g, p);
  return true;
}

template <typename E, class L>
void forward_eval_impl(L& l, const Shape& s, const ForwardEvalArgs& a) {
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
  launch_apply<E>(l, g, p);
}

// False when the plan's persistent launch was refused (nothing was written); true when the op ran.
template <typename E, class L>
bool backward_impl(L& l, const Shape& s, const Plan& plan, const BackwardArgs& a) {
  const Geo g = geometry(s);
  if (g.C == 0) return true;
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
    return launch_persistent<E>(l, g, plan, p, true);
  }
  p.write_dx = a.need_input_grad && !a.training;
  if (p.do_sums || p.write_dres || p.write_dx) launch_reduce<E>(l, g, plan, p, true);
  if (p.do_sums) launch_finalize<E>(l, g, p, true);
  if (train_dx && g.outer > 0 && g.gpr > 0) {
    p.write_dx = false;
    p.dres_is_g = a.need_residual_grad;
    const ElementwiseGrid e = elementwise_grid(g, E::kBatch);
    p.per_block = e.per_block;
    p.cache_iters = 0;
    l.launch(g.cl ? &cl_dx_kernel<E> : &nchw_dx_kernel<E>, dims(e.grid_x, e.grid_y), dims(e.block_x, e.block_y), 0,
             p);
  }
  return true;
}

// The kernel the planner asks about (device queries on the GPU).
template <typename E>
Kernel planned_kernel(const KernelRef& k) {
  if (k.role == KernelRole::kPersistent) {
    if (k.backward) return k.cl ? &cl_bwd_persistent_kernel<E> : &nchw_bwd_persistent_kernel<E>;
    return k.cl ? &cl_fwd_persistent_kernel<E> : &nchw_fwd_persistent_kernel<E>;
  }
  if (k.role == KernelRole::kElementwise) {
    if (k.backward) return k.cl ? &cl_dx_kernel<E> : &nchw_dx_kernel<E>;
    return k.cl ? &cl_apply_kernel<E> : &nchw_apply_kernel<E>;
  }
  if (k.backward) return k.cl ? &cl_bwd_reduce_kernel<E> : &nchw_bwd_reduce_kernel<E>;
  return k.cl ? &cl_stats_kernel<E> : &nchw_stats_kernel<E>;
}

}  // namespace
}  // namespace resfused
