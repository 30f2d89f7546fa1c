// The planner of the fused BatchNorm + add + ReLU kernels (see plan.h). Plain C++.

#include "plan.h"

#include <algorithm>

#include "config.h"

namespace resfused {

int modelled_occupancy(const DeviceProps& d, int regs_per_thread, int static_smem, int threads, size_t dyn_smem) {
  if (threads <= 0) return 0;
  const int warps = (threads + 31) / 32;
  const int by_threads = d.threads_per_sm / (warps * 32);
  const int regs_per_warp = ((regs_per_thread * 32 + 255) / 256) * 256;
  const int by_regs = regs_per_warp > 0 ? (d.regs_per_sm / regs_per_warp) / warps : d.max_blocks_per_sm;
  const int64_t block_smem = static_cast<int64_t>(static_smem) + static_cast<int64_t>(dyn_smem);
  if (block_smem > d.smem_optin) return 0;
  const int64_t with_reserved = block_smem + d.smem_reserved;
  const int by_smem = static_cast<int>(std::min<int64_t>(d.smem_per_sm / with_reserved, d.max_blocks_per_sm));
  return std::max(0, std::min({by_threads, by_regs, by_smem, d.max_blocks_per_sm}));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

namespace {

int pow2_at_least(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

}  // namespace

int cl_tx(int gpr) { return std::min(32, pow2_at_least(std::max(gpr, 1))); }

int esize(DType t) { return t == DType::kFloat ? 4 : 2; }

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

int64_t split_work(const Geo& g) { return g.cl ? g.outer : g.batch * g.gpr; }

int64_t tree_floats(const Geo& g, int tx, int ty, bool backward) {
  const int per = g.cl ? (backward ? sums_floats(kGroup) : welford_floats(kGroup))
                       : (backward ? sums_floats(1) : welford_floats(1));
  // persistent kernels also broadcast 2 x 8 x TX floats through the same buffer
  return std::max<int64_t>(static_cast<int64_t>(per) * tx * std::max(ty / 2, 1), 2 * kGroup * tx);
}

int64_t prm_floats(const Geo& g, int tx, bool backward) {
  return g.cl ? static_cast<int64_t>(backward ? kDxFields : kApplyFields) * kGroup * tx : 0;
}

ElementwiseGrid elementwise_grid(const Geo& g, int batch) {
  ElementwiseGrid e;
  if (g.cl) {
    const int tx = cl_tx(g.gpr), ty = kThreads / tx;
    // a few batches per thread; more rows per block where the grid's y limit needs it
    const int64_t rows_per_block =
        std::max<int64_t>(static_cast<int64_t>(ty) * batch * kApplyBatches, ceil_div(g.outer, 65535));
    e.per_block = rows_per_block;
    e.grid_x = static_cast<unsigned>(ceil_div(g.gpr, tx));
    e.grid_y = static_cast<unsigned>(ceil_div(g.outer, rows_per_block));
    e.block_x = tx;
    e.block_y = ty;
  } else {
    const int64_t groups = g.outer * g.gpr;
    e.per_block = 0;
    e.grid_x = static_cast<unsigned>(ceil_div(groups, static_cast<int64_t>(kThreads) * batch));
    e.block_x = kThreads;
  }
  return e;
}

Scheme resolve(Scheme requested) {
  return requested == Scheme::kTwoPass ? Scheme::kTwoPass : Scheme::kPersistent;
}

void plan_two_pass(const Shape& s, bool backward, const PlanTarget& target, Plan& plan) {
  const Geo g = geometry(s);
  plan.scheme = Scheme::kTwoPass;
  const int64_t work = split_work(g);
  if (g.C == 0 || work == 0) {
    plan.num_tiles = 0;
    plan.splits = 0;
    plan.workspace_floats = 0;
    return;
  }
  const DeviceProps& info = target.props();
  int tx = 1, ty = kThreads;
  if (g.cl) {
    tx = cl_tx(g.gpr);
    ty = kThreads / tx;
  }
  const int num_tiles = g.cl ? static_cast<int>(ceil_div(g.gpr, tx)) : g.C;
  const size_t smem = static_cast<size_t>(tree_floats(g, tx, ty, backward)) * sizeof(float);
  const int occ = target.occupancy(KernelRef{s.dtype, g.cl, backward, KernelRole::kReduce}, kThreads, smem);
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

bool plan_persistent(const Shape& s, bool backward, int64_t cache_cap, const PlanTarget& target, Plan& plan) {
  const Geo g = geometry(s);
  const int64_t work = split_work(g);
  if (g.C == 0 || work == 0) return false;
  const DeviceProps& info = target.props();
  if (!info.coop) return false;
  const KernelRef kernel{s.dtype, g.cl, backward, KernelRole::kPersistent};
  const int static_smem = target.static_smem(kernel);

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
        std::min<int64_t>(info.smem_optin, info.smem_per_sm / bps - info.smem_reserved) - static_smem;
    int64_t room = per_block_smem - tree_bytes;
    if (room < 0) continue;
    if (cache_cap >= 0) room = std::min(room, cache_cap);
    const int cache_iters =
        static_cast<int>(std::min<int64_t>(iters, room / (static_cast<int64_t>(threads) * group_bytes)));
    const size_t smem = static_cast<size_t>(cache_iters) * threads * group_bytes + tree_bytes;
    const int occ = target.occupancy(kernel, threads, smem);
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

Plan make_forward_train_plan(const Shape& s, Scheme requested, int64_t cache_cap, const PlanTarget& target) {
  Plan plan;
  if (resolve(requested) == Scheme::kPersistent && plan_persistent(s, false, cache_cap, target, plan)) return plan;
  plan_two_pass(s, false, target, plan);
  return plan;
}

Plan make_backward_plan(const Shape& s, Scheme requested, bool training, bool need_input_grad, bool need_weight_grad,
                        int64_t cache_cap, const PlanTarget& target) {
  const bool train_dx = training && need_input_grad;
  const bool sums = need_weight_grad || train_dx;
  Plan plan;
  if (train_dx && resolve(requested) == Scheme::kPersistent && plan_persistent(s, true, cache_cap, target, plan))
    return plan;
  plan_two_pass(s, true, target, plan);
  if (!sums) plan.workspace_floats = 0;
  return plan;
}

PlanCache::Key PlanCache::key(const Shape& s, Scheme requested, int64_t cache_cap, int kind) {
  return Key{static_cast<int>(s.dtype), static_cast<int>(s.layout), s.n, s.c, s.hw, s.device,
             static_cast<int>(resolve(requested)), cache_cap, kind};
}

Plan PlanCache::get(const Key& key, const std::function<Plan()>& make) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = plans_.find(key);
    if (it != plans_.end()) return it->second;
  }
  const Plan plan = make();
  put(key, plan);
  return plan;
}

void PlanCache::put(const Key& key, const Plan& plan) {
  std::lock_guard<std::mutex> lock(mu_);
  if (plans_.size() > 4096) plans_.clear();  // bound the memory of shape-polymorphic workloads
  plans_[key] = plan;
}

void PlanCache::clear() {
  std::lock_guard<std::mutex> lock(mu_);
  plans_.clear();
}

int backward_kind(bool training, bool need_input_grad, bool need_weight_grad) {
  const bool train_dx = training && need_input_grad;
  const bool sums = need_weight_grad || train_dx;
  return 1 + 2 * train_dx + sums;
}

Plan refuse_persistent(PlanCache& cache, const Shape& s, bool backward, bool training, bool need_input_grad,
                       bool need_weight_grad, int64_t cache_cap, const PlanTarget& target) {
  const Plan two = backward ? make_backward_plan(s, Scheme::kTwoPass, training, need_input_grad, need_weight_grad,
                                                 cache_cap, target)
                            : make_forward_train_plan(s, Scheme::kTwoPass, cache_cap, target);
  const int kind = backward ? backward_kind(training, need_input_grad, need_weight_grad) : 0;
  cache.put(PlanCache::key(s, Scheme::kPersistent, cache_cap, kind), two);
  return two;
}

}  // namespace resfused
