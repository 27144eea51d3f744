// csrc/sgd_train_cuda.cu, built for the CPU emulator (see csrc/cuda_utils.cuh).
#include "sgd_train_cuda.cu"
