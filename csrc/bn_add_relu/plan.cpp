// The planner of the fused BatchNorm + add + ReLU kernels (see plan.h). Plain C++.

#include "plan.h"

#include <algorithm>
#include <vector>

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

namespace {

int batch_of(DType t) { return t == DType::kFloat ? kBatchF32 : kBatch16; }

// One streaming phase of a kernel (see CostModel in plan.h).
struct Phase {
  double hbm_bytes = 0, sm_bytes = 0;  // through HBM; through the SMs (HBM and L2)
  int64_t blocks = 0;
  int threads = 0, occ = 1;  // threads per block; co-resident blocks per SM
  int streams = 1;           // tensors each thread loads from
};

double phase_us(const Phase& ph, const Shape& s, const DeviceProps& d, const CostModel& m) {
  if (ph.blocks <= 0 || ph.sm_bytes <= 0) return 0;
  const double memory = ph.hbm_bytes / m.hbm_bytes_per_us;
  const int64_t per_sm = ceil_div(ph.blocks, std::max(d.sms, 1));
  const int64_t resident = std::min<int64_t>(per_sm, std::max(ph.occ, 1));
  const double busiest = ph.sm_bytes * static_cast<double>(per_sm) / static_cast<double>(ph.blocks);
  const double in_flight = static_cast<double>(resident) * ph.threads * std::max(ph.streams, 1) * batch_of(s.dtype) *
                           kGroup * esize(s.dtype);
  return std::max(memory, busiest * m.latency_us / in_flight);
}

}  // namespace

CostEstimate estimate_cost(const Shape& s, const Plan& plan, bool backward, const PlanTarget& target,
                           const CostModel& m) {
  CostEstimate e;
  const Geo g = geometry(s);
  const DeviceProps& d = target.props();
  const double elems = static_cast<double>(s.n) * static_cast<double>(s.c) * static_cast<double>(s.hw);
  const double X = elems * esize(s.dtype);  // one pass over an (N, C, H, W) tensor
  const double mask = elems / kGroup;       // the packed ReLU mask
  std::vector<Phase> phases;
  if (plan.scheme == Scheme::kPersistent) {
    const KernelRef k{s.dtype, g.cl, backward, KernelRole::kPersistent};
    Phase ph;
    ph.blocks = plan.grid;
    ph.threads = plan.threads;
    ph.occ = target.occupancy(k, plan.threads, plan.smem);
    // re-read: the groups past cache_iters of every thread (x; backward also g)
    const double uncached = plan.iters > 0 ? 1.0 - static_cast<double>(plan.cache_iters) / plan.iters : 0.0;
    const double reread = uncached * X * (backward ? 2 : 1);
    const double reread_hbm = std::max(0.0, reread - 0.5 * static_cast<double>(d.l2_bytes));
    // reduce phase: forward reads x; backward reads dy, the mask and x and writes g
    ph.hbm_bytes = ph.sm_bytes = backward ? 3 * X + mask : X;
    ph.streams = backward ? 2 : 1;
    phases.push_back(ph);
    // elementwise phase: forward re-reads, reads the residual, writes y and the mask; backward re-reads
    // and writes dx
    const double rest = backward ? X : 2 * X + mask;
    ph.hbm_bytes = reread_hbm + rest;
    ph.sm_bytes = reread + rest;
    ph.streams = backward ? (reread > 0 ? 2 : 1) : 1 + (reread > 0);  // stores need no loads in flight
    phases.push_back(ph);
    e.launches = 1;
    e.grid_syncs = 1;
  } else {
    int tx = 1, ty = kThreads;
    if (g.cl) {
      tx = cl_tx(g.gpr);
      ty = kThreads / tx;
    }
    Phase red;
    red.blocks = static_cast<int64_t>(plan.num_tiles) * plan.splits;
    red.threads = kThreads;
    red.occ = target.occupancy(KernelRef{s.dtype, g.cl, backward, KernelRole::kReduce}, kThreads,
                               static_cast<size_t>(tree_floats(g, tx, ty, backward)) * sizeof(float));
    red.hbm_bytes = red.sm_bytes = backward ? 3 * X + mask : X;  // forward: x; backward: dy, mask, x, g written
    red.streams = backward ? 2 : 1;
    phases.push_back(red);
    const ElementwiseGrid eg = elementwise_grid(g, batch_of(s.dtype));
    Phase el;
    el.blocks = static_cast<int64_t>(eg.grid_x) * eg.grid_y;
    el.threads = static_cast<int>(eg.block_x * eg.block_y);
    el.occ = target.occupancy(KernelRef{s.dtype, g.cl, backward, KernelRole::kElementwise}, el.threads, 0);
    el.hbm_bytes = el.sm_bytes = backward ? 3 * X : 3 * X + mask;  // g and x read, dx written; x and r, y, mask
    el.streams = 2;
    phases.push_back(el);
    e.launches = 3;  // with the finalize kernel between them
  }
  for (const Phase& ph : phases) {
    e.us += phase_us(ph, s, d, m);
    e.hbm_bytes += ph.hbm_bytes;
  }
  e.us += e.launches * m.launch_us + e.grid_syncs * m.grid_sync_us;
  return e;
}

namespace {

// The scheme a request runs: two-pass unless asked for (or, under auto, estimated cheaper) and feasible.
Plan choose(const Shape& s, Scheme requested, bool backward, bool persistent_allowed, int64_t cache_cap,
            const PlanTarget& target) {
  Plan two;
  plan_two_pass(s, backward, target, two);
  if (requested == Scheme::kTwoPass || !persistent_allowed) return two;
  Plan pers;
  if (!plan_persistent(s, backward, cache_cap, target, pers)) return two;
  if (requested == Scheme::kPersistent) return pers;
  return estimate_cost(s, pers, backward, target).us <= estimate_cost(s, two, backward, target).us ? pers : two;
}

}  // namespace

Plan make_forward_train_plan(const Shape& s, Scheme requested, int64_t cache_cap, const PlanTarget& target) {
  return choose(s, requested, false, true, cache_cap, target);
}

Plan make_backward_plan(const Shape& s, Scheme requested, bool training, bool need_input_grad, bool need_weight_grad,
                        int64_t cache_cap, const PlanTarget& target) {
  const bool train_dx = training && need_input_grad;
  const bool sums = need_weight_grad || train_dx;
  Plan plan = choose(s, requested, true, train_dx, cache_cap, target);
  if (plan.scheme == Scheme::kTwoPass && !sums) plan.workspace_floats = 0;
  return plan;
}

PlanCache::Key PlanCache::key(const Shape& s, Scheme requested, int64_t cache_cap, int kind) {
  return Key{static_cast<int>(s.dtype), static_cast<int>(s.layout), s.n, s.c, s.hw, s.device,
             static_cast<int>(requested), cache_cap, kind};
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
  for (Scheme requested : {Scheme::kPersistent, Scheme::kAuto})
    cache.put(PlanCache::key(s, requested, cache_cap, kind), two);
  return two;
}

}  // namespace resfused
