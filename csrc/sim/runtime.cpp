// The CPU SIMT runtime (see runtime.h). Compiled without instrumentation; the kernels' translation
// unit calls the __asan_* hooks at the end of this file for every memory access it makes.
#include "runtime.h"

#include <link.h>
#include <setjmp.h>
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <vector>

namespace resfused_sim {

ThreadState* g_current = nullptr;

namespace {

constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kStaticSharedBytes = 48 * 1024;  // CUDA's limit on static shared memory per block
constexpr size_t kStateBytes = 256;                // ThreadState at the base of each fiber's allocation
constexpr uint64_t kCanary = 0x5eedc0de5eedc0deull;  // at the bottom of each stack: overflow shows

enum State : int { kRunnable = 0, kAtBlockBarrier = 1, kAtGridBarrier = 2, kDone = 3 };

struct Shadow {
  uint32_t w_epoch = 0, r_epoch = 0;  // epochs start at 1: 0 means never
  int32_t w_tid = -1, r_tid = -1;     // r_tid -2: read by several threads this epoch
};

struct Block;

struct Fiber {
  char* base = nullptr;  // kStackBytes: ThreadState, then the stack
  ThreadState* ts = nullptr;
  jmp_buf ctx;
  ucontext_t uc;
  int tid = 0;
  int state = kRunnable;
  bool started = false;
  const char* file = "";
  int line = 0;
  Block* block = nullptr;
};

struct Block {
  Index3 idx{};
  std::vector<Fiber*> fibers;
  std::vector<char> smem;  // [dynamic (rounded to 16)] [static pool]
  size_t dyn_exact = 0, dyn_bytes = 0, static_used = 0;  // dynamic: requested, rounded to 16
  std::vector<std::pair<int, size_t>> statics;  // (site, offset)
  uint32_t epoch = 1;
  std::vector<Shadow> shadow;
};

struct Launch {
  const char* kernel = "";
  bool cooperative = false;
  Index3 grid{}, block{};
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
};

jmp_buf g_sched;
ucontext_t g_sched_uc;
Fiber* g_fiber = nullptr;
Launch g_launch;
std::string g_error;

Order g_order = Order::kForward;
uint64_t g_seed = 0;
std::mt19937_64 g_rng;
bool g_check_races = false, g_check_bounds = false;
std::vector<Region> g_regions;
std::vector<std::pair<uintptr_t, uintptr_t>> g_own_ranges;  // this library's loaded segments
int64_t g_blocks = 0, g_threads = 0, g_launches = 0;

std::vector<char*> g_stacks;  // pool, reused across launches

std::string fmt_index(Index3 i) {
  return "(" + std::to_string(i.x) + ", " + std::to_string(i.y) + ", " + std::to_string(i.z) + ")";
}

Index3 thread_index(int tid) {
  const Index3 d = g_launch.block;
  return Index3{tid % d.x, (tid / d.x) % d.y, tid / (d.x * d.y)};
}

[[noreturn]] void fail(const std::string& msg) {
  if (g_error.empty()) g_error = msg;
  if (g_fiber != nullptr) {
    g_fiber->state = kDone;
    _longjmp(g_sched, 1);
  }
  throw Error(msg);
}

void fiber_entry() {
  g_launch.body(g_launch.arg);
  g_fiber->state = kDone;
  _longjmp(g_sched, 1);
}

void resume(Fiber* f) {
  g_fiber = f;
  g_current = f->ts;
  if (_setjmp(g_sched) == 0) {
    if (!f->started) {
      f->started = true;
      swapcontext(&g_sched_uc, &f->uc);
    } else {
      _longjmp(f->ctx, 1);
    }
  }
  g_fiber = nullptr;
  g_current = nullptr;
  uint64_t canary;
  std::memcpy(&canary, f->base + kStateBytes, sizeof canary);
  if (canary != kCanary && g_error.empty())
    g_error = std::string("kernel ") + g_launch.kernel + ": a thread overflowed its " +
              std::to_string(kStackBytes / 1024) + " KiB fiber stack";
}

void wait_at(int state, const char* file, int line) {
  Fiber* f = g_fiber;
  f->state = state;
  f->file = file;
  f->line = line;
  if (_setjmp(f->ctx) == 0) _longjmp(g_sched, 1);
}

template <class T>
std::vector<T*> ordered(const std::vector<T*>& v) {
  std::vector<T*> o(v);
  if (g_order == Order::kReverse) std::reverse(o.begin(), o.end());
  if (g_order == Order::kRandom) std::shuffle(o.begin(), o.end(), g_rng);
  return o;
}

std::string where(const Fiber* f) {
  return std::string(f->file) + ":" + std::to_string(f->line);
}

// Runs the block's threads until every one has exited or waits at a grid barrier.
void run_block(Block* b) {
  for (;;) {
    for (Fiber* f : ordered(b->fibers)) {
      if (f->state != kRunnable) continue;
      resume(f);
      if (!g_error.empty()) return;
    }
    const Fiber *at_block = nullptr, *at_grid = nullptr;
    for (const Fiber* f : b->fibers) {
      if (f->state == kAtBlockBarrier) {
        if (at_block != nullptr && (at_block->line != f->line || std::strcmp(at_block->file, f->file) != 0))
          fail(std::string("kernel ") + g_launch.kernel + ", block " + fmt_index(b->idx) + ": threads " +
               fmt_index(thread_index(at_block->tid)) + " and " + fmt_index(thread_index(f->tid)) +
               " wait at different __syncthreads (" + where(at_block) + " and " + where(f) + ")");
        at_block = f;
      }
      if (f->state == kAtGridBarrier) at_grid = f;
    }
    if (at_block == nullptr) return;
    if (at_grid != nullptr)
      fail(std::string("kernel ") + g_launch.kernel + ", block " + fmt_index(b->idx) + ": thread " +
           fmt_index(thread_index(at_block->tid)) + " waits at __syncthreads (" + where(at_block) + ") while thread " +
           fmt_index(thread_index(at_grid->tid)) + " waits at grid.sync (" + where(at_grid) + ")");
    for (Fiber* f : b->fibers)
      if (f->state == kAtBlockBarrier) f->state = kRunnable;
    ++b->epoch;  // exited threads count as arrived, as on the hardware
  }
}

char* stack_at(size_t i) {
  while (g_stacks.size() <= i) {
    char* s = static_cast<char*>(std::aligned_alloc(64, kStackBytes));
    if (s == nullptr) throw Error("cuda_sim: out of memory for fiber stacks");
    g_stacks.push_back(s);
  }
  return g_stacks[i];
}

void setup_block(Block& b, Fiber* fibers, size_t first_stack, Index3 idx, size_t dyn_smem) {
  const Index3 d = g_launch.block;
  const int threads = static_cast<int>(d.x * d.y * d.z);
  b.idx = idx;
  b.dyn_exact = dyn_smem;
  b.dyn_bytes = (dyn_smem + 15) / 16 * 16;
  b.smem.assign(b.dyn_bytes + kStaticSharedBytes, static_cast<char>(0xff));
  b.static_used = 0;
  b.statics.clear();
  b.epoch = 1;
  if (g_check_races) b.shadow.assign(b.smem.size() / 4, Shadow{});
  b.fibers.resize(threads);
  for (int t = 0; t < threads; ++t) {
    Fiber* f = &fibers[t];
    f->base = stack_at(first_stack + t);
    f->ts = reinterpret_cast<ThreadState*>(f->base);
    f->ts->thread_idx = thread_index(t);
    f->ts->block_idx = idx;
    f->ts->block_dim = d;
    f->ts->grid_dim = g_launch.grid;
    f->tid = t;
    f->state = kRunnable;
    f->started = false;
    f->block = &b;
    getcontext(&f->uc);
    std::memcpy(f->base + kStateBytes, &kCanary, sizeof kCanary);
    f->uc.uc_stack.ss_sp = f->base + kStateBytes;
    f->uc.uc_stack.ss_size = kStackBytes - kStateBytes;
    f->uc.uc_link = nullptr;
    makecontext(&f->uc, fiber_entry, 0);
    b.fibers[t] = f;
  }
}

int own_ranges_cb(dl_phdr_info* info, size_t, void* data) {
  const uintptr_t probe = reinterpret_cast<uintptr_t>(data);
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  bool mine = false;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD) continue;
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr, hi = lo + ph.p_memsz;
    ranges.emplace_back(lo, hi);
    if (probe >= lo && probe < hi) mine = true;
  }
  if (mine) g_own_ranges = ranges;
  return mine ? 1 : 0;
}

