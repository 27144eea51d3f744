// csrc/embed_linear_tanh_cuda.cu, built for the CPU emulator (see csrc/cuda_utils.cuh).
#include "embed_linear_tanh_cuda.cu"
