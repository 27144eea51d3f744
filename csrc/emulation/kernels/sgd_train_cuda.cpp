// csrc/sgd_train/sgd_train_cuda.cu, built for the CPU emulator (see csrc/cuda/cuda_utils.cuh).
#include "sgd_train/sgd_train_cuda.cu"