void find_own_ranges() {
  if (!g_own_ranges.empty()) return;
  dl_iterate_phdr(own_ranges_cb, reinterpret_cast<void*>(&g_current));
}

void shared_access(Block* b, const Fiber* f, size_t off, size_t n, bool write) {
  const size_t w0 = off / 4, w1 = (off + n - 1) / 4;
  for (size_t w = w0; w <= w1 && w < b->shadow.size(); ++w) {
    Shadow& s = b->shadow[w];
    int other = -1;
    const char* kind = nullptr;
    if (s.w_epoch == b->epoch && s.w_tid != f->tid) {
      other = s.w_tid;
      kind = write ? "write after write" : "read after write";
    } else if (write && s.r_epoch == b->epoch && s.r_tid != f->tid) {
      other = s.r_tid;
      kind = "write after read";
    }
    if (kind != nullptr) {
      std::string by = other >= 0 ? "thread " + fmt_index(thread_index(other)) : std::string("several threads");
      fail(std::string("shared-memory race (") + kind + ") in kernel " + g_launch.kernel + ", block " +
           fmt_index(b->idx) + ": thread " + fmt_index(thread_index(f->tid)) + (write ? " writes" : " reads") +
           " shared byte offset " + std::to_string(w * 4) + ", accessed by " + by +
           " since the last barrier");
    }
    if (write) {
      s.w_epoch = b->epoch;
      s.w_tid = f->tid;
    } else if (s.r_epoch != b->epoch) {
      s.r_epoch = b->epoch;
      s.r_tid = f->tid;
    } else if (s.r_tid != f->tid) {
      s.r_tid = -2;
    }
  }
}

