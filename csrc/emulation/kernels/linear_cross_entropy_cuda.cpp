// csrc/linear_cross_entropy_cuda.cu, built for the CPU emulator (see csrc/cuda_utils.cuh).
#include "linear_cross_entropy_cuda.cu"
