// Which errors of cudaLaunchCooperativeKernel mean "refused before anything ran, the context is intact": the
// call then runs two-pass and the shape's plan becomes the two-pass one (csrc/bn_add_relu.cu). Any other error
// (a sticky one left by an earlier kernel, an illegal address) is thrown as before: a fallback would hide it.
// Host-only (the CUDA runtime's error enum); unit-tested on CPU by tests/test_cuda_sim.py.
#pragma once

#include <driver_types.h>

namespace resfused {

inline bool cooperative_launch_refused(cudaError_t err) {
  switch (err) {
    case cudaErrorCooperativeLaunchTooLarge:  // fewer co-resident blocks than planned (MPS limits, other contexts)
    case cudaErrorLaunchOutOfResources:       // the block's registers or shared memory do not fit
    case cudaErrorInvalidConfiguration:       // a block or shared-memory request above the device's limits
    case cudaErrorNotSupported:               // no cooperative launch on this device or in this mode
    case cudaErrorNotPermitted:               // not allowed here (for example in some stream-capture modes)
      return true;
    default:
      return false;
  }
}

}  // namespace resfused