void on_access(uintptr_t a, size_t n, bool write) {
  Fiber* f = g_fiber;
  if (f == nullptr || n == 0) return;
  const uintptr_t base = reinterpret_cast<uintptr_t>(f->base);
  if (a >= base && a + n <= base + kStackBytes) return;
  Block* b = f->block;
  const uintptr_t sm = reinterpret_cast<uintptr_t>(b->smem.data());
  if (a >= sm && a < sm + b->smem.size()) {
    const uintptr_t stat = sm + b->dyn_bytes;
    const bool in_dynamic = a + n <= sm + b->dyn_exact;
    const bool in_static = a >= stat && a + n <= stat + b->static_used;
    if (!in_dynamic && !in_static)
      fail(std::string("out-of-bounds shared access in kernel ") + g_launch.kernel + ", block " + fmt_index(b->idx) +
           ", thread " + fmt_index(thread_index(f->tid)) + ": " + std::to_string(n) + " bytes at shared offset " +
           std::to_string(a - sm) + ", beyond the block's " + std::to_string(b->dyn_exact) + " dynamic and " +
           std::to_string(b->static_used) + " static bytes");
    if (g_check_races) shared_access(b, f, a - sm, n, write);
    return;
  }
  if (!g_check_bounds) return;
  for (const auto& r : g_own_ranges)
    if (a >= r.first && a < r.second) return;
  const Region* nearest = nullptr;
  int64_t best = INT64_MAX;
  for (const Region& r : g_regions) {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(r.ptr), hi = lo + r.bytes;
    if (a >= lo && a + n <= hi) return;
    const int64_t d = a < lo ? static_cast<int64_t>(lo - a) : static_cast<int64_t>(a + n - hi);
    if (d < best) {
      best = d;
      nearest = &r;
    }
  }
  std::string near = "no region";
  if (nearest != nullptr) {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(nearest->ptr);
    near = std::string("region '") + nearest->name + "' of " + std::to_string(nearest->bytes) + " bytes, " +
           (a < lo ? std::to_string(lo - a) + " bytes before it"
                   : std::to_string(a + n - lo - nearest->bytes) + " bytes past its end");
  }
  fail(std::string("out-of-bounds global ") + (write ? "write" : "read") + " in kernel " + g_launch.kernel +
       ", block " + fmt_index(b->idx) + ", thread " + fmt_index(thread_index(f->tid)) + ": " + std::to_string(n) +
       " bytes at " + near);
}

}  // namespace

void syncthreads(const char* file, int line) { wait_at(kAtBlockBarrier, file, line); }

void grid_sync(const char* file, int line) {
  if (!g_launch.cooperative)
    fail(std::string("kernel ") + g_launch.kernel + ": grid.sync() (" + file + ":" + std::to_string(line) +
         ") in a kernel that was not launched cooperatively");
  wait_at(kAtGridBarrier, file, line);
}

void* dynamic_shared() { return g_fiber->block->smem.data(); }

void* static_shared_bytes(size_t bytes, int site) {
  Block* b = g_fiber->block;
  for (const auto& s : b->statics)
    if (s.first == site) return b->smem.data() + b->dyn_bytes + s.second;
  const size_t off = (b->static_used + 15) / 16 * 16;
  if (off + bytes > kStaticSharedBytes)
    fail(std::string("kernel ") + g_launch.kernel + ": static shared memory beyond 48 KiB");
  b->statics.emplace_back(site, off);
  b->static_used = off + bytes;
  return b->smem.data() + b->dyn_bytes + off;
}

