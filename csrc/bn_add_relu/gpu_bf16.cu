// GPU launchers of the fused BatchNorm + add + ReLU op for element type BF16 (see gpu_instance.cuh).
#define RESFUSED_BN_ELEMENT BF16
#define RESFUSED_BN_SUFFIX bf16
#include "gpu_instance.cuh"
