// Host side of the CPU SIMT runtime (a test tool; see cuda_sim.h for the device side).
//
// run() executes a kernel over a grid: each CUDA thread is a fiber (makecontext to start, _setjmp /
// _longjmp to switch: no system call per switch), 64 KiB of stack each. A plain launch runs its blocks
// one after the other; a cooperative launch runs all blocks interleaved, so grid.sync() is a barrier over
// every thread of the grid. Between barriers the scheduler resumes threads in the order chosen by
// set_order (forward, reverse, or a seeded random permutation of each pass), so code that depends on the
// order in which threads of a block run shows up as differing results.
//
// Checks (set_checks; the kernel's translation unit is compiled with -fsanitize=kernel-address, whose
// per-access callbacks this runtime implements):
//   shared-memory races: between two barriers of a block, a 4-byte word of shared memory written by one
//     thread and read or written by another (racecheck's hazards) -> Error naming kernel, block, threads,
//     offset and the kind of hazard;
//   global bounds: any access outside the calling thread's stack, its block's shared memory and the
//     regions of set_regions (the tensors of the call) -> Error naming kernel, block, thread, address and
//     the nearest region;
//   barriers: __syncthreads reached at different lines by threads of one block, or a barrier waited on by
//     some threads of a block while others wait on another kind -> Error with the lines.
// Shared memory is filled with NaN bytes (0xff) at block start, so reads of unwritten shared memory show.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_sim.h"

namespace resfused_sim {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class Order : int { kForward = 0, kReverse = 1, kRandom = 2 };

struct Region {
  const void* ptr;
  size_t bytes;
  const char* name;
};

void set_order(Order order, uint64_t seed);
void set_checks(bool races, bool bounds);
// The memory a kernel may touch besides stacks and shared memory (copied; valid until the next call).
void set_regions(const Region* regions, int n);
// Blocks launched and threads run since the last reset (for tests of what ran).
void counters(int64_t* blocks, int64_t* threads, int64_t* launches);

void run(const char* kernel, Index3 grid, Index3 block, size_t dyn_smem, bool cooperative, void (*body)(void*),
         void* arg);

}  // namespace resfused_sim
