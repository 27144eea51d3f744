// csrc/ops/linear_cross_entropy_cuda.cu, built for the CPU emulator (see csrc/cuda/cuda_utils.cuh).
#include "ops/linear_cross_entropy_cuda.cu"
