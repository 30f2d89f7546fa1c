// GPU launchers of the fused BatchNorm + add + ReLU op for element type F16 (see gpu_instance.cuh).
#define RESFUSED_BN_ELEMENT F16
#define RESFUSED_BN_SUFFIX f16
#include "gpu_instance.cuh"
