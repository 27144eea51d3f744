// csrc/ops/embed_linear_tanh_cuda.cu, built for the CPU emulator (see csrc/cuda/cuda_utils.cuh).
#include "ops/embed_linear_tanh_cuda.cu"