void set_order(Order order, uint64_t seed) {
  g_order = order;
  g_seed = seed;
  g_rng.seed(seed);
}

void set_checks(bool races, bool bounds) {
  g_check_races = races;
  g_check_bounds = bounds;
  find_own_ranges();
}

void set_regions(const Region* regions, int n) { g_regions.assign(regions, regions + std::max(n, 0)); }

void counters(int64_t* blocks, int64_t* threads, int64_t* launches) {
  *blocks = g_blocks;
  *threads = g_threads;
  *launches = g_launches;
}

void run(const char* kernel, Index3 grid, Index3 block, size_t dyn_smem, bool cooperative, void (*body)(void*),
         void* arg) {
  if (g_fiber != nullptr) throw Error("cuda_sim: a kernel launched from inside a kernel");
  g_launch = Launch{kernel, cooperative, grid, block, body, arg};
  g_error.clear();
  ++g_launches;
  const int threads = static_cast<int>(block.x * block.y * block.z);
  const int64_t nblocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  if (threads <= 0 || threads > 1024) throw Error(std::string("kernel ") + kernel + ": bad block size");
  std::vector<Index3> order;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.push_back(Index3{x, y, z});
  if (g_order == Order::kReverse) std::reverse(order.begin(), order.end());
  if (g_order == Order::kRandom) std::shuffle(order.begin(), order.end(), g_rng);
  g_blocks += nblocks;
  g_threads += nblocks * threads;
  if (!cooperative) {
    Block b;
    std::vector<Fiber> fibers(threads);
    for (const Index3& idx : order) {
      setup_block(b, fibers.data(), 0, idx, dyn_smem);
      run_block(&b);
      if (!g_error.empty()) throw Error(g_error);
    }
    return;
  }
  std::vector<std::unique_ptr<Block>> blocks;
  std::vector<std::unique_ptr<Fiber[]>> fibers;
  std::vector<Block*> all;
  for (size_t i = 0; i < order.size(); ++i) {
    blocks.emplace_back(new Block());
    fibers.emplace_back(new Fiber[threads]);
    setup_block(*blocks.back(), fibers.back().get(), i * threads, order[i], dyn_smem);
    all.push_back(blocks.back().get());
  }
  for (;;) {
    for (Block* b : ordered(all)) {
      run_block(b);
      if (!g_error.empty()) throw Error(g_error);
    }
    const Fiber *waiting = nullptr, *exited = nullptr;
    for (Block* b : all)
      for (const Fiber* f : b->fibers) {
        if (f->state == kAtGridBarrier) waiting = f;
        if (f->state == kDone) exited = f;
      }
    if (waiting == nullptr) return;  // every thread exited
    if (exited != nullptr)
      throw Error(std::string("kernel ") + kernel + ": grid.sync (" + where(waiting) +
                  ") waits for threads that exited (block " + fmt_index(exited->block->idx) + ", thread " +
                  fmt_index(thread_index(exited->tid)) + ")");
    for (Block* b : all) {
      for (Fiber* f : b->fibers) f->state = kRunnable;
      ++b->epoch;
    }
  }
}

}  // namespace resfused_sim

// Per-access callbacks of -fsanitize=kernel-address in the kernels' translation unit.
extern "C" {
#define RESFUSED_SIM_HOOKS(n)                                                                    \
  void __asan_load##n##_noabort(uintptr_t a) { resfused_sim::on_access(a, n, false); }         \
  void __asan_store##n##_noabort(uintptr_t a) { resfused_sim::on_access(a, n, true); }         \
  void __asan_load##n(uintptr_t a) { resfused_sim::on_access(a, n, false); }                   \
  void __asan_store##n(uintptr_t a) { resfused_sim::on_access(a, n, true); }
RESFUSED_SIM_HOOKS(1)
RESFUSED_SIM_HOOKS(2)
RESFUSED_SIM_HOOKS(4)
RESFUSED_SIM_HOOKS(8)
RESFUSED_SIM_HOOKS(16)
#undef RESFUSED_SIM_HOOKS
void __asan_loadN_noabort(uintptr_t a, size_t n) { resfused_sim::on_access(a, n, false); }
void __asan_storeN_noabort(uintptr_t a, size_t n) { resfused_sim::on_access(a, n, true); }
void __asan_loadN(uintptr_t a, size_t n) { resfused_sim::on_access(a, n, false); }
void __asan_storeN(uintptr_t a, size_t n) { resfused_sim::on_access(a, n, true); }
void __asan_handle_no_return() {}
void __asan_before_dynamic_init(const char*) {}
void __asan_after_dynamic_init() {}
}
