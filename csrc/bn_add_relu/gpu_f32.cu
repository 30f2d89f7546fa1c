// GPU launchers of the fused BatchNorm + add + ReLU op for element type F32 (see gpu_instance.cuh).
#define RESFUSED_BN_ELEMENT F32
#define RESFUSED_BN_SUFFIX f32
#include "gpu_instance.cuh"
