// csrc/ops/cross_entropy_cuda.cu, built for the CPU emulator (see csrc/cuda/cuda_utils.cuh).
#include "ops/cross_entropy_cuda.cu"
