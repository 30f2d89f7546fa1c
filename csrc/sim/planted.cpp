// Kernels with planted bugs, for the tests that the runtime's checks catch them (tests/test_cuda_sim.py):
// a shared-memory race (a reduction step that reads a neighbour's slot without the barrier), an
// out-of-bounds global write (one element past the output), a __syncthreads under a thread-dependent
// branch, and the same reduction with its barrier (clean). Compiled like the real kernels.
#define RESFUSED_SIM 1

#include <cstdint>
#include <exception>
#include <string>

#include "runtime.h"

namespace {

struct Args {
  const float* in;
  float* out;
  int n;
  bool barrier;
};

// out[0] = sum of in[0..n) over a block of n threads: every thread stores its value, then thread 0 sums.
__global__ void planted_sum_kernel(Args a) {
  float* buf = resfused_sim::static_shared<float>(1024, __LINE__);
  const int t = threadIdx.x;
  buf[t] = a.in[t];
  if (a.barrier) __syncthreads();
  if (t == 0) {
    float s = 0.f;
    for (int i = 0; i < a.n; ++i) s += buf[i];
    a.out[0] = s;
  }
}

// out[t] = in[t] for t <= n: thread n writes one element past both tensors.
__global__ void planted_oob_kernel(Args a) {
  const int t = threadIdx.x;
  if (t <= a.n) a.out[t] = 2.f;
}

// __syncthreads reached by half of the block at one line and by the other half at another.
__global__ void planted_divergent_sync_kernel(Args a) {
  const int t = threadIdx.x;
  if (t % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  a.out[t] = a.in[t];
}

struct Call {
  void (*kernel)(Args);
  Args args;
};

__attribute__((no_sanitize_address)) void run_thread(void* p) {
  const Call* c = static_cast<const Call*>(p);
  c->kernel(c->args);
}

std::string g_error;

}  // namespace

extern "C" {

// which: 0 clean sum, 1 race, 2 out-of-bounds write, 3 divergent __syncthreads. in and out hold n floats
// (n <= 1024). Returns 0, or -1 with the runtime's message in rf_sim_planted_error().
int rf_sim_planted(int which, const float* in, float* out, int n) {
  Call c{planted_sum_kernel, Args{in, out, n, which != 1}};
  const char* name = "planted_sum_kernel";
  if (which == 2) {
    c.kernel = planted_oob_kernel;
    name = "planted_oob_kernel";
  }
  if (which == 3) {
    c.kernel = planted_divergent_sync_kernel;
    name = "planted_divergent_sync_kernel";
  }
  const unsigned threads = static_cast<unsigned>(which == 2 ? n + 1 : n);
  try {
    resfused_sim::run(name, resfused_sim::Index3{1, 1, 1}, resfused_sim::Index3{threads, 1, 1}, 0, false, &run_thread,
                      &c);
  } catch (const std::exception& e) {
    g_error = e.what();
    return -1;
  }
  return 0;
}

const char* rf_sim_planted_error() { return g_error.c_str(); }

}  // extern "C"
