// The planner of the fused BatchNorm + add + ReLU kernels: scheme, grid, block and shared-memory sizes
// from the shape and the device's properties. Plain C++ (no CUDA, no ATen): the GPU glue
// (csrc/bn_add_relu.cu) answers the device questions with the CUDA runtime's queries, the CPU SIMT
// runtime (csrc/sim/) with a model of H100's limits, so both run the same decisions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <tuple>

#include "types.h"

namespace resfused {

struct DeviceProps {
  int sms = 0;                // multiprocessors
  int smem_per_sm = 0;        // shared memory per SM, bytes
  int smem_optin = 0;         // largest shared memory a block may opt in to, bytes
  int smem_reserved = 0;      // shared memory the system reserves per block, bytes
  int regs_per_sm = 0;        // 32-bit registers per SM
  int threads_per_sm = 0;     // resident threads per SM
  int max_blocks_per_sm = 0;  // resident blocks per SM
  bool coop = false;          // cooperative launches supported
  int64_t l2_bytes = 0;       // L2 cache, bytes (the cost model's re-read hits)
};

// The kernels the planner asks about: the two-pass scheme's reduction (statistics or backward sums) and
// its elementwise kernel (apply or dx), or the persistent kernel.
enum class KernelRole : int { kReduce = 0, kPersistent = 1, kElementwise = 2 };
struct KernelRef {
  DType dtype;
  bool cl, backward;
  KernelRole role;
};

// The device questions of the planner.
class PlanTarget {
 public:
  virtual ~PlanTarget() = default;
  virtual const DeviceProps& props() const = 0;
  // bytes of the kernel's static shared memory (on the GPU: after it was allowed the opt-in maximum)
  virtual int static_smem(const KernelRef& k) const = 0;
  // co-resident blocks per SM of the kernel at (threads, dynamic shared memory)
  virtual int occupancy(const KernelRef& k, int threads, size_t dyn_smem) const = 0;
};

// Blocks per SM from the device's limits: threads, registers (regs_per_thread, allocated per warp in
// units of 256), shared memory (static + dynamic + reserved per block) and block slots; 0 when one
// block does not fit.
int modelled_occupancy(const DeviceProps& d, int regs_per_thread, int static_smem, int threads, size_t dyn_smem);

// ---- geometry shared by the planner and the launchers

struct Geo {
  bool cl;
  int64_t outer, M;
  int inner, gpr, C;
  int64_t batch;
};

Geo geometry(const Shape& s);
int64_t ceil_div(int64_t a, int64_t b);
// channels_last block shape: TX threads across 8-channel groups (a power of two <= 32), TY rows.
int cl_tx(int gpr);
int esize(DType t);
// Elements of work along the split axis: cl rows, nchw groups.
int64_t split_work(const Geo& g);
// Reduction-tree floats of a block: Welford (forward) or Sums (backward), 8 channels (cl) or 1.
int64_t tree_floats(const Geo& g, int tx, int ty, bool backward);
// Shared per-channel parameter floats of a persistent channels_last block (nchw keeps them in registers).
int64_t prm_floats(const Geo& g, int tx, bool backward);

// Two-pass elementwise launch (apply / dx): channels_last (tiles, splits) grid with a few batches per
// thread, or a flat grid over nchw groups. batch: groups in flight per thread (E::kBatch).
struct ElementwiseGrid {
  unsigned grid_x = 1, grid_y = 1, block_x = 1, block_y = 1;
  int64_t per_block = 0;
};
ElementwiseGrid elementwise_grid(const Geo& g, int batch);

// ---- the cost model behind `auto`
//
// `auto` plans both schemes and runs the one with the smaller estimated time. A kernel is a sequence of
// streaming phases separated by launches (two-pass: reduce | finalize | elementwise) or grid-wide syncs
// (persistent: reduce phase | merge and elementwise phase). A phase's time is the larger of two floors:
//   memory:   its HBM bytes / hbm_bytes_per_us (re-reads of the persistent scheme that fit in half the
//             L2 are taken as L2 hits: through the SMs but not HBM);
//   the SMs:  the bytes of the busiest SM (ceil(blocks / SMs) blocks' share) over the rate its resident
//             threads sustain, bytes in flight / latency_us (Little's law), bytes in flight = resident
//             blocks x threads x tensors loaded x the groups each thread loads before their first use
//             (config.h's kBatch: 64 bytes). Idle SMs (an NCHW persistent grid of C blocks), low
//             occupancy (the occupancy query, so registers count) and few bytes in flight show here.
// Each launch adds launch_us, each grid-wide sync grid_sync_us. Bytes count the op's full form (residual
// read, ReLU mask written, the residual's gradient written), for the shape only: the plan is cached per
// shape. The constants are H100 SXM assumptions (datasheet bandwidth less a copy's efficiency, a loaded
// latency, launch gaps), not measurements: on a GPU, bench/bench_bn_add_relu.py's resfused-cuda rows record
// the plan with its est_us (bn_add_relu_plan) beside the measured time, to calibrate them; with
// RESFUSED_CUDA_SCHEME=two_pass or persistent they time either scheme. Those two force a scheme
// (persistent where feasible), whatever the model says.
struct CostModel {
  double hbm_bytes_per_us = 3.0e6;  // 3.0 TB/s of H100 SXM's 3.35
  double latency_us = 0.8;          // a load's latency under load
  double launch_us = 2.0;           // gap, ramp and drain of one dependent kernel
  double grid_sync_us = 1.0;        // one cooperative grid-wide barrier
};

struct CostEstimate {
  double us = 0;           // estimated time
  double hbm_bytes = 0;    // bytes through HBM
  int launches = 0, grid_syncs = 0;
};

// The estimate for running plan (either scheme) on s: forward training (backward false) or the training
// backward with the input's gradient (backward true). Pure: a function of the shape, the plan, the
// target's occupancy answers and the model.
CostEstimate estimate_cost(const Shape& s, const Plan& plan, bool backward, const PlanTarget& target,
                           const CostModel& model = CostModel());

// Two-pass partition of the reduction: enough blocks for one full wave.
void plan_two_pass(const Shape& s, bool backward, const PlanTarget& target, Plan& plan);
// Persistent plan: co-resident grid (occupancy-confirmed), x (and g) cached in shared memory up to
// cache_cap bytes per block (-1: no cap). False when the grid cannot be co-resident.
bool plan_persistent(const Shape& s, bool backward, int64_t cache_cap, const PlanTarget& target, Plan& plan);

Plan make_forward_train_plan(const Shape& s, Scheme requested, int64_t cache_cap, const PlanTarget& target);
Plan make_backward_plan(const Shape& s, Scheme requested, bool training, bool need_input_grad, bool need_weight_grad,
                        int64_t cache_cap, const PlanTarget& target);

// Plans are pure functions of (shape, dtype, layout, device, scheme, cache cap, what is computed):
// computed once, then served from a cache, so steady-state calls (and CUDA graph capture after a
// warm-up) make no device queries besides the launches. kind: 0 forward train, 1 + 2 * train_dx + sums
// backward.
class PlanCache {
 public:
  using Key = std::tuple<int, int, int64_t, int64_t, int64_t, int, int, int64_t, int>;
  static Key key(const Shape& s, Scheme requested, int64_t cache_cap, int kind);
  Plan get(const Key& key, const std::function<Plan()>& make);
  void put(const Key& key, const Plan& plan);
  void clear();

 private:
  std::mutex mu_;
  std::map<Key, Plan> plans_;
};

// Backward plan kind of PlanCache.
int backward_kind(bool training, bool need_input_grad, bool need_weight_grad);

// What to do after the persistent launch of a plan was refused at launch time (the device held fewer
// co-resident blocks than the occupancy query promised: SMs taken by another context, an MPS limit): the
// two-pass plan of the same call, which becomes the shape's cached plan for the persistent and auto
// schemes, so later calls go straight to two-pass. backward false: forward_train (training and the
// gradient flags unused).
Plan refuse_persistent(PlanCache& cache, const Shape& s, bool backward, bool training, bool need_input_grad,
                       bool need_weight_grad, int64_t cache_cap, const PlanTarget& target);

}  // namespace resfused
